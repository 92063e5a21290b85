"""The instability stage (the seed article): per-layer separation and re-convergence of
perturbed replicas, and training phases from the FTLE series by a stated rule."""

from __future__ import annotations

import numpy as np
import xarray as xr

from chaosjax._util import finite_median, fmt
from chaosjax.experiments._sections import BaseConfig
from chaosjax.experiments.analyses import group_coords, reference_groups
from chaosjax.experiments.tables import table_head

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


def instability_stage(cfg: BaseConfig, batch, results, lyap: xr.Dataset) -> xr.Dataset:
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
            "phases per seed: exploration ends / refining starts",
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
        # per seed, so that each pair is ordered (medians over seeds need not be)
        pairs = ", ".join(
            f"{fmt(e, '.0f')} / {fmt(rf, '.0f')}"
            for e, rf in zip(ds["exploration_end"].values[sel], ds["refining_start"].values[sel])
        )
        lines.append(f"| {lr:.4g} | " + " | ".join(cells) + f" | {pairs} |")
    return [*lines, ""]
