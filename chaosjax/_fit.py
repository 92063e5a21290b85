"""The one straight-line fit behind every best-window fit (replica divergence, analogues)."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

#: a window of fewer points is not a fit (docs/architecture.md, reporting rules)
MIN_POINTS = 10


class LineFit(NamedTuple):
    """Least-squares line y ≈ intercept + slope·x: R², the slope's standard error, the
    two-sided p-value of slope ≠ 0 (t test) and the number of points."""

    slope: float
    intercept: float
    r2: float
    stderr: float
    pvalue: float
    n: int


def line_fit(x, y) -> LineFit:
    """Fit a line to finite (x, y) pairs (at least 2)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    n = int(x.size)
    if n < 2:
        nan = float("nan")
        return LineFit(nan, nan, nan, nan, nan, n)
    slope, icpt = np.polyfit(x, y, 1)
    resid = y - (icpt + slope * x)
    ss_res = float(resid @ resid)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
    sxx = float(((x - x.mean()) ** 2).sum())
    df = n - 2
    if df > 0 and sxx > 0:
        se = math.sqrt(ss_res / df) / math.sqrt(sxx)
        p = t_pvalue(slope / se if se > 0 else math.inf, df)
    else:
        se, p = float("nan"), float("nan")
    return LineFit(float(slope), float(icpt), float(r2), float(se), float(p), n)


def best_line_fit(windows):
    """The highest-R² :func:`line_fit` over ``windows``, an iterable of ``(label, x, y)``:
    ``(fit, label)``, or None when there is no window (the best-window fits of Danovski et al.
    and of the method of analogues both use it)."""
    best = None
    for label, x, y in windows:
        f = line_fit(x, y)
        if best is None or f.r2 > best[0].r2:
            best = (f, label)
    return best


def t_pvalue(t: float, df: int) -> float:
    """Two-sided p-value of a Student t statistic with ``df`` degrees of freedom."""
    if not np.isfinite(t):
        return 0.0
    from jax.scipy.special import betainc

    return float(betainc(df / 2.0, 0.5, df / (df + t * t)))


__all__ = ["MIN_POINTS", "LineFit", "line_fit", "t_pvalue"]
