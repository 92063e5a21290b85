"""The grokking stage (the slingshot question): does the jump in test accuracy coincide with loss
spikes, sharpness over the optimizer's threshold and positive FTLEs?"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from chaosjax._util import finite_median, fmt
from chaosjax.experiments._sections import BaseConfig
from chaosjax.experiments.analyses import group_coords, reference_groups
from chaosjax.experiments.stats import last_finite, seeds_cell
from chaosjax.experiments.tables import table_head

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


def grokking_stage(cfg: BaseConfig, batch, results, lyap: xr.Dataset | None):
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
            out["last_norm_start"][g], out["last_norm_end"][g] = norm[0], last_finite(norm)
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
