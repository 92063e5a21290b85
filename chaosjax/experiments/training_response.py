"""The training-response stage (Nakazato 2024): NTK amplitude aging, kernel shape, feature-space
size and fragility from the response tracker's records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from chaosjax._util import fmt
from chaosjax.experiments._sections import BaseConfig
from chaosjax.experiments.analyses import group_coords, reference_groups
from chaosjax.experiments.stats import last_finite
from chaosjax.experiments.tables import table_head

# ---------------------------------------------------------------------------------------------
# training response (Nakazato)


def response_stage(cfg: BaseConfig, tmap, batch, results) -> xr.Dataset:
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
        v["amp_start"][g], v["amp_end"][g] = amp[0], last_finite(amp)
        v["shape_corr_end"][g] = last_finite(results.records["ntk_shape_corr"][r])
        for k in ("ntk_pr", "feature_pr"):
            v[f"{k}_start"][g] = results.records[k][r][0]
            v[f"{k}_end"][g] = last_finite(results.records[k][r])
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
