"""Protocol stages of the seed studies: loss-series diagnostics (per seed), divergence fits
per ε with Danovski et al.'s acceptance rule, the marginal-stability test, time to a target
accuracy, and the early-FTLE prediction of the final loss (Sharafi et al.). Each stage returns
an ``xarray.Dataset`` stored as a group of ``results.zarr``; each has a markdown renderer and
figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from chaosjax._util import finite_median, fmt
from chaosjax.experiments.analyses import group_coords, learning_rate_labels, reference_groups
from chaosjax.experiments.config import ExperimentConfig
from chaosjax.experiments.stats import over_seeds, seeds_cell
from chaosjax.experiments.tables import table_head


def _finite_prefix(x: np.ndarray) -> np.ndarray:
    bad = ~np.isfinite(x)
    return x[: int(np.argmax(bad))] if bad.any() else x


def _last_finite(x: np.ndarray) -> float:
    """The last value before the series stops being finite (NaN if it never was)."""
    p = _finite_prefix(np.asarray(x, np.float64))
    return float(p[-1]) if p.size else float("nan")


# ---------------------------------------------------------------------------------------------
# loss-series diagnostics


def series_stage(cfg: ExperimentConfig, batch, results) -> xr.Dataset:
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
        x = _finite_prefix(results.records["loss"][r])
        if x.size < 30:
            continue
        vals["frac_increasing"][g] = series.fraction_increasing(x)
        ep = series.spikes(x, factor=c.spike_factor)
        vals["n_spikes"][g] = len(ep)
        vals["max_spike"][g] = float(ep.height.max()) if len(ep) else np.nan
        vals["k01"][g] = series.zero_one_test(x, rtol=rtol)
        k01_reason[g] = series.negligible_variation(x, rtol)
        tail = x[start_idx:]
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


def series_markdown(ds: xr.Dataset) -> list[str]:
    a = ds.attrs
    lines = [
        "## Loss-series diagnostics (per seed)",
        "",
        f"On each reference run's loss recorded every {a['record_every']} step(s): share of "
        f"increasing records; spikes above {a['spike_factor']:g}× the running minimum (largest "
        "ratio); the 0–1 test K (≈ 0 regular, ≈ 1 chaotic); lag-1 autocorrelation from step "
        f"{a['start']} with the 3rd–97th percentile band of shuffled surrogates; laminar phases "
        f"(|Δloss| ≤ 1% of its std for ≥ {a['laminar_min_length']} records) as count, mean and max "
        f"length and share of time; expansion rate by the method of analogues (e = {a['analogue_e']:g}; "
        "detrended, Theiler window of the largest horizon, analogues moving the same way) per "
        "step with its p-value. The 0–1 test is not applied (n/a) to a series whose variation is "
        f"below {a.get('k01_rtol', 1e-8):.1g} of its level (frozen, or round-off).",
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


def divergence_stage(cfg: ExperimentConfig, batch, results) -> xr.Dataset:
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


def marginal_snapshots(cfg: ExperimentConfig):
    """The observer that keeps each reference run's state where the marginal test perturbs it
    (``before_end`` steps before the end): the state of the recorded run, not a re-run."""
    from chaosjax.observers import StateSnapshots

    return StateSnapshots(at=(cfg.steps - cfg.marginal.before_end,), name="marginal_state")


def marginal_stage(cfg: ExperimentConfig, tmap, batch, results, progress: bool) -> xr.Dataset:
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


# ---------------------------------------------------------------------------------------------
# time to a target accuracy


def target_stage(cfg: ExperimentConfig, batch, results) -> xr.Dataset:
    """First record step at which each reference run reaches the target test accuracy."""
    refs = reference_groups(batch)
    acc = results.records["test_accuracy"][refs]
    hit = acc >= cfg.target.test_accuracy
    first = np.where(hit.any(axis=1), results.steps[np.argmax(hit, axis=1)], np.nan).astype(float)
    final = np.array([_last_finite(a) for a in acc])
    return xr.Dataset(
        {"steps_to_target": (("group",), first), "final_test_accuracy": (("group",), final)},
        coords=group_coords(batch, refs),
        attrs={"target": cfg.target.test_accuracy},
    )


def target_markdown(ds: xr.Dataset, lyap: xr.Dataset | None, div: xr.Dataset | None) -> list[str]:
    lines = [
        "## Time to target accuracy against the onset of chaos",
        "",
        f"Steps until the reference run first reaches test accuracy {ds.attrs['target']:g} "
        "(median over seeds; n/a unless every seed reached it; reached: seeds), next to the "
        "chaos indicators of the same η: the tangent-space λ1 (mean ± standard error over seeds, "
        "each seed in brackets) and the initialisations with an accepted replica-divergence fit "
        "(at any ε). Final test accuracy: mean ± standard error over seeds.",
        "",
        *table_head(
            "η", "steps to target", "reached", "final test acc", "λ1 (per step)", "accepted fits"
        ),
    ]
    lrs = ds["learning_rate"].values
    best = None
    for lr in np.unique(lrs):
        sel = lrs == lr
        st = ds["steps_to_target"].values[sel]
        reached = np.isfinite(st)
        med = float(np.median(st[reached])) if reached.all() else float("nan")
        lam = "n/a"
        if lyap is not None:
            lam = seeds_cell(lyap["exponents"].values[lyap["learning_rate"].values == lr, 0])
        chaotic = "n/a"
        if div is not None:
            a = div["accepted"].values[div["learning_rate"].values == lr]
            chaotic = f"{int(a.any(axis=1).sum())}/{a.shape[0]}"
        fa = ds["final_test_accuracy"].values[sel]
        lines.append(
            f"| {lr:.4g} | {fmt(med, '.0f')} | {reached.sum()}/{sel.sum()} | {seeds_cell(fa, '.3f')} | {lam} | {chaotic} |"
        )
        if np.isfinite(med) and (best is None or med < best[1]):
            best = (lr, med)
    if best is not None:
        lines += ["", f"Fastest: η = {best[0]:g} ({best[1]:.0f} steps)."]
    return [*lines, ""]


# ---------------------------------------------------------------------------------------------
# early FTLE against final loss


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney), labels 1 = positive; NaN if one class."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (pos.size * neg.size))


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x)
    r = np.empty(x.size)
    r[order] = np.arange(x.size)
    return r


def prediction_stage(cfg: ExperimentConfig, batch, results, lyap: xr.Dataset) -> xr.Dataset:
    """Per η: Pearson and Spearman correlation of the early λ1 with the final training loss
    across initialisations, and the AUC of λ1 for 'final loss above the median'."""
    refs = reference_groups(batch)
    final = np.array([_last_finite(results.records["loss"][r]) for r in refs])
    lam = lyap["exponents"].values[:, 0]
    lrs = learning_rate_labels(batch)[refs]
    out = {k: [] for k in ("pearson", "spearman", "auc", "n")}
    uniq = np.unique(lrs)
    for lr in uniq:
        sel = (lrs == lr) & np.isfinite(final) & np.isfinite(lam)
        x, y = lam[sel], final[sel]
        out["n"].append(int(sel.sum()))
        if sel.sum() < 3 or np.std(x) == 0 or np.std(y) == 0:
            out["pearson"].append(np.nan)
            out["spearman"].append(np.nan)
            out["auc"].append(np.nan)
            continue
        out["pearson"].append(float(np.corrcoef(x, y)[0, 1]))
        out["spearman"].append(float(np.corrcoef(_rank(x), _rank(y))[0, 1]))
        out["auc"].append(_auc(x, (y > np.median(y)).astype(int)))
    return xr.Dataset(
        {k: (("lr",), np.asarray(v, float)) for k, v in out.items()}
        | {"early_lambda1": (("group",), lam), "final_loss": (("group",), final)},
        coords={"lr": uniq, **group_coords(batch, refs)},
        attrs={"early_steps": lyap.attrs["steps"]},
    )


def prediction_markdown(ds: xr.Dataset) -> list[str]:
    lines = [
        "## Early FTLE against the final loss",
        "",
        f"λ1 over the first {ds.attrs['early_steps']} steps (tangent space) of each initialisation "
        "against its final training loss: Pearson and Spearman correlation, and the AUC of λ1 as a "
        "score for 'final loss above the median' (0.5 = no information).",
        "",
        *table_head("η", "initialisations", "Pearson r", "Spearman ρ", "AUC"),
    ]
    for i, lr in enumerate(ds["lr"].values):
        lines.append(
            f"| {lr:.4g} | {int(ds['n'].values[i])} | {fmt(float(ds['pearson'].values[i]), '.2f')} | "
            f"{fmt(float(ds['spearman'].values[i]), '.2f')} | {fmt(float(ds['auc'].values[i]), '.2f')} |"
        )
    return [*lines, "", "![prediction](figures/prediction.png)", ""]


def prediction_figures(ds: xr.Dataset, folder: Path) -> None:
    import matplotlib.pyplot as plt

    from chaosjax import plots

    fig, ax = plt.subplots(figsize=(5.4, 4.0))
    lrs = ds["learning_rate"].values
    for i, lr in enumerate(np.unique(lrs)):
        sel = lrs == lr
        ax.scatter(
            ds["early_lambda1"].values[sel],
            ds["final_loss"].values[sel],
            s=14,
            color=f"C{i}",
            label=f"η = {lr:g}",
        )
    ax.set_yscale("log")
    ax.set_xlabel(f"early λ1 (first {ds.attrs['early_steps']} steps, per step)")
    ax.set_ylabel("final training loss")
    ax.set_title("early FTLE against final loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    plots.save(fig, folder / "prediction.png")


# ---------------------------------------------------------------------------------------------
# training response (Nakazato)


def response_stage(cfg: ExperimentConfig, tmap, batch, results) -> xr.Dataset:
    """Aging fit of the NTK amplitude, shape change, rank change and fragility per run."""
    import jax.numpy as jnp

    from chaosjax.response import fragility, power_law_fit

    refs = reference_groups(batch)
    keys = [
        "alpha",
        "alpha_r2",
        "amp_start",
        "amp_end",
        "shape_corr_end",
        "ntk_pr_start",
        "ntk_pr_end",
        "feature_pr_start",
        "feature_pr_end",
        "fragility_input",
        "fragility_weight",
    ]
    v = {k: np.full(len(refs), np.nan) for k in keys}
    x = tmap.data["x_train"][: cfg.response.n_probes]
    for g, r in enumerate(refs):
        amp = results.records["ntk_amplitude"][r]
        ok = np.isfinite(amp)
        fit = power_law_fit(results.steps[ok], amp[ok])
        v["alpha"][g], v["alpha_r2"][g] = fit.alpha, fit.r2
        v["amp_start"][g], v["amp_end"][g] = amp[0], _last_finite(amp)
        v["shape_corr_end"][g] = _last_finite(results.records["ntk_shape_corr"][r])
        for k in ("ntk_pr", "feature_pr"):
            v[f"{k}_start"][g] = results.records[k][r][0]
            v[f"{k}_end"][g] = _last_finite(results.records[k][r])
        if results.diverged_step[r] < 0:
            params = tmap.params(jnp.asarray(results.final_state[r]))
            fr = fragility(tmap._apply_fn, params, x, eps=cfg.response.fragility_eps)
            v["fragility_input"][g], v["fragility_weight"][g] = fr.input, fr.weight
    return xr.Dataset(
        {k: (("group",), a) for k, a in v.items()},
        coords=group_coords(batch, refs),
        attrs={
            "n_probes": cfg.response.n_probes,
            "batch_size": cfg.training.batch_size,
            "fragility_eps": cfg.response.fragility_eps,
        },
    )


def response_markdown(ds: xr.Dataset) -> list[str]:
    a = ds.attrs
    lines = [
        "## Training response (empirical NTK)",
        "",
        f"On the first {a['n_probes']} training inputs: NTK amplitude A(t) = ⟨Θ_t(x, x)⟩ from start to "
        "end and its aging exponent α of a power-law fit A ∝ t^−α (R²); correlation of the final "
        "kernel with the first one (shape change); participation ratio of the NTK Gram matrix and "
        "of the last hidden layer's features from start to end (feature-space size); fragility "
        f"at the end: mean ‖Δf‖ per unit input / weight perturbation of size {a['fragility_eps']:g}. "
        f"Batch: {a['batch_size'] or 'full'}.",
        "",
        *table_head(
            "η",
            "seed",
            "A start → end",
            "α (R²)",
            "shape corr",
            "NTK PR start → end",
            "feature PR start → end",
            "fragility input / weight",
        ),
    ]
    for g in range(ds.sizes["group"]):
        d = {k: float(ds[k].values[g]) for k in ds.data_vars}
        lines.append(
            f"| {float(ds['learning_rate'].values[g]):.4g} | {int(ds['seed'].values[g])} | "
            f"{fmt(d['amp_start'])} → {fmt(d['amp_end'])} | {fmt(d['alpha'], '.3f')} ({fmt(d['alpha_r2'], '.2f')}) | "
            f"{fmt(d['shape_corr_end'], '.3f')} | {fmt(d['ntk_pr_start'], '.2f')} → {fmt(d['ntk_pr_end'], '.2f')} | "
            f"{fmt(d['feature_pr_start'], '.2f')} → {fmt(d['feature_pr_end'], '.2f')} | "
            f"{fmt(d['fragility_input'])} / {fmt(d['fragility_weight'])} |"
        )
    return [*lines, "", "![NTK amplitude](figures/ntk_amplitude.png)", ""]


def response_figures(results, folder: Path) -> None:
    import matplotlib.pyplot as plt

    from chaosjax import plots

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lrs = results.coords["learning_rate"]
    ref = results.coords["member"] == 0
    uniq = list(np.unique(lrs))
    t = results.steps
    for r in np.flatnonzero(ref):
        i = uniq.index(lrs[r])
        a = results.records["ntk_amplitude"][r]
        ax.plot(
            t[t > 0],
            a[t > 0],
            color=f"C{i}",
            lw=1.0,
            label=f"η = {lrs[r]:g}" if r == np.flatnonzero(ref & (lrs == lrs[r]))[0] else None,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step t")
    ax.set_ylabel("NTK amplitude A(t) = ⟨Θ_t(x, x)⟩")
    ax.set_title("training response: aging of the NTK")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    plots.save(fig, folder / "ntk_amplitude.png")


# ---------------------------------------------------------------------------------------------
# instability metrics: per-layer separation, phases


#: the documented phase rule (summary.md repeats it)
PHASE_RULE = (
    "Phases from the finite-time λ1 windows of each reference run (m = its largest window "
    "value): *exploration* = the windows from the start while FTLE ≥ 0.5·m; *refining* = the "
    "last run of windows with |FTLE| ≤ 0.1·m up to the end; *organising* = in between. With "
    "m ≤ 0 the whole run is refining."
)


def phases(ftle: np.ndarray, times: np.ndarray) -> tuple[float, float]:
    """(end of exploration, start of refining) in steps by :data:`PHASE_RULE` (NaN if empty)."""
    f = np.asarray(ftle, np.float64)
    t = np.asarray(times, np.float64)
    ok = np.isfinite(f)
    f, t = f[ok], t[ok]
    if f.size == 0:
        return float("nan"), float("nan")
    m = float(f.max())
    if m <= 0:
        return float("nan"), float(t[0] - (t[1] - t[0]) if t.size > 1 else 0.0)
    explore = f >= 0.5 * m
    n_exp = int(np.argmin(explore)) if not explore.all() else f.size
    calm = np.abs(f) <= 0.1 * m
    n_ref = int(np.argmin(calm[::-1])) if not calm.all() else f.size
    exp_end = float(t[n_exp - 1]) if n_exp > 0 else float("nan")
    ref_start = (
        float(t[f.size - n_ref - 1])
        if 0 < n_ref < f.size
        else (float("nan") if n_ref == 0 else 0.0)
    )
    return exp_end, ref_start


def instability_stage(cfg: ExperimentConfig, batch, results, lyap: xr.Dataset) -> xr.Dataset:
    """Per-layer separation and re-convergence of perturbed replicas, and training phases."""
    c = cfg.instability
    refs = reference_groups(batch)
    n_layers = results.records["layer_distance"].shape[-1]
    sep = np.full((len(refs), n_layers), np.nan)
    peak = np.full_like(sep, np.nan)
    reconv = np.zeros_like(sep, dtype=np.int8)
    exp_end = np.full(len(refs), np.nan)
    ref_start = np.full(len(refs), np.nan)
    ref_of = np.asarray(results.coords["reference"])
    member = np.asarray(results.coords["member"])
    ftle_t = lyap["window_end"].values
    t_layer = results.steps_of("layer_distance")
    for g, r in enumerate(refs):
        sel = (ref_of == r) & (member > 0)
        if sel.any():
            with np.errstate(all="ignore"):
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    d = np.nanmean(results.records["layer_distance"][sel], axis=0)  # (n, layers)
            for layer in range(n_layers):
                y = d[:, layer]
                if not np.isfinite(y[0]) or y[0] <= 0:
                    continue
                hit = y >= c.separation_factor * y[0]
                sep[g, layer] = t_layer[np.argmax(hit)] if hit.any() else np.nan
                fin = y[np.isfinite(y)]
                peak[g, layer] = float(fin.max())
                reconv[g, layer] = int(hit.any() and fin[-1] < c.reconverge_fraction * fin.max())
        exp_end[g], ref_start[g] = phases(lyap["ftle"].values[g, :, 0], ftle_t)
    return xr.Dataset(
        {
            "separation_step": (("group", "layer"), sep),
            "peak_distance": (("group", "layer"), peak),
            "reconverged": (("group", "layer"), reconv),
            "exploration_end": (("group",), exp_end),
            "refining_start": (("group",), ref_start),
        },
        coords={**group_coords(batch, refs), "layer": np.asarray(results.layer_names, dtype=str)},
        attrs={
            "separation_factor": c.separation_factor,
            "reconverge_fraction": c.reconverge_fraction,
            "rule": PHASE_RULE,
            "ftle_window": lyap.attrs["ftle_window"],
        },
    )


def instability_markdown(ds: xr.Dataset) -> list[str]:
    a = ds.attrs
    layers = [str(x) for x in ds["layer"].values]
    lines = [
        "## Instability metrics: layers and phases",
        "",
        f"Per layer (median over seeds): the first step at which the perturbed replicas' mean "
        f"distance in that layer exceeds {a['separation_factor']:g}× its start (separation; n/a = "
        f"never), and how many seeds re-converged (final distance below {a['reconverge_fraction']:g}× "
        "its peak) — layers separating at different times is 'breaking formation'. "
        f"{a['rule']} (FTLE windows of {a['ftle_window']} steps.)",
        "",
        *table_head(
            "η",
            *(f"{n}: separation (re-converged)" for n in layers),
            "exploration ends",
            "refining starts",
        ),
    ]
    lrs = ds["learning_rate"].values
    for lr in np.unique(lrs):
        sel = lrs == lr
        cells = []
        for j in range(len(layers)):
            s = ds["separation_step"].values[sel, j]
            med = finite_median(s)
            cells.append(
                f"{fmt(med, '.0f')} ({int(ds['reconverged'].values[sel, j].sum())}/{sel.sum()})"
            )
        e = ds["exploration_end"].values[sel]
        rf = ds["refining_start"].values[sel]
        em, rm = finite_median(e), finite_median(rf)
        lines.append(
            f"| {lr:.4g} | " + " | ".join(cells) + f" | {fmt(em, '.0f')} | {fmt(rm, '.0f')} |"
        )
    return [*lines, ""]


# ---------------------------------------------------------------------------------------------
# grokking against instability (the slingshot question)

GROKKING_RULE = (
    "Rule: a run groks at the first record where its test accuracy reaches {acc:g}. Three "
    "indicators: a loss spike (training loss above {spike:g}× its minimum over the {lookback} "
    "records before), a sharpness crossing (sharpness / optimizer threshold above 1), a "
    "positive FTLE (the top finite-time exponent of a window > 0). For each, its rate in the "
    "{window} steps before the jump (jump included; FTLE windows overlapping them) is compared "
    "with its rate over the rest of the run. A seed is *enriched* when the indicator fires "
    "before the jump at least twice as often as elsewhere; the verdict is 'yes' when more than "
    "half the seeds that grokked are enriched, 'always on' when it fires on at least half of "
    "the rest of the run (no contrast to detect), 'no' otherwise."
)


def _rates(fires: np.ndarray, ok: np.ndarray, near: np.ndarray) -> tuple[float, float]:
    """(rate near the jump, rate elsewhere) of a boolean indicator over its valid points."""
    a, b = ok & near, ok & ~near
    rn = fires[a].mean() if a.any() else np.nan
    re = fires[b].mean() if b.any() else np.nan
    return float(rn), float(re)


INDICATORS = ("spike", "crossing", "ftle")


def grokking_stage(cfg: ExperimentConfig, batch, results, lyap: xr.Dataset | None):
    """Per reference run: when it fits the training set and when its test accuracy jumps
    (grokking); how often each indicator (loss spikes, sharpness crossings, positive FTLEs)
    fires just before the jump against elsewhere in the run; the last layer's norm."""
    from chaosjax import series

    c = cfg.grokking
    refs = reference_groups(batch)
    steps = np.asarray(results.steps, np.float64)
    window = c.window or max(1, cfg.steps // 10)
    rec = results.records
    n = len(refs)
    names = ["fit_step", "grok_step", "last_norm_start", "last_norm_grok", "last_norm_end"]
    names += [f"{i}_{w}" for i in INDICATORS for w in ("near", "elsewhere")]
    out = {k: np.full(n, np.nan) for k in names}
    names_l = list(results.layer_names)
    layer_name = c.layer or ("head" if "head" in names_l else names_l[-1])
    layer = names_l.index(layer_name)
    ratio = rec.get("sharpness_ratio")
    ftle_end = lyap["window_end"].values if lyap is not None else None
    ftle_len = lyap.attrs.get("ftle_window", 0) if lyap is not None else 0
    for g, r in enumerate(refs):
        fit, grok = rec["accuracy"][r] >= c.accuracy, rec["test_accuracy"][r] >= c.accuracy
        out["fit_step"][g] = steps[np.argmax(fit)] if fit.any() else np.nan
        if "layer_norm" in rec:
            norm = rec["layer_norm"][r, :, layer]
            out["last_norm_start"][g], out["last_norm_end"][g] = norm[0], _last_finite(norm)
        if not grok.any():
            continue
        t_grok = steps[np.argmax(grok)]
        out["grok_step"][g] = t_grok
        if "layer_norm" in rec:
            out["last_norm_grok"][g] = rec["layer_norm"][r, int(np.argmax(grok)), layer]
        near = (steps >= t_grok - window) & (steps <= t_grok)
        loss = rec["loss"][r]
        spikes = series.spike_mask(loss, factor=c.spike_factor, lookback=c.spike_lookback)
        rates = {"spike": _rates(spikes, np.isfinite(loss), near)}
        if ratio is not None:
            rr = ratio[r]
            rates["crossing"] = _rates(np.isfinite(rr) & (rr > 1.0), np.isfinite(rr), near)
        if ftle_end is not None:
            f = lyap["ftle"].values[g, :, 0]
            overlap = (ftle_end >= t_grok - window) & (ftle_end - ftle_len <= t_grok)
            rates["ftle"] = _rates(np.isfinite(f) & (f > 0), np.isfinite(f), overlap)
        for k, (a, b) in rates.items():
            out[f"{k}_near"][g], out[f"{k}_elsewhere"][g] = a, b
    return xr.Dataset(
        {k: (("group",), v) for k, v in out.items()},
        coords=group_coords(batch, refs),
        attrs={
            "accuracy": c.accuracy,
            "window": window,
            "spike_factor": c.spike_factor,
            "has_curvature": int(ratio is not None),
            "has_ftle": int(lyap is not None),
            "layer": layer_name,
            "rule": GROKKING_RULE.format(
                acc=c.accuracy, window=window, spike=c.spike_factor, lookback=c.spike_lookback
            ),
        },
    )


def _coincidence(near: np.ndarray, elsewhere: np.ndarray, grokked: np.ndarray) -> str:
    """The verdict of one indicator over the seeds that grokked (see GROKKING_RULE)."""
    ok = grokked & np.isfinite(near) & np.isfinite(elsewhere)
    if not ok.any():
        return "n/a"
    nr, er = near[ok], elsewhere[ok]
    enriched = int(np.sum((nr > 0) & (nr >= 2 * er)))
    if float(np.mean(er)) >= 0.5:
        verdict = "always on"
    else:
        verdict = "yes" if enriched > ok.sum() / 2 else "no"
    return (
        f"{verdict} ({enriched}/{int(ok.sum())} enriched; rate {np.mean(nr):.2f} before vs "
        f"{np.mean(er):.2f} elsewhere)"
    )


def grokking_markdown(ds: xr.Dataset) -> list[str]:
    a = ds.attrs
    lines = [
        "## Grokking against instability",
        "",
        "Does the jump in test accuracy coincide with loss spikes and instability? Per η: the "
        "step each seed fits the training set and the step its test accuracy jumps (median; "
        "reached: seeds), and for each indicator its verdict with the mean rates before the "
        f"jump and elsewhere. Last layer's norm (layer {a['layer']!r}): at the start, at the "
        "jump and at the end (mean ± standard error over seeds).",
        "",
        a["rule"],
        "",
        *table_head(
            "η",
            "fits train",
            "test jumps (grokked)",
            "loss spikes",
            "sharpness crossings",
            "FTLE > 0",
            "last-layer norm start → jump → end",
        ),
    ]
    lrs = ds["learning_rate"].values
    answers = []
    off = {"crossing": "n/a (curvature off)", "ftle": "n/a (lyapunov off)"}
    has = {"spike": True, "crossing": bool(a["has_curvature"]), "ftle": bool(a["has_ftle"])}
    for lr in np.unique(lrs):
        sel = lrs == lr
        grok = ds["grok_step"].values[sel]
        grokked = np.isfinite(grok)
        fit = ds["fit_step"].values[sel]
        cells = [
            _coincidence(ds[f"{i}_near"].values[sel], ds[f"{i}_elsewhere"].values[sel], grokked)
            if has[i]
            else off[i]
            for i in INDICATORS
        ]
        norms = " → ".join(
            seeds_cell(ds[k].values[sel], ".3g")
            for k in ("last_norm_start", "last_norm_grok", "last_norm_end")
        )
        lines.append(
            f"| {lr:.4g} | {fmt(finite_median(fit), '.0f')} ({int(np.isfinite(fit).sum())}/{sel.sum()}) "
            f"| {fmt(finite_median(grok), '.0f')} ({int(grokked.sum())}/{sel.sum()}) | "
            + " | ".join(cells)
            + f" | {norms} |"
        )
        answers.append((lr, int(grokked.sum()), int(sel.sum()), cells))
    lines.append("")
    for lr, g, total, cells in answers:
        if g == 0:
            lines.append(f"- η = {lr:.4g}: no seed grokked, so the question has no answer here.")
            continue
        named = [
            name
            for name, cell in zip(("loss spikes", "sharpness crossings", "positive FTLEs"), cells)
            if cell.startswith("yes")
        ]
        lines.append(
            f"- η = {lr:.4g}: {g}/{total} seeds grokked; the jump "
            + (
                f"coincides with {', '.join(named)} (enriched before it)."
                if named
                else "does not coincide with any indicator under the rule above."
            )
        )
    return [*lines, ""]


def grokking_figures(ds: xr.Dataset, results, folder: Path) -> None:
    """Test accuracy, training loss, last layer's norm and sharpness ratio of each reference
    run, with its jump marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = results.records
    refs = ds["reference"].values
    steps = results.steps
    layer = list(results.layer_names).index(ds.attrs["layer"])
    panels = [("test_accuracy", "test accuracy", False), ("loss", "training loss", True)]
    if "layer_norm" in rec:
        panels.append(("layer_norm", f"norm of {ds.attrs['layer']}", False))
    if "sharpness_ratio" in rec:
        panels.append(("sharpness_ratio", "sharpness / threshold", True))
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels)), sharex=True)
    for g, r in enumerate(refs):
        label = f"seed {int(ds['seed'].values[g])}, η={float(ds['learning_rate'].values[g]):g}"
        for ax, (key, title, log) in zip(axes, panels):
            y = rec[key][r]
            y = y[:, layer] if y.ndim == 2 else y
            (line,) = ax.plot(steps, y, lw=1, label=label)
            t = ds["grok_step"].values[g]
            if np.isfinite(t):
                ax.axvline(t, color=line.get_color(), ls=":", lw=1)
            ax.set_ylabel(title)
            if log:
                ax.set_yscale("log")
    if "sharpness_ratio" in rec:
        axes[-1].axhline(1.0, color="k", lw=0.8)
    axes[-1].set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / "grokking.png", dpi=110)
    plt.close(fig)


__all__ = [
    "GROKKING_RULE",
    "PHASE_RULE",
    "divergence_figures",
    "divergence_markdown",
    "divergence_stage",
    "grokking_figures",
    "grokking_markdown",
    "grokking_stage",
    "instability_markdown",
    "instability_stage",
    "marginal_markdown",
    "marginal_snapshots",
    "marginal_stage",
    "phases",
    "prediction_figures",
    "prediction_markdown",
    "prediction_stage",
    "response_figures",
    "response_markdown",
    "response_stage",
    "series_figures",
    "series_markdown",
    "series_stage",
    "target_markdown",
    "target_stage",
]
