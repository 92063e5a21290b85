"""Matplotlib figures of replica runs (headless-safe: the Agg backend unless one is set)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib

if "MPLBACKEND" not in os.environ and not matplotlib.get_backend().lower().startswith(
    ("module://matplotlib_inline", "nbagg", "widget", "ipympl")
):
    matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from chaosjax.results import ReplicaResults


def _groups(results: ReplicaResults, by: str) -> list[tuple[float, np.ndarray]]:
    vals = results.coords.get(by)
    if vals is None:
        return [(np.nan, np.ones(results.n_replicas, bool))]
    return [(v, vals == v) for v in np.unique(vals)]


def _colors(n):
    cmap = plt.get_cmap("viridis")
    return [cmap(x) for x in np.linspace(0.0, 0.9, max(n, 1))]


def _label(by: str, v) -> str:
    sym = {"learning_rate": "η", "momentum": "β"}.get(by, by)
    return f"{sym} = {v:g}" if isinstance(v, float | np.floating) else f"{sym} = {v}"


def loss_curves(results: ReplicaResults, *, by: str = "learning_rate", name: str = "loss", ax=None):
    """Loss of every reference replica against step, one colour per ``by`` value (log y)."""
    if name not in results.records:
        raise ValueError(f"{name}: not recorded; recorded: {sorted(results.records)}")
    ax = ax or plt.subplots(figsize=(6.4, 4.2))[1]
    groups = _groups(results, by)
    ref = results.coords.get("member", np.zeros(results.n_replicas)) == 0
    for color, (v, sel) in zip(_colors(len(groups)), groups):
        ys = results.records[name][sel & ref]
        for i, y in enumerate(ys):
            ax.plot(
                results.steps,
                y,
                color=color,
                lw=1.0,
                alpha=0.85,
                label=_label(by, v) if i == 0 else None,
            )
    ax.set_yscale("log")
    ax.set_xlabel("step t")
    ax.set_ylabel(f"{name.replace('_', ' ')} (reference replicas)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


def replica_distance(
    results: ReplicaResults,
    *,
    by: str = "learning_rate",
    name: str = "distance_l1",
    fits=None,
    ax=None,
):
    """Distance of perturbed replicas to their reference over time, log axis: thin lines per
    replica, a thick line for the geometric mean per ``by`` value, and (with ``fits``, a run's
    ``lyapunov`` dataset) each group's best-window exponential fit as a dashed line."""
    if name not in results.records:
        raise ValueError(f"{name}: not recorded; recorded: {sorted(results.records)}")
    ax = ax or plt.subplots(figsize=(6.4, 4.2))[1]
    pert = results.coords.get("member", np.ones(results.n_replicas)) > 0
    groups = _groups(results, by)
    t = results.steps_of(name)
    for color, (v, sel) in zip(_colors(len(groups)), groups):
        d = results.records[name][sel & pert]
        if d.size == 0:
            continue
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            logd = np.log(np.where(d > 0, d, np.nan))
            for row in d:
                ax.plot(t, np.where(row > 0, row, np.nan), color=color, lw=0.4, alpha=0.3)
            mean = np.exp(np.nanmean(logd, axis=0))
        ax.plot(t, mean, color=color, lw=2.0, label=_label(by, v))
    if fits is not None and "fit_slope" in fits:
        lrs = list(np.unique(fits["learning_rate"].values))
        cols = _colors(len(lrs))
        accepted = fits["fit_accepted"].values if "fit_accepted" in fits else None
        for g in range(fits.sizes["group"]):
            slope = float(fits["fit_slope"].values[g])
            if not np.isfinite(slope):
                continue
            ls = "--" if accepted is None or accepted[g] else ":"
            a, b = int(fits["fit_start"].values[g]), int(fits["fit_stop"].values[g])
            icpt = float(fits["fit_intercept"].values[g]) if "fit_intercept" in fits else None
            if icpt is None:
                continue
            tt = np.linspace(a, b, 20)
            c = cols[lrs.index(fits["learning_rate"].values[g])]
            ax.plot(tt, np.exp(icpt + slope * tt), ls=ls, color=c, lw=1.5)
        ax.plot([], [], ls="--", color="gray", label="best-window fit (accepted)")
        if accepted is not None and not accepted.all():
            ax.plot([], [], ls=":", color="gray", label="best-window fit (rejected)")
        _fit_inset(ax, fits, t)
    ax.set_yscale("log")
    ax.set_xlabel("step t")
    unit = {"distance_l1": "L1 Σ|θ−θ′|", "distance_l2": "L2 ‖θ−θ′‖"}.get(name, name)
    ax.set_ylabel(f"replica distance d(t), {unit}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # clear of the inset
    ax.grid(alpha=0.3, which="both")
    return ax


def _fit_inset(ax, fits, t) -> None:
    """A zoom on the fit windows when they span a small part of the run (they are drawn over
    their windows only, invisible at the run's scale otherwise)."""
    stop = fits["fit_stop"].values[np.isfinite(fits["fit_slope"].values)]
    if stop.size == 0 or t.size < 2:
        return
    hi = float(stop.max())
    if hi > 0.25 * float(t[-1] - t[0]):
        return
    inset = ax.inset_axes([0.55, 0.08, 0.42, 0.38])
    for line in ax.get_lines():
        x, y = line.get_data()
        if len(x) == 0:
            continue
        keep = np.asarray(x) <= 1.5 * hi
        inset.plot(np.asarray(x)[keep], np.asarray(y)[keep], ls=line.get_linestyle(),
                   color=line.get_color(), lw=line.get_linewidth(), alpha=line.get_alpha())  # fmt: skip
    inset.set_yscale("log")
    inset.set_xlim(float(t[0]), 1.5 * hi)
    inset.set_title("fit windows (zoom)", fontsize=7)
    inset.tick_params(labelsize=6)
    inset.grid(alpha=0.3, which="both")


def spectrum_by(ds, *, ax=None):
    """Top-k Lyapunov spectrum per learning rate (mean ± standard error over seeds), from a
    run's ``lyapunov`` dataset (dims group × exponent)."""
    ax = ax or plt.subplots(figsize=(6.4, 4.2))[1]
    lrs = ds["learning_rate"].values
    uniq = np.unique(lrs)
    k = ds.sizes["exponent"]
    for color, lr in zip(_colors(len(uniq)), uniq):
        sel = lrs == lr
        ex = ds["exponents"].values[sel]
        with warnings.catch_warnings():  # mean ± standard error over seeds
            warnings.simplefilter("ignore", RuntimeWarning)
            m = np.nanmean(ex, axis=0)
            n = np.isfinite(ex).sum(axis=0)
            e = np.where(n >= 2, np.nanstd(ex, axis=0, ddof=1) / np.sqrt(np.maximum(n, 1)), 0.0)
        ax.errorbar(
            np.arange(1, k + 1),
            m,
            yerr=e,
            marker="o",
            ms=4,
            capsize=3,
            color=color,
            label=_label("learning_rate", float(lr)),
        )
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel("exponent index i")
    ax.set_ylabel("λ_i (per step)")
    ax.set_xticks(np.arange(1, k + 1))
    ax.set_title("Lyapunov spectrum (tangent space, QR)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


def ftle_series(ds, *, ax=None):
    """Finite-time λ1 over training, one line per (seed, η) reference run."""
    ax = ax or plt.subplots(figsize=(6.4, 4.2))[1]
    lrs = ds["learning_rate"].values
    uniq = list(np.unique(lrs))
    colors = _colors(len(uniq))
    t = ds["window_end"].values
    seen = set()
    for g in range(ds.sizes["group"]):
        lr = lrs[g]
        c = colors[uniq.index(lr)]
        ax.plot(
            t,
            ds["ftle"].values[g, :, 0],
            color=c,
            lw=1.2,
            marker=".",
            label=None if lr in seen else _label("learning_rate", float(lr)),
        )
        seen.add(lr)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel("step t (end of window)")
    ax.set_ylabel(f"finite-time λ1 over {ds.attrs['ftle_window']} steps (per step)")
    ax.set_title("finite-time Lyapunov exponent")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


def clv_angle_distribution(ds, *, ax=None):
    """Histogram of the smallest CLV angle per step, one curve per learning rate (log-spaced
    bins so near-tangencies are visible), from a run's ``clv`` dataset."""
    ax = ax or plt.subplots(figsize=(6.4, 4.2))[1]
    lrs = ds["learning_rate"].values
    uniq = np.unique(lrs)
    bins = np.logspace(-3, np.log10(90.0), 40)
    for color, lr in zip(_colors(len(uniq)), uniq):
        a = ds["min_angle_deg"].values[lrs == lr].ravel()
        a = a[np.isfinite(a)]
        if a.size == 0:
            continue
        h, _ = np.histogram(np.clip(a, bins[0], 90.0), bins=bins, density=True)
        ax.step(bins[:-1], h, where="post", color=color, label=_label("learning_rate", float(lr)))
    ax.axvline(
        float(ds.attrs.get("tangency_deg", 1.0)), color="gray", ls=":", label="near-tangency"
    )
    ax.set_xscale("log")
    ax.set_xlabel("smallest angle between CLVs (degrees)")
    ax.set_ylabel("density")
    ax.set_title("CLV angle distribution")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


def sharpness_vs_threshold(results: ReplicaResults, *, by: str = "learning_rate"):
    """λ1 of each reference replica over time against its stability threshold, one panel per
    ``by`` value (log y)."""
    vals = np.unique(results.coords[by])
    fig, axes = plt.subplots(
        1, len(vals), figsize=(3.2 * len(vals) + 0.8, 3.6), squeeze=False, sharey=False
    )
    ref = results.coords.get("member", np.zeros(results.n_replicas)) == 0
    for ax, v in zip(axes[0], vals):
        sel = np.flatnonzero((results.coords[by] == v) & ref)
        for i, r in enumerate(sel):
            y = results.records["sharpness"][r, :, 0]
            few = np.isfinite(y).sum() < 3  # diverged early: show the points
            ax.plot(
                results.steps,
                y,
                lw=1.0,
                marker="o" if few else None,
                ms=4,
                label="λ1 (seeds)" if i == 0 else None,
                color=f"C{i}",
            )
        thr = results.records["threshold"][sel[0]] if len(sel) else np.array([np.nan])
        if np.isfinite(thr).any():  # at η of each step: a schedule moves it
            ax.plot(
                results.steps, thr, color="k", ls="--", lw=1.0, label="threshold (2/η_t for GD)"
            )
        ax.set_yscale("log")
        ax.set_title(_label(by, float(v)), fontsize=9)
        ax.set_xlabel("step t")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("sharpness λ1 (largest Hessian eigenvalue)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("sharpness against the stability threshold", fontsize=10)
    return axes[0][0]


def rotation_series(results: ReplicaResults, *, by: str = "learning_rate", ax=None):
    """Rotation 1 − |cos| of the top Hessian eigenvector between records (log y)."""
    ax = ax or plt.subplots(figsize=(6.4, 4.2))[1]
    vals = np.unique(results.coords[by])
    ref = results.coords.get("member", np.zeros(results.n_replicas)) == 0
    for color, v in zip(_colors(len(vals)), vals):
        sel = np.flatnonzero((results.coords[by] == v) & ref)
        for i, r in enumerate(sel):
            y = results.records["rotation"][r]
            ax.plot(
                results.steps,
                np.where(y > 0, y, np.nan),
                color=color,
                lw=0.9,
                label=_label(by, float(v)) if i == 0 else None,
            )
    ax.set_yscale("log")
    ax.set_xlabel("step t")
    ax.set_ylabel("1 − |⟨v1(t − Δ), v1(t)⟩|")
    ax.set_title("rotation of the top Hessian eigenvector")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return ax


def spectral_density(ds, *, ax=None):
    """Smoothed SLQ Hessian spectral density at the start (dashed) and end (solid) of the
    first seed's run per learning rate, from a run's ``curvature`` dataset."""
    from chaosjax.curvature import smooth_density

    ax = ax or plt.subplots(figsize=(6.4, 4.2))[1]
    lrs = ds["learning_rate"].values
    uniq = np.unique(lrs)
    for color, lr in zip(_colors(len(uniq)), uniq):
        g = int(np.flatnonzero(lrs == lr)[0])
        for w, ls in ((0, "--"), (1, "-")):
            nodes = ds["density_nodes"].values[g, w]
            weights = ds["density_weights"].values[g, w]
            ok = np.isfinite(nodes) & np.isfinite(weights)
            if not ok.any():
                continue
            grid, dens = smooth_density(nodes[ok], weights[ok])
            ax.plot(
                grid,
                np.maximum(dens, 1e-8),
                ls=ls,
                color=color,
                label=f"{_label('learning_rate', float(lr))}, {'start' if w == 0 else 'end'}",
            )
    ax.set_yscale("log")
    ax.set_xlabel("Hessian eigenvalue")
    ax.set_ylabel("spectral density (SLQ, smoothed)")
    ax.set_title("Hessian spectral density")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(
            0.5,
            0.5,
            "not computed (curvature.density_matvecs = 0)",
            ha="center",
            transform=ax.transAxes,
        )
    ax.grid(alpha=0.3)
    return ax


def save(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` (folders created, tight layout), close it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def standard_figures(
    results: ReplicaResults, folder: str | os.PathLike, *, by: str = "learning_rate", fits=None
) -> Sequence[Path]:
    """Write the standard run figures (loss curves, replica distance) into ``folder``."""
    out = []
    if "loss" in results.records:
        ax = loss_curves(results, by=by)
        ax.set_title("training loss")
        out.append(save(ax.figure, Path(folder) / "loss.png"))
    for name in ("distance_l1", "distance_l2"):
        if name in results.records and (results.coords.get("member", np.zeros(1)) > 0).any():
            ax = replica_distance(
                results, by=by, name=name, fits=fits if name == "distance_l1" else None
            )
            ax.set_title("separation of perturbed replicas")
            out.append(save(ax.figure, Path(folder) / "replica_distance.png"))
            break
    return out


__all__ = [
    "clv_angle_distribution",
    "ftle_series",
    "loss_curves",
    "replica_distance",
    "rotation_series",
    "save",
    "sharpness_vs_threshold",
    "spectral_density",
    "spectrum_by",
    "standard_figures",
]
