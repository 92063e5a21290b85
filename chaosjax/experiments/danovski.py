"""Stages of Danovski, Soriano, Lacasa (2024): loss-series diagnostics per seed, divergence
fits per ε with their acceptance rule, and the marginal-stability test on states taken from the
recorded run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from chaosjax._util import finite_median, fmt
from chaosjax.experiments._sections import BaseConfig
from chaosjax.experiments.analyses import group_coords, reference_groups
from chaosjax.experiments.stats import STALLED_RTOL, finite_prefix, over_seeds
from chaosjax.experiments.tables import table_head

# ---------------------------------------------------------------------------------------------
# loss-series diagnostics


def series_stage(cfg: BaseConfig, batch, results) -> xr.Dataset:
    """Series diagnostics of each reference run's recorded training loss."""
    from chaosjax import series

    c = cfg.series
    refs = reference_groups(batch)
    keys = [
        "frac_increasing",
        "n_spikes",
        "max_spike",
        "k01",
        "acf1",
        "acf1_low",
        "acf1_high",
        "n_laminar",
        "mean_laminar",
        "max_laminar",
        "laminar_fraction",
        "expansion_rate",
        "expansion_r2",
        "expansion_p",
        "expanding",
    ]
    vals = {k: np.full(len(refs), np.nan) for k in keys}
    max_lag = c.max_lag
    acf = np.full((len(refs), max_lag + 1), np.nan)
    low, high = np.full_like(acf, np.nan), np.full_like(acf, np.nan)
    start_idx = int(np.searchsorted(results.steps, c.start))
    # a frozen series reads as chaos in the 0–1 test: refuse below the run's round-off
    rtol = max(1e-8, 10 * float(np.finfo(np.dtype(results.attrs.get("dtype", "float64"))).eps))
    k01_reason = [""] * len(refs)
    exp_reason = [""] * len(refs)
    for g, r in enumerate(refs):
        # every column on one window: the records from series.start on
        x = finite_prefix(results.records["loss"][r])[start_idx:]
        if x.size < 30:
            k01_reason[g] = exp_reason[g] = f"the window holds {x.size} records (fewer than 30)"
            continue
        vals["frac_increasing"][g] = series.fraction_increasing(x)
        ep = series.spikes(x, factor=c.spike_factor)
        vals["n_spikes"][g] = len(ep)
        vals["max_spike"][g] = float(ep.height.max()) if len(ep) else np.nan
        k01_reason[g] = series.negligible_variation(x, rtol) or _stalled_reason(x)
        vals["k01"][g] = np.nan if k01_reason[g] else series.zero_one_test(x, rtol=rtol)
        tail = x
        if tail.size >= 10:
            a = series.autocorrelation(tail, max_lag, n_surrogates=c.n_surrogates, seed=int(r))
            n = a.acf.size
            acf[g, :n], low[g, :n], high[g, :n] = a.acf, a.low, a.high
            vals["acf1"][g], vals["acf1_low"][g], vals["acf1_high"][g] = (
                a.acf[1],
                a.low[1],
                a.high[1],
            )
            st = series.laminar_segments(tail, min_length=c.laminar_min_length).stats()
            for k in ("n_laminar", "mean_laminar", "max_laminar", "laminar_fraction"):
                vals[k][g] = st[k]
        if x.size > 40:
            er = series.expansion_rate(
                x, e=c.analogue_e, m_range=range(5, min(26, x.size // 2)), dt=cfg.record_every
            )
            vals["expansion_rate"][g], vals["expansion_r2"][g] = er.slope, er.r2
            vals["expansion_p"][g], vals["expanding"][g] = er.pvalue, float(er.expanding)
            exp_reason[g] = er.reason
    data = {k: (("group",), v) for k, v in vals.items()}
    data.update(
        {
            "k01_reason": (("group",), np.asarray(k01_reason, dtype=str)),
            "expansion_reason": (("group",), np.asarray(exp_reason, dtype=str)),
            "acf": (("group", "lag"), acf),
            "acf_low": (("group", "lag"), low),
            "acf_high": (("group", "lag"), high),
        }
    )
    return xr.Dataset(
        data,
        coords={**group_coords(batch, refs), "lag": np.arange(max_lag + 1)},
        attrs={
            "start": c.start,
            "record_every": cfg.record_every,
            "spike_factor": c.spike_factor,
            "analogue_e": c.analogue_e,
            "laminar_min_length": c.laminar_min_length,
            "k01_rtol": rtol,
        },
    )


def _stalled_reason(x: np.ndarray) -> str:
    """Why the 0–1 test does not apply to a stalled loss ('' when it does): over the window the
    loss moves by less than :data:`STALLED_RTOL` of its level — a plateau whose tiny round-off-
    scale wandering the test reads as chaos (K ≈ 1)."""
    level = max(abs(float(np.median(x))), np.finfo(np.float64).tiny)
    spread = float(np.ptp(x))
    if spread < STALLED_RTOL * level:
        return (
            f"the loss has stalled: it moves by {spread / level:.1e} of its level over the window "
            f"(below {STALLED_RTOL:g}), where the test reads round-off-scale wandering as chaos"
        )
    return ""


def series_markdown(ds: xr.Dataset) -> list[str]:
    a = ds.attrs
    lines = [
        "## Loss-series diagnostics (per seed)",
        "",
        f"On each reference run's loss recorded every {a['record_every']} step(s), every column "
        f"on one window (the records from step {a['start']} on): share of "
        f"increasing records; spikes above {a['spike_factor']:g}× the running minimum (largest "
        "ratio); the 0–1 test K (≈ 0 regular, ≈ 1 chaotic); lag-1 autocorrelation "
        "with the 3rd–97th percentile band of shuffled surrogates; laminar phases "
        f"(|Δloss| ≤ 1% of its std for ≥ {a['laminar_min_length']} records) as count, mean and max "
        f"length and share of time; expansion rate by the method of analogues (e = {a['analogue_e']:g}; "
        "detrended, Theiler window of the largest horizon, analogues moving the same way) per "
        "step with its p-value. The 0–1 test is not applied (n/a) to a series whose variation is "
        f"below {a.get('k01_rtol', 1e-8):.1g} of its level (frozen, or round-off), nor to a "
        f"stalled loss (range over the window below {STALLED_RTOL:g} of its level).",
        "",
        *table_head(
            "η",
            "seed",
            "increasing",
            "spikes (max ×)",
            "0–1 K",
            "ACF(1) [band]",
            "laminar n / mean / max / share",
            "expansion rate (p)",
        ),
    ]
    notes = []
    for g in range(ds.sizes["group"]):
        v = {
            k: float(ds[k].values[g])
            for k in ds.data_vars
            if ds[k].dims == ("group",) and not k.endswith("reason")
        }
        where = f"η = {float(ds['learning_rate'].values[g]):.4g}, seed {int(ds['seed'].values[g])}"
        for key, what in (("k01_reason", "0–1 test"), ("expansion_reason", "expansion rate")):
            if key in ds and str(ds[key].values[g]):
                notes.append(f"- {where}: {what} n/a because {ds[key].values[g]}")
        lines.append(
            f"| {float(ds['learning_rate'].values[g]):.4g} | {int(ds['seed'].values[g])} | "
            f"{fmt(v['frac_increasing'], '.2f')} | {fmt(v['n_spikes'], '.0f')} ({fmt(v['max_spike'], '.2g')}) | "
            f"{fmt(v['k01'], '.2f')} | {fmt(v['acf1'], '.2f')} [{fmt(v['acf1_low'], '.2f')}, {fmt(v['acf1_high'], '.2f')}] | "
            f"{fmt(v['n_laminar'], '.0f')} / {fmt(v['mean_laminar'], '.1f')} / {fmt(v['max_laminar'], '.0f')} / "
            f"{fmt(v['laminar_fraction'], '.2f')} | {fmt(v['expansion_rate'], '.3g')} ({fmt(v['expansion_p'], '.1g')}) |"
        )
    if notes:
        lines += ["", *notes]
    return [*lines, "", "![ACF](figures/acf.png)", ""]


def series_figures(ds: xr.Dataset, folder: Path) -> None:
    import matplotlib.pyplot as plt

    from chaosjax import plots

    n = ds.sizes["group"]
    cols = min(n, 5)
    rows = -(-n // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.0 * cols + 0.6, 2.6 * rows + 0.4), squeeze=False, sharey=True
    )
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    for g, ax in enumerate(axes.ravel()[:n]):
        lag = ds["lag"].values
        ax.fill_between(
            lag,
            ds["acf_low"].values[g],
            ds["acf_high"].values[g],
            color="0.85",
            label="surrogates 3–97%",
        )
        ax.plot(lag, ds["acf"].values[g], color="C0", lw=1.0, label="ACF")
        ax.set_title(
            f"η = {float(ds['learning_rate'].values[g]):g}, seed {int(ds['seed'].values[g])}",
            fontsize=8,
        )
        ax.set_xlabel("lag (records)")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("loss autocorrelation")
    axes[0][0].legend(fontsize=7)
    plots.save(fig, folder / "acf.png")


# ---------------------------------------------------------------------------------------------
# divergence fits per ε


def divergence_stage(cfg: BaseConfig, batch, results) -> xr.Dataset:
    """Best-window fit of the mean L1 distance for every (reference run, ε), with acceptance."""
    from chaosjax.lyapunov import best_window_fit

    ly, c = cfg.lyapunov, cfg.divergence
    refs = reference_groups(batch)
    eps_vals = np.unique(np.asarray(batch.coords["eps"])[np.asarray(batch.coords["member"]) > 0])
    starts = range(ly.fit_starts[0], ly.fit_starts[1] + 1, ly.fit_starts[2])
    widths = range(ly.fit_widths[0], ly.fit_widths[1] + 1, ly.fit_widths[2])
    shape = (len(refs), len(eps_vals))
    slope, r2 = np.full(shape, np.nan), np.full(shape, np.nan)
    growth = np.full(shape, np.nan)
    points = np.zeros(shape, np.int64)
    accepted = np.zeros(shape, bool)
    ref_of = np.asarray(results.coords["reference"])
    eps_of = np.asarray(results.coords["eps"])
    for g, r in enumerate(refs):
        for e, eps in enumerate(eps_vals):
            sel = (
                (ref_of == r) & np.isclose(eps_of, eps) & (np.asarray(results.coords["member"]) > 0)
            )
            if not sel.any():
                continue
            d = results.records["distance_l1"][sel]
            f = best_window_fit(
                results.steps_of("distance_l1"),
                d,
                starts=starts,
                widths=widths,
                min_r2=c.min_r2,
                min_slope=c.min_slope,
            )
            slope[g, e], r2[g, e], points[g, e] = f.slope, f.r2, f.n_points
            accepted[g, e] = f.accepted
            m = np.nanmean(d, axis=0)
            if np.isfinite(m).any() and m[0] > 0:
                growth[g, e] = float(np.nanmax(m) / m[0])
    return xr.Dataset(
        {
            "slope": (("group", "eps"), slope),
            "r2": (("group", "eps"), r2),
            "accepted": (("group", "eps"), accepted.astype(np.int8)),
            "points": (("group", "eps"), points),
            "max_growth": (("group", "eps"), growth),
        },
        coords={**group_coords(batch, refs), "eps": eps_vals},
        attrs={"min_r2": c.min_r2, "min_slope": c.min_slope, "histogram_eps": c.histogram_eps},
    )


def divergence_markdown(ds: xr.Dataset) -> list[str]:
    a = ds.attrs
    lines = [
        "## Replica divergence against ε",
        "",
        "For every initialisation, η and ε: Danovski et al.'s best-window fit of ln of the mean L1 "
        f"distance of its perturbed replicas. Accepted when the window holds at least 10 points, "
        f"R² > {a['min_r2']:g} and slope > {a['min_slope']:g} per step; mean ± standard error over "
        "the accepted initialisations (accepted n/N: initialisations). Growth: largest mean "
        "distance over the initial one (median over initialisations).",
        "",
        *table_head("η", "ε", "accepted", "slope mean ± se (per step)", "median max growth"),
    ]
    lrs = ds["learning_rate"].values
    for lr in np.unique(lrs):
        sel = lrs == lr
        for e, eps in enumerate(ds["eps"].values):
            acc = ds["accepted"].values[sel, e].astype(bool)
            s = over_seeds(ds["slope"].values[sel, e][acc])
            gr = ds["max_growth"].values[sel, e]
            med = finite_median(gr)
            lines.append(
                f"| {lr:.4g} | {eps:.0e} | {acc.sum()}/{sel.sum()} | {fmt(s.mean)} ± {fmt(s.sem, '.2g')} | {fmt(med, '.3g')} |"
            )
    return [*lines, "", "![slope against ε](figures/divergence_eps.png)", ""]


def divergence_figures(ds: xr.Dataset, folder: Path) -> None:
    import matplotlib.pyplot as plt

    from chaosjax import plots

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    lrs = ds["learning_rate"].values
    eps = ds["eps"].values
    target = int(np.argmin(np.abs(np.log(eps) - np.log(ds.attrs["histogram_eps"]))))
    for i, lr in enumerate(np.unique(lrs)):
        sel = lrs == lr
        acc = ds["accepted"].values[sel].astype(bool)
        s = np.where(acc, ds["slope"].values[sel], np.nan)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                m, sd = np.nanmean(s, axis=0), np.nanstd(s, axis=0)
        ax.errorbar(
            eps, m, yerr=sd, marker="o", ms=3, capsize=2, color=f"C{i}", label=f"η = {lr:g}"
        )
        h = s[:, target]
        h = h[np.isfinite(h)]
        if h.size:
            bx.hist(h, bins=10, alpha=0.6, color=f"C{i}", label=f"η = {lr:g}")
    ax.set_xscale("log")
    ax.set_xlabel("perturbation size ε")
    ax.set_ylabel("accepted best-window slope (per step)")
    ax.set_title("replica exponent against ε")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    bx.set_xlabel(f"slope at ε = {eps[target]:.0e}")
    bx.set_ylabel("initialisations")
    bx.set_title("histogram of accepted slopes")
    if bx.get_legend_handles_labels()[0]:
        bx.legend(fontsize=7)
    plots.save(fig, folder / "divergence_eps.png")


# ---------------------------------------------------------------------------------------------
# marginal stability


def marginal_snapshots(cfg: BaseConfig):
    """The observer that keeps each reference run's state where the marginal test perturbs it
    (``before_end`` steps before the end): the state of the recorded run, not a re-run."""
    from chaosjax.observers import StateSnapshots

    return StateSnapshots(at=(cfg.steps - cfg.marginal.before_end,), name="marginal_state")


def marginal_stage(cfg: BaseConfig, tmap, batch, results, progress: bool) -> xr.Dataset:
    """Perturb each reference run's recorded state `before_end` steps before the end and train
    the perturbed copies on next to an unperturbed continuation."""
    import jax.numpy as jnp

    from chaosjax.replicas import make_replicas, run_replicas

    c = cfg.marginal
    refs = reference_groups(batch)
    t_pert = cfg.steps - c.before_end
    eps = np.asarray(c.eps, np.float64)
    ratio_end = np.full((len(refs), eps.size), np.nan)
    ratio_max = np.full_like(ratio_end, np.nan)
    ratio_min = np.full_like(ratio_end, np.nan)
    every = max(1, c.before_end // 50)
    every = next(d for d in range(every, 0, -1) if c.before_end % d == 0)
    kept = results.records["marginal_state"][:, 0]
    for g, r in enumerate(refs):
        if 0 <= results.diverged_step[r] <= t_pert or not np.isfinite(kept[r]).all():
            continue
        hp = {k: v[r : r + 1] for k, v in batch.hparams.items()}
        tm_g = tmap.replace(**{k: float(v[0]) for k, v in hp.items()})
        rb = make_replicas(
            tm_g,
            base=jnp.asarray(kept[r], tmap.state_dtype),
            n_perturbed=c.n_perturbed,
            eps=list(eps),
            distribution=cfg.replicas.distribution,
            target=cfg.replicas.target,
        )
        post = run_replicas(
            tm_g,
            rb,
            steps=c.before_end,
            record_every=every,
            t0=t_pert,
            observables=("distance_l1",),
            progress=False,
        )
        for e, ev in enumerate(eps):
            sel = np.isclose(post.coords["eps"], ev) & (post.coords["member"] > 0)
            d = post.records["distance_l1"][sel]
            rel = d / d[:, :1]
            with np.errstate(divide="ignore", invalid="ignore"):
                lg = np.log(rel)
            ratio_end[g, e] = float(np.exp(np.nanmean(lg[:, -1])))
            ratio_max[g, e] = float(np.exp(np.nanmax(np.nanmean(lg, axis=0))))
            ratio_min[g, e] = float(np.exp(np.nanmin(np.nanmean(lg, axis=0))))
    return xr.Dataset(
        {
            "ratio_end": (("group", "eps"), ratio_end),
            "ratio_max": (("group", "eps"), ratio_max),
            "ratio_min": (("group", "eps"), ratio_min),
        },
        coords={**group_coords(batch, refs), "eps": eps},
        attrs={"before_end": c.before_end, "t_perturb": t_pert, "n_perturbed": c.n_perturbed},
    )


def marginal_markdown(ds: xr.Dataset) -> list[str]:
    a = ds.attrs
    lines = [
        "## Marginal stability at the trained state",
        "",
        f"Each reference run's recorded state at step {a['t_perturb']} ({a['before_end']} steps "
        f"before the end) was perturbed ({a['n_perturbed']} copies per ε) and trained on; d(t)/d(0) is the L1 "
        "distance to the unperturbed continuation relative to its start (geometric mean over "
        "copies, median over initialisations). Values near 1: perturbations neither grow nor decay.",
        "",
        *table_head("η", "ε", "d(end)/d(0)", "min over time", "max over time"),
    ]
    lrs = ds["learning_rate"].values
    for lr in np.unique(lrs):
        sel = lrs == lr
        for e, eps in enumerate(ds["eps"].values):

            def med(name, sel=sel, e=e):
                return finite_median(ds[name].values[sel, e])

            lines.append(
                f"| {lr:.4g} | {eps:.0e} | {fmt(med('ratio_end'))} | {fmt(med('ratio_min'))} | {fmt(med('ratio_max'))} |"
            )
    return [*lines, ""]
