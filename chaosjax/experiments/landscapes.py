"""The ``landscape`` stage of ``chaosjax run``: for every reference run, the loss along the
top Hessian eigenvector at the end of the run (iterates of the last records marked, the
quadratic model ½λα² and the optimizer's threshold curvature beside it) and the loss on the
plane of the run's two principal directions with the trajectory projected on it. Both come
from the states of the recorded run (snapshots), never from a re-run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from chaosjax._util import fmt
from chaosjax.experiments._sections import BaseConfig
from chaosjax.experiments.analyses import group_coords, reference_groups
from chaosjax.experiments.tables import table_head

#: iterates of the last records marked on the 1-D slice
LAST = 10


def landscape_snapshots(cfg: BaseConfig):
    """The observer keeping each reference run's state at up to ``landscape.snapshots``
    evenly spaced records (the last one included)."""
    from chaosjax.observers import StateSnapshots

    n_rec = cfg.steps // cfg.record_every
    every = max(1, -(-n_rec // max(1, cfg.landscape.snapshots - 1)))
    at = sorted({cfg.steps - i * every * cfg.record_every for i in range(n_rec // every + 1)})
    at = [a for a in at if a >= 0]
    return StateSnapshots(at=tuple(at), name="trajectory")


def landscape_stage(cfg: BaseConfig, tmap, batch, results) -> xr.Dataset:
    """Slices of each reference run's loss at its last state (see the module docstring)."""
    import jax.numpy as jnp

    from chaosjax import landscape
    from chaosjax.curvature import hessian_eigs, training_loss
    from chaosjax.optimizers import operator_of

    c = cfg.landscape
    refs = reference_groups(batch)
    n_p = tmap.n_params
    f, _, _ = training_loss(tmap, tmap.init())  # the loss the step differentiates
    traj_all = results.records["trajectory"]
    snap_steps = results.steps_of("trajectory")
    n_g, n_s = len(refs), traj_all.shape[1]
    out = {
        "alpha": np.full((n_g, c.num), np.nan),
        "slice": np.full((n_g, c.num), np.nan),
        "quadratic": np.full((n_g, c.num), np.nan),
        "sharpness": np.full(n_g, np.nan),
        "sharpness_residual": np.full(n_g, np.nan),
        "threshold": np.full(n_g, np.nan),
        "center": np.full(n_g, np.nan),
        "iterate_alpha": np.full((n_g, LAST), np.nan),
        "iterate_loss": np.full((n_g, LAST), np.nan),
        "plane_grid": np.full((n_g, c.num_2d), np.nan),
        "plane": np.full((n_g, c.num_2d, c.num_2d), np.nan),
        "path": np.full((n_g, n_s, 2), np.nan),
        "explained": np.full((n_g, 2), np.nan),
    }
    hessian_threshold = operator_of(tmap.optimizer_name) == "hessian"
    thr_rec = results.records.get("threshold")
    for g, r in enumerate(refs):
        traj = np.asarray(traj_all[r][:, :n_p], np.float64)
        if not np.isfinite(traj).all():
            continue  # a diverged run has no landscape to show
        p_end = jnp.asarray(traj[-1], tmap.state_dtype)
        eig = hessian_eigs(f, p_end, 1, n_matvecs=min(c.n_matvecs, n_p))
        lam, u = float(eig.eigenvalues[0]), np.asarray(eig.eigenvectors[0], np.float64)
        out["sharpness_residual"][g] = float(eig.residuals[0]) / max(abs(lam), 1e-300)
        proj = (traj[-LAST:] - traj[-1]) @ u
        span = max(3.0 * float(np.max(np.abs(proj))), 1e-3 * float(np.linalg.norm(traj[-1])), 1e-6)
        s1 = landscape.slice(f, p_end, u, span=span, num=c.num)
        out["alpha"][g], out["slice"][g] = s1.alphas, s1.values
        out["quadratic"][g] = landscape.quadratic_model(s1.alphas, lam, s1.center)
        out["sharpness"][g], out["center"][g] = lam, s1.center
        if hessian_threshold and thr_rec is not None:
            out["threshold"][g] = float(thr_rec[r, -1])
        m = proj.shape[0]
        out["iterate_alpha"][g, -m:] = proj
        out["iterate_loss"][g, -m:] = np.asarray(
            [float(f(jnp.asarray(p, tmap.state_dtype))) for p in traj[-m:]]
        )
        if n_s >= 3:
            plane = landscape.trajectory_plane(traj, k=2)
            if np.isfinite(plane.explained).all():
                span2 = 1.2 * float(np.max(np.abs(plane.coordinates))) or 1e-6
                s2 = landscape.slice(f, p_end, plane.directions, span=span2, num=c.num_2d)
                out["plane_grid"][g], out["plane"][g] = s2.alphas, s2.values
                out["path"][g], out["explained"][g] = plane.coordinates, plane.explained
    return xr.Dataset(
        {
            "alpha": (("group", "a"), out["alpha"]),
            "slice": (("group", "a"), out["slice"]),
            "quadratic": (("group", "a"), out["quadratic"]),
            "sharpness": (("group",), out["sharpness"]),
            "sharpness_residual": (("group",), out["sharpness_residual"]),
            "threshold": (("group",), out["threshold"]),
            "center": (("group",), out["center"]),
            "iterate_alpha": (("group", "last"), out["iterate_alpha"]),
            "iterate_loss": (("group", "last"), out["iterate_loss"]),
            "plane_grid": (("group", "b"), out["plane_grid"]),
            "plane": (("group", "b", "b2"), out["plane"]),
            "path": (("group", "snapshot", "pc"), out["path"]),
            "explained": (("group", "pc"), out["explained"]),
        },
        coords={**group_coords(batch, refs), "snapshot_step": ("snapshot", snap_steps)},
        attrs={"last": LAST, "num": c.num, "num_2d": c.num_2d, "tol": TOL},
    )


#: relative eigen-residual the top eigenvector must reach to direct a slice (DESIGN.md)
TOL = 1e-3


def landscape_markdown(ds: xr.Dataset) -> list[str]:
    lines = [
        "## Loss landscape at the end of each run",
        "",
        "Along the top Hessian eigenvector u at the last state θ_T (the loss the step "
        "differentiates): λ1, the threshold curvature (GD 2/η; n/a for preconditioned "
        f"optimizers), the spread of the last {ds.attrs['last']} recorded iterates along u, and "
        "the even part of the slice at ±span, ½(L(+s) + L(−s)) − L(θ_T) (the gradient term "
        "cancels), over the quadratic model's ½λ1s² (< 1: the valley is flatter away from θ_T "
        "than its curvature there says; > 1: steeper). The plane "
        "is spanned by the two principal directions of θ_t − θ_T over the run (explained "
        "variance). λ1 is marked *(unconverged)* when the Lanczos pair's relative residual "
        f"exceeds {ds.attrs.get('tol', TOL):g}: the direction u is then only approximately "
        "the top eigenvector. Figures: `landscape_1d.png`, `landscape_2d.png`.",
        "",
        *table_head(
            "η",
            "seed",
            "λ1 at the end",
            "threshold",
            "iterates along u (min … max)",
            "even rise / ½λ1s²",
            "plane explains",
        ),
    ]
    for g in range(ds.sizes["group"]):
        lr = float(ds["learning_rate"].values[g])
        seed = int(ds["seed"].values[g])
        lam = float(ds["sharpness"].values[g])
        if not np.isfinite(lam):
            lines.append(f"| {lr:.4g} | {seed} | n/a (diverged) | | | | |")
            continue
        it = ds["iterate_alpha"].values[g]
        it = it[np.isfinite(it)]
        sl, q = ds["slice"].values[g], ds["quadratic"].values[g]
        c0 = float(ds["center"].values[g])
        with np.errstate(all="ignore"):  # the even part: the gradient term cancels
            even = float((0.5 * (sl[0] + sl[-1]) - c0) / (q[-1] - c0))
        ex = ds["explained"].values[g]
        res = float(ds["sharpness_residual"].values[g]) if "sharpness_residual" in ds else 0.0
        mark = " (unconverged)" if res > ds.attrs.get("tol", TOL) else ""
        lines.append(
            f"| {lr:.4g} | {seed} | {lam:.4g}{mark} | {fmt(float(ds['threshold'].values[g]), '.4g')} | "
            f"{it.min():.3g} … {it.max():.3g} | {fmt(even, '.3g')} | "
            f"{fmt(float(np.nansum(ex)), '.3f')} |"
        )
    return [*lines, ""]


def _plain_axes(ax) -> None:
    """Tick labels without an offset (``1e-9+4.99e-1``) and few enough not to overlap."""
    from matplotlib.ticker import MaxNLocator

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=4))
    ax.ticklabel_format(axis="both", style="sci", scilimits=(-3, 3), useOffset=False)
    ax.tick_params(labelsize=7)


def landscape_figures(ds: xr.Dataset, folder: Path) -> None:
    """``landscape_1d.png`` (slice along u, quadratic model, threshold curvature, last
    iterates) and ``landscape_2d.png`` (the trajectory plane with the path)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = ds.sizes["group"]
    cols = min(n, 4)
    rows = -(-n // cols)
    folder.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3 * rows), squeeze=False)
    for g in range(n):
        ax = axes[g // cols][g % cols]
        a, sl = ds["alpha"].values[g], ds["slice"].values[g]
        title = f"η={float(ds['learning_rate'].values[g]):g}, seed {int(ds['seed'].values[g])}"
        ax.set_title(title, fontsize=8)
        if not np.isfinite(sl).any():
            ax.text(0.5, 0.5, "diverged", ha="center", transform=ax.transAxes)
            continue
        # heights relative to L(θ_T): a plateau's tiny slice needs no offset label
        c0 = float(ds["center"].values[g])
        rel = sl - c0
        ax.plot(a, rel, lw=1.2, label="loss along u")
        ax.plot(a, ds["quadratic"].values[g] - c0, ls="--", lw=1, label="½λ1α²")
        thr = float(ds["threshold"].values[g])
        if np.isfinite(thr):
            ax.plot(a, 0.5 * thr * a**2, ls=":", lw=1, label="½(2/η)α²")
        ax.plot(
            ds["iterate_alpha"].values[g], ds["iterate_loss"].values[g] - c0, "o", ms=3,
            label="last iterates",
        )  # fmt: skip
        lo, hi = np.nanmin(rel), np.nanmax(rel)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-12), hi + 0.2 * (hi - lo + 1e-12))
        _plain_axes(ax)
        ax.set_xlabel("α along the top eigenvector")
        ax.set_ylabel("L(θ_T + αu) − L(θ_T)", fontsize=7)
    axes[0][0].legend(fontsize=6)
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.tight_layout()
    fig.savefig(folder / "landscape_1d.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    for g in range(n):
        ax = axes[g // cols][g % cols]
        grid, z = ds["plane_grid"].values[g], ds["plane"].values[g]
        ax.set_title(
            f"η={float(ds['learning_rate'].values[g]):g}, seed {int(ds['seed'].values[g])}",
            fontsize=8,
        )
        if not np.isfinite(z).any():
            ax.text(0.5, 0.5, "n/a", ha="center", transform=ax.transAxes)
            continue
        zl = np.log10(np.maximum(z, np.nanmin(z[z > 0]) if (z > 0).any() else 1e-12))
        ax.contourf(grid, grid, zl.T, levels=20, cmap="viridis")
        path = ds["path"].values[g]
        ax.plot(path[:, 0], path[:, 1], "w.-", lw=0.8, ms=2)
        ax.plot(path[-1, 0], path[-1, 1], "r*", ms=7)
        ex = ds["explained"].values[g]
        ax.set_xlabel(f"PC1 ({ex[0]:.0%})", fontsize=7)
        ax.set_ylabel(f"PC2 ({ex[1]:.0%})", fontsize=7)
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle("log10 loss on the trajectory plane (white: the run, red: its end)", fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "landscape_2d.png", dpi=110)
    plt.close(fig)


__all__ = ["landscape_figures", "landscape_markdown", "landscape_snapshots", "landscape_stage"]
