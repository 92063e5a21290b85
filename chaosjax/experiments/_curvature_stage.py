"""The curvature stage: sharpness against the stability threshold of each reference run, its
verdict (edge of stability, progressive sharpening, ...), markdown rows and figures.

Re-exported by :mod:`chaosjax.experiments.analyses`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from chaosjax._util import finite_median, fmt
from chaosjax.experiments._analysis_base import group_coords, reference_groups
from chaosjax.experiments._sections import BaseConfig
from chaosjax.experiments.tables import table_head


def curvature_tracker(cfg: BaseConfig):
    from chaosjax._curvature_tracker import CurvatureTracker

    c = cfg.curvature
    return CurvatureTracker(
        k=c.k,
        rows="references",
        operator=c.operator,
        mode=c.mode,
        subset=c.subset or None,
        n_blocks=c.n_blocks,
        cold_matvecs=c.cold_matvecs,
        tol=c.tol,
        max_matvecs=c.max_matvecs,
        restart_blocks=c.restart_blocks,
    )


#: documented verdict rule (summary.md repeats it)
VERDICT_RULE = (
    "Verdict from the reference replica's sharpness ratio r = λ1 / threshold over the run "
    "(threshold at the learning rate of each step, schedules included): *unstable* if it "
    "diverged or the median r over the last quarter of records exceeds 1.15; *flat plateau* "
    "if the last-quarter median r is below 0.01 while the loss has stalled (it changed by less "
    "than 1 % over the last quarter) above 1 % of its initial value ('with bursts' when r "
    "still exceeded 1 in the last quarter); *edge of stability* if r reached 0.95 and the "
    "last-quarter median lies in [0.85, 1.15]; *stable* otherwise (*stable after crossing* if "
    "r exceeded 1 at some point). Only converged sharpness records count (relative "
    "eigen-residual ≤ curvature.tol); the table shows how many the verdict rests on."
)


def verdict(ratio, diverged_step: int, loss=None) -> tuple[str, float, float]:
    """(verdict, max ratio, last-quarter median ratio) by :data:`VERDICT_RULE`; ``loss`` (the
    run's recorded loss at the same records) tells a flat plateau from a converged run."""
    r = np.asarray(ratio, np.float64)
    if diverged_step >= 0:
        return (
            f"unstable (diverged at step {diverged_step})",
            float(np.nanmax(r)) if np.isfinite(r).any() else float("nan"),
            float("nan"),
        )
    finite = np.isfinite(r)
    if not finite.any():
        return "unknown (no finite sharpness ratio)", float("nan"), float("nan")
    q = max(1, finite.sum() // 4)
    tail = r[finite][-q:]
    late = float(np.median(tail))
    mx = float(r[finite].max())
    if late > 1.15:
        return "unstable", mx, late
    if late < 0.01 and loss is not None and _stalled(np.asarray(loss, np.float64)):
        return ("flat plateau" + (" with bursts" if tail.max() > 1.0 else "")), mx, late
    if mx >= 0.95 and 0.85 <= late <= 1.15:
        return "edge of stability", mx, late
    if mx > 1.0:
        return "stable after crossing", mx, late
    return "stable", mx, late


def _stalled(loss: np.ndarray) -> bool:
    """The loss changed by under 1 % over the last quarter of records, above 1 % of its start."""
    loss = loss[np.isfinite(loss)]
    if loss.size < 4:
        return False
    tail = loss[-max(2, loss.size // 4) :]
    level = float(np.median(tail))
    change = float(tail.max() - tail.min())
    return level > 0.01 * float(loss[0]) and change < 0.01 * level


def curvature_stage(cfg: BaseConfig, tmap, batch, results):
    """Trace and SLQ density at the initial and final state of every reference run, and the
    verdict of each reference run from the tracked sharpness ratio."""
    import jax

    from chaosjax.curvature import density_estimate, hessian_operator, trace_estimate, training_loss

    c = cfg.curvature
    refs = reference_groups(batch)
    when = ["initial", "final"]
    trace = np.full((len(refs), 2), np.nan)
    trace_se = np.full((len(refs), 2), np.nan)
    m = min(c.density_matvecs, tmap.n_params)
    nodes = np.full((len(refs), 2, max(m, 1) * c.density_runs), np.nan)
    weights = np.full_like(nodes, np.nan)
    t_end = int(results.steps[-1])
    key = jax.random.PRNGKey(0)

    def measure(tm, state, t):
        loss, p, _ = training_loss(tm, state, t, mode=c.mode, subset=c.subset or None)
        mv, _ = hessian_operator(loss, p)
        out = {}
        if c.trace_probes:
            tr = trace_estimate(
                mv, p.shape[0], n_probes=max(2, c.trace_probes), key=key, dtype=p.dtype
            )
            out["trace"] = (tr.estimate, tr.stderr)
        if m:
            d = density_estimate(
                mv, p.shape[0], n_matvecs=m, n_runs=c.density_runs, key=key, dtype=p.dtype
            )
            out["density"] = (d.nodes, d.weights)
        return out

    measure = jax.jit(measure)  # the map is an argument: its data are not constant-folded
    for g, r in enumerate(refs):
        for w, (state, t) in enumerate(
            [(batch.states[r], int(results.steps[0])), (results.final_state[r], t_end)]
        ):
            if w == 1 and results.diverged_step[r] >= 0:
                continue
            out = measure(tmap, jax.numpy.asarray(state), jax.numpy.asarray(t, jax.numpy.int32))
            if "trace" in out:
                trace[g, w], trace_se[g, w] = float(out["trace"][0]), float(out["trace"][1])
            if "density" in out:
                nodes[g, w], weights[g, w] = (
                    np.asarray(out["density"][0]),
                    np.asarray(out["density"][1]),
                )
    verdicts, maxr, later, n_conv = [], [], [], []
    for r in refs:
        ratio, ok = converged_ratio(results, r)
        n_conv.append(int(ok.sum()))
        v, mx, late = verdict(
            ratio,
            int(results.diverged_step[r]),
            results.records["loss"][r] if "loss" in results.records else None,
        )
        verdicts.append(v)
        maxr.append(mx)
        later.append(late)
    return xr.Dataset(
        {
            "trace": (("group", "when"), trace),
            "trace_stderr": (("group", "when"), trace_se),
            "density_nodes": (("group", "when", "node"), nodes),
            "density_weights": (("group", "when", "node"), weights),
            "verdict": (("group",), np.asarray(verdicts, dtype=str)),
            "max_ratio": (("group",), np.asarray(maxr)),
            "late_ratio": (("group",), np.asarray(later)),
            "converged_records": (("group",), np.asarray(n_conv, np.int64)),
            "records": (("group",), np.full(len(refs), results.steps.size, np.int64)),
        },
        coords={**group_coords(batch, refs), "when": np.asarray(when, dtype=str)},
        attrs={"k": c.k, "operator": c.operator, "mode": c.mode, "rule": VERDICT_RULE},
    )


def _verdict_words(ds: xr.Dataset, lyapunov: xr.Dataset | None, g: int) -> str:
    """Group g's verdict in the words of :func:`chaosjax.experiments.regimes.curvature_words`."""
    from chaosjax.experiments.regimes import curvature_words, end_state_of

    verdict = str(ds["verdict"].values[g])
    return curvature_words(verdict, ftle_regime(lyapunov, g), end_state_of(lyapunov, g))


def ftle_regime(lyapunov: xr.Dataset | None, g: int) -> str:
    """The FTLE regime of group g ('' without a lyapunov group)."""
    return "" if lyapunov is None else str(lyapunov["regime"].values[g])


def _trace_cell(ds: xr.Dataset, g: int) -> str:
    """Trace at the start → end with its standard errors (n/a where not measured)."""
    tr, se = ds["trace"].values[g], ds["trace_stderr"].values[g]

    def one(v, s):
        return "n/a" if not np.isfinite(v) else f"{fmt(v)} ± {fmt(s, '.2g')}"

    return f"{one(tr[0], se[0])} → {one(tr[1], se[1])}"


def _converged_cell(ds: xr.Dataset, g: int) -> str:
    """``n/N`` converged sharpness records of group g (n/a for a run stored without them)."""
    if "converged_records" not in ds:
        return "n/a"
    return f"{int(ds['converged_records'].values[g])}/{int(ds['records'].values[g])}"


def converged_ratio(results, r: int) -> tuple[np.ndarray, np.ndarray]:
    """The sharpness ratio of row ``r`` with unconverged records (``sharpness_converged`` of λ1
    = 0) set to NaN, and the mask of converged records (all records count in a run stored
    before the flag existed)."""
    ratio = np.asarray(results.records["sharpness_ratio"][r], np.float64)
    conv = results.records.get("sharpness_converged")
    ok = np.ones(ratio.shape, bool) if conv is None else np.asarray(conv[r, :, 0]) > 0.5
    ok &= np.isfinite(ratio)
    return np.where(ok, ratio, np.nan), ok


def _range(x) -> str:
    """``a`` for a constant series, ``a → b`` (first → last finite) otherwise."""
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return "n/a"
    if np.allclose(x, x[0], rtol=1e-9):
        return fmt(float(x[0]))
    return f"{fmt(float(x[0]))} → {fmt(float(x[-1]))}"


def curvature_markdown(ds: xr.Dataset, results, lyapunov: xr.Dataset | None = None) -> list[str]:
    """The curvature section; with the run's ``lyapunov`` group its verdicts use the words of
    :func:`chaosjax.experiments.regimes.curvature_words` (no "stable" beside chaos)."""

    lines = [
        "## Curvature and the edge of stability",
        "",
        f"Top-{ds.attrs['k']} eigenvalues of the {ds.attrs['operator']} operator ({ds.attrs['mode']} "
        "loss) tracked at every record with warm-started block Krylov; threshold = the "
        "optimizer's stability threshold (GD 2/η) at the learning rate of the step (start → end "
        "under a schedule; n/a for an optimizer without a known threshold or learning rate). "
        "Sharpness is of the loss the step differentiates (train mode). Rotation: median "
        "1 − |⟨v1(t), v1(t+Δ)⟩| between records. Trace: Hutchinson ± stderr at the start → end.",
        "",
        VERDICT_RULE,
        "",
        *table_head(
            "η",
            "seed",
            "threshold",
            "λ1 start",
            "λ1 end",
            "max λ1/thr",
            "late λ1/thr",
            "rotation",
            "trace start → end",
            "converged",
            "verdict",
        ),
    ]
    for g in range(ds.sizes["group"]):
        r = int(ds["reference"].values[g])
        sh = results.records["sharpness"][r, :, 0]
        thr = results.records["threshold"][r]
        rot = results.records["rotation"][r]
        fin = sh[np.isfinite(sh)]
        lines.append(
            f"| {float(ds['learning_rate'].values[g]):.4g} | {int(ds['seed'].values[g])} | "
            f"{_range(thr)} | {fmt(float(sh[0]))} | "
            f"{fmt(float(fin[-1]) if fin.size else np.nan)} | {fmt(float(ds['max_ratio'].values[g]), '.2f')} | "
            f"{fmt(float(ds['late_ratio'].values[g]), '.2f')} | "
            f"{fmt(finite_median(rot), '.2e')} | "
            f"{_trace_cell(ds, g)} | {_converged_cell(ds, g)} | "
            f"{_verdict_words(ds, lyapunov, g)} |"
        )
    lines += [
        "",
        "![sharpness](figures/sharpness.png)",
        "",
        "![rotation](figures/rotation.png)",
        "",
        "![density](figures/density.png)",
        "",
    ]
    return lines


def curvature_figures(ds: xr.Dataset, results, folder: Path) -> None:
    from chaosjax import plots

    plots.save(plots.sharpness_vs_threshold(results).figure, folder / "sharpness.png")
    plots.save(plots.rotation_series(results).figure, folder / "rotation.png")
    plots.save(plots.spectral_density(ds).figure, folder / "density.png")
