"""The bifurcation figure of :func:`chaosjax.orbits.bifurcation` (matplotlib, headless-safe
as :mod:`chaosjax.plots`)."""

from __future__ import annotations

import numpy as np


def plot_bifurcation(b, ax=None, *, label: str | None = None, markersize: float = 0.6):
    """The bifurcation diagram (samples against the parameter) above λ1(parameter).

    Args:
        b: a :class:`chaosjax.Bifurcation`.
        ax: two axes (diagram, exponent) to draw into; default a new figure with both, the
            exponent panel sharing the parameter axis.
        label: the parameter's name on the x axis (default ``b.info["param"]``).
        markersize: the size of the sample dots.

    Returns:
        The figure. Bifurcation points are dashed vertical lines in both panels (labelled
        with the periods on either side); λ1 has a zero line.
    """
    import matplotlib.pyplot as plt

    import chaosjax.plots  # noqa: F401  (selects the headless backend as the plots do)

    if ax is None:
        fig, ax = plt.subplots(2, 1, sharex=True, figsize=(7.0, 6.0), height_ratios=(2, 1))
    else:
        if len(ax) != 2:
            raise ValueError(f"ax: expected two axes (diagram, exponent), got {len(ax)}")
        fig = ax[0].figure
    top, bottom = ax
    v = np.asarray(b.values)
    s = np.asarray(b.samples)
    top.plot(np.repeat(v, s.shape[1]), s.ravel(), ms=markersize, color="k", alpha=0.6,
             marker=".", ls="none")  # fmt: skip
    order = np.argsort(v)
    bottom.plot(v[order], np.asarray(b.lyapunov)[order], lw=1.0, color="C0")
    bottom.axhline(0.0, color="0.4", lw=0.8)
    for p, ks in zip(b.points, b.transitions):
        for a in (top, bottom):
            a.axvline(p, color="C3", lw=0.7, ls="--")
        top.annotate(f"{ks[0]}→{ks[1]}", (p, 1.0), xycoords=("data", "axes fraction"),
                     fontsize=7, color="C3", rotation=90, va="top", ha="right")  # fmt: skip
    name = label or b.info.get("param", "parameter")
    top.set_ylabel("attractor sample")
    bottom.set_ylabel("λ1 per step")
    bottom.set_xlabel(name)
    top.set_title(f"bifurcation diagram ({len(b.points)} period changes)")
    return fig


__all__ = ["plot_bifurcation"]
