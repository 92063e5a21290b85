"""Analysis stages of a run, each producing an ``xarray.Dataset`` stored as a group of
``results.zarr``, plus the summary rows and figures derived from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from chaosjax._util import finite_median, fmt
from chaosjax.experiments.config import ExperimentConfig


def reference_groups(batch) -> np.ndarray:
    """Indices of the reference replicas (member 0), one per (seed, grid point)."""
    return np.flatnonzero(np.asarray(batch.coords["member"]) == 0)


def group_coords(batch, refs) -> dict:
    """xarray coordinates of a per-reference-run analysis: group, reference, seed, η."""
    return {
        "group": np.arange(len(refs)),
        "reference": ("group", refs),
        "seed": ("group", np.asarray(batch.coords["seed"])[refs]),
        "learning_rate": ("group", np.asarray(batch.hparams["learning_rate"], np.float64)[refs]),
    }


def tangent_tracker(cfg: ExperimentConfig):
    """The one :class:`chaosjax.LyapunovTracker` of a run (None when no stage needs tangents).

    It serves the Lyapunov stage (exponents and FTLEs from ``lyapunov.warmup``), the CLV stage
    (its R factors and bases over the CLV window: the top-left blocks of the same QR process)
    and the control stage (λ1 over the last ``control.lyapunov_steps`` steps): k is the
    largest k asked for, and every number comes from the tangents of the recorded run.
    """
    import math

    from chaosjax.observers import CLVWindow, LyapunovTracker

    ly, c, ctl = cfg.lyapunov, cfg.clv, cfg.control
    if not (ly.enabled or c.enabled or ctl.enabled):
        return None
    k = max(ly.k if ly.enabled else 1, c.k if c.enabled else 1)
    if ly.enabled:
        warmup = ly.warmup
    elif c.enabled:
        warmup = 0
    else:
        warmup = cfg.steps - ctl.lyapunov_steps
    if c.enabled and not ly.enabled and ctl.enabled:
        warmup = min(c.align, cfg.steps - ctl.lyapunov_steps)
        warmup -= warmup % cfg.record_every
    window = None
    if c.enabled:
        re = ly.renorm_every
        n = c.steps or cfg.steps - c.align - c.backward_transient
        unit = math.lcm(cfg.record_every, re)
        keep = c.keep_every or unit * max(1, n // 10 // unit)
        window = CLVWindow(c.align, n, c.backward_transient, keep, keep == cfg.record_every)
    return LyapunovTracker(
        k=k, renorm_every=ly.renorm_every, warmup=warmup, rows="references", clv=window
    )


def lyapunov_stage(cfg: ExperimentConfig, batch, results):
    """Top-k spectrum, FTLEs and the replica-distance fit of every reference run, from the
    tangents the run carried along its recorded trajectory."""
    from chaosjax.lyapunov import LyapunovResult, _reasons, best_window_fit

    ly = cfg.lyapunov
    refs = reference_groups(batch)
    t0 = int(results.steps[0])
    t_start = t0 + ly.warmup
    stop = t_start + (ly.steps or cfg.steps - ly.warmup)
    ends = np.asarray(results.axes["renorm"])
    sel = (ends > t_start) & (ends <= stop)
    lg = results.records["log_growth"][refs][:, sel, : ly.k]
    res = LyapunovResult(log_growth=lg, renorm_every=ly.renorm_every, t_start=t_start)
    steps = int(sel.sum()) * ly.renorm_every
    reasons = _reasons(lg, ends[sel], results.diverged_step[refs])
    lr = np.asarray(batch.hparams["learning_rate"], np.float64)[refs]
    window = min(ly.ftle_window, steps - steps % ly.renorm_every)
    window -= window % ly.renorm_every
    ftle = res.ftle(window)
    # replica-distance fit per group (Danovski et al.)
    starts = range(ly.fit_starts[0], ly.fit_starts[1] + 1, ly.fit_starts[2])
    widths = range(ly.fit_widths[0], ly.fit_widths[1] + 1, ly.fit_widths[2])
    fits = []
    for r in refs:
        pert = (np.asarray(results.coords["reference"]) == r) & (
            np.asarray(results.coords["member"]) > 0
        )
        if "distance_l1" in results.records and pert.any():
            fits.append(
                best_window_fit(
                    results.steps_of("distance_l1"),
                    results.records["distance_l1"][pert],
                    starts=starts,
                    widths=widths,
                )
            )
        else:
            fits.append(None)
    nan = float("nan")
    data = {
        "exponents": (("group", "exponent"), res.exponents),
        "stderr": (("group", "exponent"), res.stderr),
        "per_eta_t": (("group", "exponent"), res.exponents / lr[:, None]),
        "ftle": (("group", "window", "exponent"), ftle),
        "running_lambda1": (("group", "renorm"), res.running[..., 0]),
        "fit_slope": (("group",), [f.slope if f else nan for f in fits]),
        "fit_r2": (("group",), [f.r2 if f else nan for f in fits]),
        "fit_intercept": (("group",), [f.intercept if f else nan for f in fits]),
        "fit_start": (("group",), [f.start if f else -1 for f in fits]),
        "fit_stop": (("group",), [f.stop if f else -1 for f in fits]),
        "reason": (("group",), np.asarray(reasons, dtype=str)),
    }
    if "tangent_loss" in results.records:  # the loss of the trajectory the tangents followed
        data["loss"] = (("group", "step"), results.records["tangent_loss"][refs])
    return xr.Dataset(
        data,
        coords={
            **group_coords(batch, refs),
            "exponent": np.arange(1, ly.k + 1),
            "window_end": ("window", res.ftle_times(window)),
            "renorm_end": ("renorm", res.times),
            "step": np.asarray(results.steps),
        },
        attrs={
            "steps": steps,
            "k": ly.k,
            "renorm_every": ly.renorm_every,
            "warmup": ly.warmup,
            "ftle_window": window,
            "t_start": t_start,
        },
    )


def clv_stage(cfg: ExperimentConfig, tmap, batch, results):
    """Covariant Lyapunov vectors of every reference run from the forward pass its tangents
    made inside the run: exponents, angles, layer masses, Hessian overlap."""
    import math

    import jax

    from chaosjax.clv import clv_layer_mass, from_forward

    c = cfg.clv
    tracker = tangent_tracker(cfg)
    window = tracker.clv
    refs = reference_groups(batch)
    re = tracker.renorm_every
    n_keep = window.steps // re
    kept = np.arange(0, n_keep, window.keep_every // re)
    res = from_forward(
        results.records["clv_r"][refs],
        results.records["clv_basis"][refs],
        results.records["clv_state"][refs],
        n_keep=n_keep,
        kept=kept,
        renorm_every=re,
        t_start=int(results.steps[0]) + window.start,
        key=jax.random.split(jax.random.PRNGKey(0))[1],
        k=c.k,
        tangency_threshold=math.radians(c.tangency_deg),
    )
    mass = clv_layer_mass(res.vectors, tmap.layers, tmap.n_params)
    names = list(mass)
    overlap = hessian_overlap(tmap, res, c.k)
    data = {
        "exponents": (("group", "exponent"), res.exponents),
        "qr_exponents": (("group", "exponent"), res.qr_exponents),
        "min_angle_deg": (("group", "time"), np.degrees(res.angles)),
        "near_tangencies": (("group",), np.asarray(res.near_tangencies)),
        "layer_mass": (
            ("group", "kept", "part", "exponent"),
            np.stack([mass[n] for n in names], axis=2),
        ),
        "angle_matrix_deg": (
            ("group", "kept", "exponent", "exponent2"),
            np.degrees(res.angle_matrix),
        ),
        "hessian_overlap": (("group", "kept", "exponent"), overlap),
    }
    if "tangent_loss" in results.records:  # the loss of the trajectory the tangents followed
        data["loss"] = (("group", "step"), results.records["tangent_loss"][refs])
    return xr.Dataset(
        data,
        coords={
            **group_coords(batch, refs),
            "exponent": np.arange(1, c.k + 1),
            "exponent2": np.arange(1, c.k + 1),
            "time_step": ("time", res.all_times),
            "kept_step": ("kept", res.times),
            "part": np.asarray(names, dtype=str),
            "step": np.asarray(results.steps),
        },
        attrs={
            "steps": window.steps,
            "k": c.k,
            "tangency_deg": c.tangency_deg,
            "backward_transient": window.transient,
            "t_start": res.t_start,
        },
    )


def hessian_overlap(tmap, res, k: int) -> np.ndarray:
    """Squared overlap of each CLV's parameter part with the span of the top-k Hessian
    eigenvectors at the same state, shape (group, kept, k) (NaN where not finite)."""
    import jax
    import jax.numpy as jnp

    from chaosjax.clv import clv_subspace_overlap
    from chaosjax.curvature import hessian_eigs, training_loss

    k_h = min(k, tmap.n_params)
    m = min(tmap.n_params, max(4 * k_h, 32))

    @jax.jit
    def top(tm, state, t):  # the map is an argument: its data are not constant-folded
        loss, p, _ = training_loss(tm, state, t)
        return hessian_eigs(loss, p, k_h, num_matvecs=m).eigenvectors

    out = np.full((*res.vectors.shape[:2], res.vectors.shape[-1]), np.nan)
    for g in range(res.vectors.shape[0]):
        for j, t in enumerate(res.times):
            st = res.states[g, j]
            if not np.isfinite(st).all():
                continue
            basis = np.zeros((tmap.dim, k_h))
            basis[: tmap.n_params] = np.asarray(
                top(tmap, jnp.asarray(st, tmap.state_dtype), jnp.int32(t))
            ).T
            out[g, j] = clv_subspace_overlap(res.vectors[g, j], basis)
    return out


def clv_markdown(ds: xr.Dataset) -> list[str]:
    a = ds.attrs
    lines = [
        "## Covariant Lyapunov vectors",
        "",
        f"Ginelli CLVs of each reference run over {a['steps']} steps (k = {a['k']}, backward "
        f"transient {a['backward_transient']} steps). Angles: the smallest angle between any two "
        f"CLVs at each step; near-tangency: below {a['tangency_deg']:g}°. Layer mass: share of "
        "CLV 1's squared norm per layer, averaged over kept times and seeds. Hessian overlap: "
        "squared projection of CLV i onto the span of the top-k Hessian eigenvectors "
        "(parameters only), averaged over kept times and seeds.",
        "",
        "| η | CLV exponents (per step) | median min angle (°) | 5th pct (°) | near-tangent steps | CLV 1 mass by part | Hessian overlap |",
        "|---|---|---|---|---|---|---|",
    ]
    lrs = ds["learning_rate"].values
    parts = [str(p) for p in ds["part"].values]
    for lr in np.unique(lrs):
        sel = lrs == lr
        ex = np.nanmean(ds["exponents"].values[sel], axis=0)
        ang = ds["min_angle_deg"].values[sel].ravel()
        ang = ang[np.isfinite(ang)]
        med = float(np.median(ang)) if ang.size else float("nan")
        p5 = float(np.percentile(ang, 5)) if ang.size else float("nan")
        n_t = int(ds["near_tangencies"].values[sel].sum())
        n_all = int(ds["min_angle_deg"].values[sel].size)
        m = np.nanmean(ds["layer_mass"].values[sel][..., 0], axis=(0, 1))
        mass = ", ".join(f"{p} {fmt(v, '.2f')}" for p, v in zip(parts, m))
        ov = ds["hessian_overlap"].values[sel]
        ok = np.isfinite(ov).all(axis=-1)
        ov = ov[ok].mean(axis=0) if ok.any() else np.full(ov.shape[-1], np.nan)
        lines.append(
            f"| {lr:.4g} | {', '.join(fmt(v) for v in ex)} | {fmt(med, '.1f')} | {fmt(p5, '.1f')} | "
            f"{n_t}/{n_all} | {mass} | {', '.join(fmt(v, '.2f') for v in ov)} |"
        )
    lines += ["", "![CLV angles](figures/clv_angles.png)", ""]
    return lines


def clv_figures(ds: xr.Dataset, folder: Path) -> None:
    from chaosjax import plots

    plots.save(plots.clv_angle_distribution(ds).figure, folder / "clv_angles.png")


def curvature_tracker(cfg: ExperimentConfig):
    from chaosjax.curvature import CurvatureTracker

    c = cfg.curvature
    return CurvatureTracker(
        k=c.k,
        rows="references",
        operator=c.operator,
        mode=c.mode,
        subset=c.subset or None,
        num_blocks=c.num_blocks,
        cold_matvecs=c.cold_matvecs,
    )


#: documented verdict rule (summary.md repeats it)
VERDICT_RULE = (
    "Verdict from the reference replica's sharpness ratio r = λ1 / threshold over the run: "
    "*unstable* if it diverged or the median r over the last quarter of records exceeds 1.15; "
    "*edge of stability* if r reached 0.95 and the last-quarter median lies in [0.85, 1.15]; "
    "*stable* otherwise (*stable after crossing* if r exceeded 1 at some point)."
)


def verdict(ratio: np.ndarray, diverged_step: int) -> tuple[str, float, float]:
    """(verdict, max ratio, last-quarter median ratio) by :data:`VERDICT_RULE`."""
    r = np.asarray(ratio, np.float64)
    if diverged_step >= 0:
        return (
            f"unstable (diverged at step {diverged_step})",
            float(np.nanmax(r)) if np.isfinite(r).any() else float("nan"),
            float("nan"),
        )
    r = r[np.isfinite(r)]
    if r.size == 0:
        return "unknown (no finite sharpness ratio)", float("nan"), float("nan")
    late = float(np.median(r[-max(1, r.size // 4) :]))
    mx = float(r.max())
    if late > 1.15:
        return "unstable", mx, late
    if mx >= 0.95 and 0.85 <= late <= 1.15:
        return "edge of stability", mx, late
    if mx > 1.0:
        return "stable after crossing", mx, late
    return "stable", mx, late


def curvature_stage(cfg: ExperimentConfig, tmap, batch, results):
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
                mv, p.shape[0], num_probes=max(2, c.trace_probes), key=key, dtype=p.dtype
            )
            out["trace"] = (tr.estimate, tr.stderr)
        if m:
            d = density_estimate(
                mv, p.shape[0], num_matvecs=m, num_runs=c.density_runs, key=key, dtype=p.dtype
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
    verdicts, maxr, later = [], [], []
    for r in refs:
        v, mx, late = verdict(results.records["sharpness_ratio"][r], int(results.diverged_step[r]))
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
        },
        coords={**group_coords(batch, refs), "when": np.asarray(when, dtype=str)},
        attrs={"k": c.k, "operator": c.operator, "mode": c.mode, "rule": VERDICT_RULE},
    )


def curvature_markdown(ds: xr.Dataset, results) -> list[str]:
    lines = [
        "## Curvature and the edge of stability",
        "",
        f"Top-{ds.attrs['k']} eigenvalues of the {ds.attrs['operator']} operator ({ds.attrs['mode']} "
        "loss) tracked at every record with warm-started block Krylov; threshold = the "
        "optimizer's stability threshold (GD 2/η). Rotation: median 1 − |⟨v1(t), v1(t+Δ)⟩| "
        "between records. Trace: Hutchinson ± stderr at the start → end.",
        "",
        VERDICT_RULE,
        "",
        "| η | seed | threshold | λ1 start | λ1 end | max λ1/thr | late λ1/thr | rotation | trace start → end | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in range(ds.sizes["group"]):
        r = int(ds["reference"].values[g])
        sh = results.records["sharpness"][r, :, 0]
        thr = results.records["threshold"][r]
        rot = results.records["rotation"][r]
        fin = sh[np.isfinite(sh)]
        tr = ds["trace"].values[g]
        lines.append(
            f"| {float(ds['learning_rate'].values[g]):.4g} | {int(ds['seed'].values[g])} | "
            f"{fmt(float(np.nanmax(thr)) if np.isfinite(thr).any() else np.nan)} | {fmt(float(sh[0]))} | "
            f"{fmt(float(fin[-1]) if fin.size else np.nan)} | {fmt(float(ds['max_ratio'].values[g]), '.2f')} | "
            f"{fmt(float(ds['late_ratio'].values[g]), '.2f')} | "
            f"{fmt(finite_median(rot), '.2e')} | "
            f"{fmt(tr[0])} → {fmt(tr[1])} | {ds['verdict'].values[g]} |"
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


def _sign(mean: float, err: float) -> str:
    if not np.isfinite(mean):
        return "n/a"
    if not np.isfinite(err):
        err = 0.0
    if mean - 3 * err > 0:
        return "> 0"
    if mean + 3 * err < 0:
        return "< 0"
    return "≈ 0"


def lyapunov_rows(ds: xr.Dataset) -> list[dict]:
    """Per learning rate (mean over seeds): λ1 ± stderr, the spectrum, per ηt, the fit."""
    rows = []
    lrs = ds["learning_rate"].values
    for lr in np.unique(lrs):
        sel = lrs == lr
        ex = ds["exponents"].values[sel]
        se = ds["stderr"].values[sel]
        ok = np.isfinite(ex[:, 0])
        lam1 = float(ex[ok, 0].mean()) if ok.any() else float("nan")
        err1 = float(np.sqrt(np.nansum(se[ok, 0] ** 2)) / ok.sum()) if ok.any() else float("nan")
        slopes = ds["fit_slope"].values[sel]
        r2 = ds["fit_r2"].values[sel]
        rows.append(
            {
                "learning_rate": float(lr),
                "lambda1": lam1,
                "lambda1_stderr": err1,
                "lambda1_sign": _sign(lam1, err1),
                "lambda1_per_eta_t": lam1 / float(lr),
                "spectrum": ex[ok].mean(axis=0) if ok.any() else np.full(ex.shape[1], np.nan),
                "fit_slope": finite_median(slopes),
                "fit_r2": finite_median(r2),
                "n_valid": int(ok.sum()),
                "n": int(sel.sum()),
                "reasons": sorted({str(r) for r in ds["reason"].values[sel] if str(r)}),
            }
        )
    return rows


def lyapunov_markdown(ds: xr.Dataset) -> list[str]:
    a = ds.attrs
    lines = [
        "## Lyapunov exponents",
        "",
        f"Tangent-space (QR) exponents of each reference run over {a['steps']} steps from t = "
        f"{a['t_start']} (k = {a['k']}, QR every {a['renorm_every']} step(s)), per step; mean over "
        "seeds ± standard error (batch means). Sign: λ1 beyond 3 standard errors of 0. "
        "Fit: Danovski et al.'s best-window exponential fit of the perturbed replicas' mean L1 "
        "distance (slope per step, median over seeds).",
        "",
        "| η | λ1 ± se | sign | λ1 / η | top-k spectrum | fit slope | fit R² | valid |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in lyapunov_rows(ds):
        spec = ", ".join(fmt(v, ".3g") for v in r["spectrum"])
        lines.append(
            f"| {r['learning_rate']:.4g} | {fmt(r['lambda1'], '.3g')} ± {fmt(r['lambda1_stderr'], '.1g')} | "
            f"{r['lambda1_sign']} | {fmt(r['lambda1_per_eta_t'], '.3g')} | {spec} | "
            f"{fmt(r['fit_slope'], '.3g')} | {fmt(r['fit_r2'], '.3f')} | {r['n_valid']}/{r['n']} |"
        )
        for reason in r["reasons"]:
            notes.append(f"- η = {r['learning_rate']:.4g}: NaN because {reason}")
    if notes:
        lines += ["", *notes]
    lines += ["", "![spectrum](figures/spectrum.png)", "", "![FTLE](figures/ftle.png)", ""]
    return lines


def lyapunov_figures(ds: xr.Dataset, folder: Path) -> None:
    from chaosjax import plots

    plots.save(plots.spectrum_by(ds).figure, folder / "spectrum.png")
    plots.save(plots.ftle_series(ds).figure, folder / "ftle.png")


__all__ = [
    "lyapunov_figures",
    "lyapunov_markdown",
    "lyapunov_rows",
    "lyapunov_stage",
    "reference_groups",
]
