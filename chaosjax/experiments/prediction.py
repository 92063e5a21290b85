"""Stages that relate early dynamics to outcomes: time to a target test accuracy (the onset-of-
chaos sweep) and the early-FTLE prediction of the final loss (Sharafi, Martin, Hallerberg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from chaosjax._util import fmt
from chaosjax.experiments._sections import BaseConfig
from chaosjax.experiments.analyses import group_coords, learning_rate_labels, reference_groups
from chaosjax.experiments.stats import last_finite, seeds_cell
from chaosjax.experiments.tables import table_head

# ---------------------------------------------------------------------------------------------
# time to a target accuracy


def target_stage(cfg: BaseConfig, batch, results) -> xr.Dataset:
    """First record step at which each reference run reaches the target test accuracy."""
    refs = reference_groups(batch)
    acc = results.records["test_accuracy"][refs]
    hit = acc >= cfg.target.test_accuracy
    first = np.where(hit.any(axis=1), results.steps[np.argmax(hit, axis=1)], np.nan).astype(float)
    final = np.array([last_finite(a) for a in acc])
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


def prediction_stage(cfg: BaseConfig, batch, results, lyap: xr.Dataset) -> xr.Dataset:
    """Per η: Pearson and Spearman correlation of the early λ1 with the final training loss
    across initialisations, and the AUC of λ1 for 'final loss above the median'."""
    refs = reference_groups(batch)
    final = np.array([last_finite(results.records["loss"][r]) for r in refs])
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
