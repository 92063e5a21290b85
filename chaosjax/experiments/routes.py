"""The bifurcation stage: a diagram over η of the config's training map (one batched run on the
engine, :func:`chaosjax.bifurcation`), its period-doubling points and their interval ratios.

Kalra, He and Barkeshli (2023) find a period-doubling route to chaos on the edge-of-stability
manifold of the uv model as η grows; the ratios of successive intervals are compared with
Feigenbaum's δ = 4.669 — as a comparison, not an assumption.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from chaosjax._util import fmt
from chaosjax.experiments._sections import BaseConfig
from chaosjax.experiments.tables import table_head

FEIGENBAUM = 4.669201609

#: the rule of the cascade table (summary.md repeats it)
CASCADE_RULE = (
    "η_k: the k-th point, in increasing η, where the certified period doubles (1→2, 2→4, …; "
    "refined by bisection); δ_k = (η_k − η_{k−1}) / (η_{k+1} − η_k), compared with Feigenbaum's "
    f"{FEIGENBAUM:.4f} (the limit for a one-hump map; a comparison, not an assumption)."
)


def eta_grid(cfg: BaseConfig) -> np.ndarray:
    """The stage's η values from ``bifurcation.values = [first, last, count]``."""
    first, last, count = cfg.bifurcation.values
    return np.linspace(float(first), float(last), int(count))


def doubling_points(points: np.ndarray, transitions: np.ndarray) -> np.ndarray:
    """The points of a period-doubling cascade 1→2→4→…, in order, up to the first point that
    breaks it."""
    out, want = [], 1
    for p, (a, b) in zip(np.asarray(points), np.asarray(transitions)):
        if int(a) == want and int(b) == 2 * want:
            out.append(float(p))
            want *= 2
    return np.asarray(out)


def feigenbaum_ratios(etas: np.ndarray) -> np.ndarray:
    """δ_k = (η_k − η_{k−1}) / (η_{k+1} − η_k) for the interior points (length n − 2)."""
    e = np.asarray(etas, np.float64)
    if e.size < 3:
        return np.zeros(0)
    return (e[1:-1] - e[:-2]) / (e[2:] - e[1:-1])


def bifurcation_stage(cfg: BaseConfig, tmap, batch) -> xr.Dataset:
    """The diagram of the first seed's initial state over the η grid."""
    from chaosjax.orbits import bifurcation

    c = cfg.bifurcation
    seed = int(cfg.replicas.seeds[0])
    x0 = tmap.init_from_key(seed) if tmap.init_fn is not None else tmap.init()
    b = bifurcation(
        tmap, x0, eta_grid(cfg), steps=c.steps, n_samples=c.n_samples,
        max_period=c.max_period, refine_tol=c.refine_tol,
    )  # fmt: skip
    cascade = doubling_points(b.points, b.transitions)
    return xr.Dataset(
        {
            "samples": (("eta", "sample"), np.asarray(b.samples, np.float64)),
            "period": (("eta",), np.asarray(b.periods, np.float64)),
            "certified": (("eta",), np.asarray(b.certified, np.float64)),
            "lyapunov": (("eta",), np.asarray(b.lyapunov, np.float64)),
            "points": (("point",), np.asarray(b.points, np.float64)),
            "transition": (("point", "side"), np.asarray(b.transitions, np.float64)),
            "cascade": (("k",), cascade),
            "ratio": (("k2",), feigenbaum_ratios(cascade)),
        },
        coords={"eta": np.asarray(b.values, np.float64)},
        attrs={
            "seed": seed,
            "steps": c.steps,
            "refine_tol": c.refine_tol,
            "max_period": c.max_period,
            "seconds": float(b.info.get("seconds", float("nan"))),
            "rule": CASCADE_RULE,
        },
    )


def bifurcation_markdown(ds: xr.Dataset) -> list[str]:
    a = ds.attrs
    eta = ds["eta"].values
    lines = [
        "## Bifurcation diagram over η",
        "",
        f"One batched run of {eta.size} learning rates in [{eta[0]:.4g}, {eta[-1]:.4g}] from the "
        f"initial state of seed {a['seed']}, {a['steps']} steps each, the loss sampled after the "
        "transient; the period of the attractor (certified by a Newton solve where one converges), "
        "λ1 from the same run, and the points where the period changes refined to "
        f"{a['refine_tol']:g} ({fmt(a.get('seconds'), '.1f')} s). {a['rule']}",
        "",
        *table_head("k", "η_k", "period after", "δ_k"),
    ]
    casc, ratio = ds["cascade"].values, ds["ratio"].values
    for k, e in enumerate(casc):
        d = fmt(float(ratio[k - 1]), ".4g") if 1 <= k <= ratio.size else "n/a"
        lines.append(f"| {k + 1} | {e:.7g} | {2 ** (k + 1)} | {d} |")
    if casc.size == 0:
        lines.append("| n/a | no period doubling found on the grid | | |")
    others = [
        f"{p:.6g} ({int(t[0])}→{int(t[1])})"
        for p, t in zip(ds["points"].values, ds["transition"].values)
        if float(p) not in set(casc.tolist())
    ]
    if others:
        lines += ["", "Other period changes: " + ", ".join(others) + "."]
    return [*lines, "", "![bifurcation](figures/bifurcation.png)", ""]


def bifurcation_figures(ds: xr.Dataset, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from chaosjax._orbit_plots import plot_bifurcation
    from chaosjax.orbits import Bifurcation

    b = Bifurcation(
        ds["eta"].values, ds["samples"].values, ds["period"].values, ds["lyapunov"].values,
        ds["points"].values, ds["transition"].values, ds["certified"].values,
        {"param": "learning rate η"},
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    fig = plot_bifurcation(b, label="learning rate η")
    fig.savefig(folder / "bifurcation.png", dpi=110)
    plt.close(fig)


__all__ = [
    "CASCADE_RULE",
    "FEIGENBAUM",
    "bifurcation_figures",
    "bifurcation_markdown",
    "bifurcation_stage",
    "doubling_points",
    "eta_grid",
    "feigenbaum_ratios",
]
