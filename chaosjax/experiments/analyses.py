"""Analysis stages of a run, each producing an ``xarray.Dataset`` stored as a group of
``results.zarr``, plus the summary rows and figures derived from it.

The Lyapunov and CLV stages live here; the curvature stage in
:mod:`chaosjax.experiments._curvature_stage` and the shared pieces (reference runs, regime rules)
in :mod:`chaosjax.experiments._analysis_base`, both re-exported; the protocol stages have one
module per study.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from chaosjax._util import fmt

# re-exported from here, where they were before the split (noqa: those this module does not use)
from chaosjax.experiments._analysis_base import (
    REGIME_RULE,
    SIGN_RULE,
    group_coords,
    learning_rate_labels,  # noqa: F401
    reference_groups,
    regime,
    sign_of,
    tangent_tracker,
)
from chaosjax.experiments._curvature_stage import (  # noqa: F401
    VERDICT_RULE,
    converged_ratio,
    curvature_figures,
    curvature_markdown,
    curvature_stage,
    curvature_tracker,
    ftle_regime,
    verdict,
)
from chaosjax.experiments._sections import BaseConfig
from chaosjax.experiments.stats import STALLED_RTOL, over_seeds, seeds_cell
from chaosjax.experiments.tables import table_head

ORBIT_RULE = (
    "From the last lyapunov.period_window states of each reference run (orbits.PeriodTracker: "
    "the smallest k with ‖x_{t+k} − x_t‖ ≤ 1e-7·max‖x‖ over the window, two cycles at least, "
    "on 8 random projections of the state): *dead plateau* = a final training loss within "
    "0.1 % of the loss of the best constant output (the class-prior entropy for "
    f"cross-entropy) that has stalled (its range over the last quarter of records below {STALLED_RTOL:g} "
    "of its level: a vanishing gradient, the weights may still creep); *frozen (fixed point)* "
    "= any other fixed point; *periodic (period k)* = a k-cycle, k ≥ 2. Precedence across the "
    "summary: dead plateau > frozen > periodic > the FTLE regimes."
)


def period_tracker(cfg: BaseConfig) -> list:
    """The period observer of the lyapunov stage (none with ``lyapunov.period_window = 0``)."""
    from chaosjax.orbits import PeriodTracker

    w = min(int(cfg.lyapunov.period_window), int(cfg.steps))
    return [PeriodTracker(window=w, rows="references", max_period=w // 2)] if w >= 2 else []


def orbit_labels(tmap, results, refs) -> dict:
    """``period`` (group,): the last recorded period of each reference run (NaN unrecorded),
    and ``dead`` (group,): 1 for a fixed point at the constant-output loss, by
    :data:`ORBIT_RULE`."""
    rec = results.records.get("period")
    period = np.full(len(refs), np.nan) if rec is None else np.asarray(rec)[refs, -1]
    level = float(getattr(tmap, "constant_loss", float("nan")))
    loss = results.records.get("loss")
    dead = np.zeros(len(refs), np.int8)
    if loss is not None and np.isfinite(level):
        tail = np.asarray(loss)[refs][:, -max(2, np.shape(loss)[1] // 4) :]
        end = tail[:, -1]
        at_level = np.abs(end - level) <= 1e-3 * max(abs(level), 1e-300)
        with np.errstate(invalid="ignore"):
            stalled = np.ptp(tail, axis=1) <= STALLED_RTOL * np.abs(end)
        dead = (at_level & stalled).astype(np.int8)
    return {"period": (("group",), period), "dead": (("group",), dead)}


def lyapunov_stage(cfg: BaseConfig, tmap, batch, results):
    """Top-k spectrum, FTLEs, regimes and the replica-distance fit of every reference run, from
    the tangents the run carried along its recorded trajectory."""
    from chaosjax.lyapunov import LyapunovResult, _reasons, best_window_fit

    ly, dv = cfg.lyapunov, cfg.divergence
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
    window = min(ly.ftle_window, steps - steps % ly.renorm_every)
    window -= window % ly.renorm_every
    ftle = res.ftle(window)
    regimes = [
        regime(ftle[g, :, 0], window, int(results.diverged_step[r])) for g, r in enumerate(refs)
    ]
    # exponents per unit ηt: Σ log growth / Σ η_t over the steps (η at each step)
    per_eta = np.full_like(res.exponents, np.nan)
    eta_reason = ""
    t_steps = np.arange(t_start, stop)
    for g, r in enumerate(refs):
        hp = {k: v[r] for k, v in batch.hparams.items()}
        eta, eta_reason = tmap.learning_rates(t_steps, hp)
        if eta is not None:
            per_eta[g] = lg[g].sum(axis=0) / eta.sum()
    # replica-distance fit per group (Danovski et al.)
    starts = range(ly.fit_starts[0], ly.fit_starts[1] + 1, ly.fit_starts[2])
    widths = range(ly.fit_widths[0], ly.fit_widths[1] + 1, ly.fit_widths[2])
    fits = []
    member = np.asarray(results.coords["member"])
    eps_of = np.asarray(results.coords["eps"], np.float64)
    fit_eps = float("nan")
    if (member > 0).any():  # one ε: the mean distance of mixed ε is the largest ε's
        grid = np.unique(eps_of[member > 0])
        fit_eps = float(grid[np.argmin(np.abs(np.log(grid) - np.log(dv.histogram_eps)))])
    for r in refs:
        pert = (
            (np.asarray(results.coords["reference"]) == r)
            & (member > 0)
            & np.isclose(eps_of, fit_eps, rtol=1e-9, atol=0.0)
        )
        if "distance_l1" in results.records and pert.any():
            fits.append(
                best_window_fit(
                    results.steps_of("distance_l1"),
                    results.records["distance_l1"][pert],
                    starts=starts,
                    widths=widths,
                    min_r2=dv.min_r2,
                    min_slope=dv.min_slope,
                )
            )
        else:
            fits.append(None)
    nan = float("nan")
    data = {
        "exponents": (("group", "exponent"), res.exponents),
        "stderr": (("group", "exponent"), res.stderr),
        "per_eta_t": (("group", "exponent"), per_eta),
        "ftle": (("group", "window", "exponent"), ftle),
        "running_lambda1": (("group", "renorm"), res.running[..., 0]),
        "regime": (("group",), np.asarray(regimes, dtype=str)),
        "fit_slope": (("group",), [f.slope if f else nan for f in fits]),
        "fit_r2": (("group",), [f.r2 if f else nan for f in fits]),
        "fit_intercept": (("group",), [f.intercept if f else nan for f in fits]),
        "fit_start": (("group",), [f.start if f else -1 for f in fits]),
        "fit_stop": (("group",), [f.stop if f else -1 for f in fits]),
        "fit_points": (("group",), [f.n_points if f else 0 for f in fits]),
        "fit_accepted": (("group",), np.asarray([bool(f and f.accepted) for f in fits], np.int8)),
        "fit_reason": (
            ("group",),
            np.asarray([(f.reason if f else "no perturbed replicas") for f in fits], dtype=str),
        ),
        "reason": (("group",), np.asarray(reasons, dtype=str)),
    }
    if "tangent_loss" in results.records:  # the loss of the trajectory the tangents followed
        data["loss"] = (("group", "step"), results.records["tangent_loss"][refs])
    data.update(orbit_labels(tmap, results, refs))
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
            "per_eta_t_reason": eta_reason,
            "regime_rule": REGIME_RULE,
            "orbit_rule": ORBIT_RULE,
            "sign_rule": SIGN_RULE,
            "min_r2": dv.min_r2,
            "min_slope": dv.min_slope,
            "fit_eps": fit_eps,
        },
    )


def clv_stage(cfg: BaseConfig, tmap, batch, results):
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
        return hessian_eigs(loss, p, k_h, n_matvecs=m).eigenvectors

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
        *table_head(
            "η",
            "CLV exponents (per step)",
            "median min angle (°)",
            "5th pct (°)",
            "near-tangent steps",
            "CLV 1 mass by part",
            "Hessian overlap",
        ),
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


def lyapunov_rows(ds: xr.Dataset) -> list[dict]:
    """Per learning rate: λ1 over seeds (mean, standard error, per seed) and its sign by
    :data:`SIGN_RULE`, the spectrum, per ηt, early and late FTLEs and regimes per seed, and
    the accepted fits."""
    rows = []
    lrs = ds["learning_rate"].values
    steps = int(ds.attrs["steps"])
    for lr in np.unique(lrs):
        sel = lrs == lr
        ex = ds["exponents"].values[sel]
        ftle = ds["ftle"].values[sel][..., 0]
        accepted = ds["fit_accepted"].values[sel].astype(bool)
        slopes = ds["fit_slope"].values[sel]
        rows.append(
            {
                "learning_rate": float(lr),
                "seeds": ds["seed"].values[sel],
                "lambda1": ex[:, 0],
                "lambda1_sign": sign_of(ex[:, 0], steps),
                "lambda1_T": over_seeds(ex[:, 0]).mean * steps,
                "per_eta_t": ds["per_eta_t"].values[sel][:, 0],
                "spectrum": np.nanmean(ex, axis=0) if np.isfinite(ex).any() else ex[0],
                "early": ftle[:, 0] if ftle.shape[1] else np.full(sel.sum(), np.nan),
                "late": ftle[:, -1] if ftle.shape[1] else np.full(sel.sum(), np.nan),
                "regimes": [str(x) for x in ds["regime"].values[sel]],
                "fit_accepted": int(accepted.sum()),
                "fit_n": int(sel.sum()),
                "fit_slope": slopes[accepted],
                "fit_points": ds["fit_points"].values[sel],
                "fit_reasons": sorted({str(r) for r in ds["fit_reason"].values[sel] if str(r)}),
                "reasons": sorted({str(r) for r in ds["reason"].values[sel] if str(r)}),
            }
        )
    return rows


def lyapunov_markdown(ds: xr.Dataset) -> list[str]:
    a = ds.attrs
    w = a["ftle_window"]
    lines = [
        "## Lyapunov exponents",
        "",
        f"Tangent-space (QR) exponents of each reference run, from the tangents the run carried "
        f"along its recorded trajectory, over {a['steps']} steps from t = {a['t_start']} "
        f"(k = {a['k']}, QR every {a['renorm_every']} step(s)), per step. λ1: mean ± standard "
        f"error over seeds, each seed in brackets. {a['sign_rule']} Per unit ηt: Σ log growth / "
        "Σ η_t with η at each step (schedules included).",
        "",
        *table_head(
            "η",
            "λ1 over seeds (per seed)",
            "λ1·T",
            "sign",
            "λ1 per unit ηt",
            "top-k spectrum (mean)",
        ),
    ]
    notes = []
    rows = lyapunov_rows(ds)
    for r in rows:
        spec = ", ".join(fmt(v, ".3g") for v in r["spectrum"])
        if np.any(np.diff(r["spectrum"]) > 0):  # QR exponents come out ordered once converged
            spec += " (not ordered: not converged)"
        lines.append(
            f"| {r['learning_rate']:.4g} | {seeds_cell(r['lambda1'], '.3g')} | "
            f"{fmt(r['lambda1_T'], '.3g')} | {r['lambda1_sign']} | "
            f"{seeds_cell(r['per_eta_t'], '.3g')} | {spec} |"
        )
        for reason in r["reasons"]:
            notes.append(f"- η = {r['learning_rate']:.4g}: λ NaN because {reason}")
    if a.get("per_eta_t_reason"):
        notes.append(f"- per unit ηt: n/a because {a['per_eta_t_reason']}")
    if notes:
        lines += ["", *notes]
    lines += [
        "",
        f"Finite-time λ1 over windows of {w} steps, per seed: the first (early) and the last "
        f"(late) window, and the FTLE regime. {a['regime_rule']}"
        + (f" End states (the regime table): {a['orbit_rule']}" if "orbit_rule" in a else ""),
        "",
        *table_head("η", "seed", "early FTLE", "late FTLE", "FTLE regime"),
    ]
    for r in rows:
        for seed, e, lt, reg in zip(r["seeds"], r["early"], r["late"], r["regimes"]):
            lines.append(
                f"| {r['learning_rate']:.4g} | {int(seed)} | {fmt(e, '.3g')} | {fmt(lt, '.3g')} | "
                f"{reg} |"
            )
    lines += [
        "",
        "Replica separation: Danovski et al.'s best-window exponential fit of the mean L1 "
        f"distance of the replicas perturbed by ε = {a.get('fit_eps', float('nan')):.0e} "
        f"(recorded every step); accepted when the window holds at "
        f"least 10 points, R² > {a['min_r2']:g} and slope > {a['min_slope']:g} per step. Slope: "
        "mean ± standard error over the accepted seeds.",
        "",
        *table_head("η", "accepted", "accepted slope (per step)", "points per best window"),
    ]
    fit_notes = []
    for r in rows:
        pts = r["fit_points"]
        lines.append(
            f"| {r['learning_rate']:.4g} | {r['fit_accepted']}/{r['fit_n']} | "
            f"{seeds_cell(r['fit_slope'], '.3g') if r['fit_accepted'] else 'n/a'} | "
            f"{int(pts.min()) if pts.size else 0}–{int(pts.max()) if pts.size else 0} |"
        )
        for reason in r["fit_reasons"]:
            fit_notes.append(f"- η = {r['learning_rate']:.4g}: no fit because {reason}")
    if fit_notes:
        lines += ["", *fit_notes]
    lines += ["", "![spectrum](figures/spectrum.png)", "", "![FTLE](figures/ftle.png)", ""]
    return lines


def lyapunov_figures(ds: xr.Dataset, folder: Path) -> None:
    from chaosjax import plots

    plots.save(plots.spectrum_by(ds).figure, folder / "spectrum.png")
    plots.save(plots.ftle_series(ds).figure, folder / "ftle.png")


__all__ = [
    "REGIME_RULE",
    "SIGN_RULE",
    "lyapunov_figures",
    "lyapunov_markdown",
    "lyapunov_rows",
    "lyapunov_stage",
    "reference_groups",
    "regime",
    "sign_of",
]
