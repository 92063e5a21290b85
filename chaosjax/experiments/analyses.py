"""Analysis stages of a run, each producing an ``xarray.Dataset`` stored as a group of
``results.zarr``, plus the summary rows and figures derived from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from chaosjax.experiments.config import ConfigError, ExperimentConfig


def reference_groups(batch) -> np.ndarray:
    """Indices of the reference replicas (member 0), one per (seed, grid point)."""
    return np.flatnonzero(np.asarray(batch.coords["member"]) == 0)


def lyapunov_stage(cfg: ExperimentConfig, tmap, batch, results, folder: Path, progress: bool):
    """Top-k spectrum, FTLEs and the replica-distance fit for every reference run."""

    from chaosjax.lyapunov import best_window_fit, lyapunov_spectrum

    ly = cfg.lyapunov
    if ly.k > tmap.dim:
        raise ConfigError(f"lyapunov.k: must be <= the state dimension {tmap.dim}, got {ly.k}")
    steps = ly.steps or cfg.steps
    refs = reference_groups(batch)
    states = batch.states[refs]
    hp = {k: v[refs] for k, v in batch.hparams.items()}
    res = lyapunov_spectrum(
        tmap.step_with,
        states,
        k=ly.k,
        steps=steps,
        warmup=ly.warmup,
        renorm_every=ly.renorm_every,
        batched=True,
        args=hp,
        progress=progress,
        chunk_steps=max(ly.renorm_every, 500 - 500 % ly.renorm_every),
        checkpoint=folder / "lyapunov_checkpoint.npz",
        resume=True,
    )
    lr = np.asarray(hp["learning_rate"], np.float64)
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
                    results.steps,
                    results.records["distance_l1"][pert],
                    starts=starts,
                    widths=widths,
                )
            )
        else:
            fits.append(None)
    nan = float("nan")
    reasons = res.reasons if isinstance(res.reasons, list) else [res.reasons]
    ds = xr.Dataset(
        {
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
            "reason": (("group",), np.asarray([r or "" for r in reasons], dtype=str)),
        },
        coords={
            "group": np.arange(len(refs)),
            "exponent": np.arange(1, ly.k + 1),
            "window_end": ("window", res.ftle_times(window)),
            "renorm_end": ("renorm", res.times),
            "reference": ("group", refs),
            "seed": ("group", np.asarray(batch.coords["seed"])[refs]),
            "learning_rate": ("group", lr),
        },
        attrs={
            "steps": steps,
            "k": ly.k,
            "renorm_every": ly.renorm_every,
            "warmup": ly.warmup,
            "ftle_window": window,
            "t_start": res.t_start,
        },
    )
    return ds


def clv_stage(cfg: ExperimentConfig, tmap, batch, progress: bool):
    """Covariant Lyapunov vectors of every reference run: exponents, angles, layer masses."""
    import math

    from chaosjax.clv import clv_layer_mass, covariant_lyapunov_vectors

    c = cfg.clv
    if c.k > tmap.dim:
        raise ConfigError(f"clv.k: must be <= the state dimension {tmap.dim}, got {c.k}")
    steps = c.steps or cfg.steps
    refs = reference_groups(batch)
    hp = {k: v[refs] for k, v in batch.hparams.items()}
    res = covariant_lyapunov_vectors(
        tmap.step_with,
        batch.states[refs],
        k=c.k,
        steps=steps,
        align=c.align,
        backward_transient=c.backward_transient,
        keep_every=c.keep_every or None,
        batched=True,
        args=hp,
        tangency_threshold=math.radians(c.tangency_deg),
        progress=progress,
        chunk_steps=500,
    )
    mass = clv_layer_mass(res.vectors, tmap.layers, tmap.n_params)
    names = list(mass)
    return xr.Dataset(
        {
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
        },
        coords={
            "group": np.arange(len(refs)),
            "exponent": np.arange(1, c.k + 1),
            "exponent2": np.arange(1, c.k + 1),
            "time_step": ("time", res.all_times),
            "kept_step": ("kept", res.times),
            "part": np.asarray(names, dtype=str),
            "seed": ("group", np.asarray(batch.coords["seed"])[refs]),
            "learning_rate": ("group", np.asarray(hp["learning_rate"], np.float64)),
        },
        attrs={
            "steps": steps,
            "k": c.k,
            "tangency_deg": c.tangency_deg,
            "backward_transient": c.backward_transient,
            "t_start": res.t_start,
        },
    )


def clv_markdown(ds: xr.Dataset) -> list[str]:
    def f(x, spec=".3g"):
        return "n/a" if not np.isfinite(x) else format(x, spec)

    a = ds.attrs
    lines = [
        "## Covariant Lyapunov vectors",
        "",
        f"Ginelli CLVs of each reference run over {a['steps']} steps (k = {a['k']}, backward "
        f"transient {a['backward_transient']} steps). Angles: the smallest angle between any two "
        f"CLVs at each step; near-tangency: below {a['tangency_deg']:g}°. Layer mass: share of "
        "CLV 1's squared norm per layer, averaged over kept times and seeds.",
        "",
        "| η | CLV exponents (per step) | median min angle (°) | 5th pct (°) | near-tangent steps | CLV 1 mass by part |",
        "|---|---|---|---|---|---|",
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
        mass = ", ".join(f"{p} {f(v, '.2f')}" for p, v in zip(parts, m))
        lines.append(
            f"| {lr:.4g} | {', '.join(f(v) for v in ex)} | {f(med, '.1f')} | {f(p5, '.1f')} | "
            f"{n_t}/{n_all} | {mass} |"
        )
    lines += ["", "![CLV angles](figures/clv_angles.png)", ""]
    return lines


def clv_figures(ds: xr.Dataset, folder: Path) -> None:
    from chaosjax import plots

    plots.save(plots.clv_angle_distribution(ds).figure, folder / "clv_angles.png")


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
                "fit_slope": float(np.nanmedian(slopes))
                if np.isfinite(slopes).any()
                else float("nan"),
                "fit_r2": float(np.nanmedian(r2)) if np.isfinite(r2).any() else float("nan"),
                "n_valid": int(ok.sum()),
                "n": int(sel.sum()),
                "reasons": sorted({str(r) for r in ds["reason"].values[sel] if str(r)}),
            }
        )
    return rows


def lyapunov_markdown(ds: xr.Dataset) -> list[str]:
    def f(x, spec=".3g"):
        return "n/a" if not np.isfinite(x) else format(x, spec)

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
        spec = ", ".join(f(v, ".3g") for v in r["spectrum"])
        lines.append(
            f"| {r['learning_rate']:.4g} | {f(r['lambda1'], '.3g')} ± {f(r['lambda1_stderr'], '.1g')} | "
            f"{r['lambda1_sign']} | {f(r['lambda1_per_eta_t'], '.3g')} | {spec} | "
            f"{f(r['fit_slope'], '.3g')} | {f(r['fit_r2'], '.3f')} | {r['n_valid']}/{r['n']} |"
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
