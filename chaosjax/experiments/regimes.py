"""One reconciled regime line per (η, seed): the curvature verdict, the FTLE regime, the
loss-series diagnostics and the replica estimate joined without contradicting words.

The stages measure each aspect of a run on its own (:mod:`chaosjax.experiments.analyses`,
:mod:`chaosjax.experiments.danovski`); this module only reads their stored groups, so the
regime table and the stage tables use the same words: a curvature verdict of "stable" next to a
chaotic FTLE regime reads "below threshold" (the sharpness sits below 2/η while nearby runs
separate), and a run that ends on a flat plateau is a flat plateau in every table whatever its
earlier chaos was.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from chaosjax._util import fmt
from chaosjax.experiments.tables import table_head

#: FTLE regimes in which nearby runs still separate at the end, or in bursts
CHAOTIC_REGIMES = ("chaotic throughout", "intermittent", "late onset")

#: the documented reconciliation rule (summary.md repeats it)
REGIME_LINE_RULE = (
    "One line per run. *Regime*, by precedence: *dead plateau* > *frozen (fixed point)* > "
    "*periodic (period k)* (the end state, by the orbit rule of the Lyapunov section) > a "
    "curvature verdict of *flat plateau* (the loss stalled and the sharpness ≈ 0 at the end) > "
    "the FTLE regime; a chaotic FTLE regime before the end state is shown after it. "
    "*Curvature*: the verdict of the curvature table, where a *flat plateau* reads as the end "
    "state's word when there is one, and a *stable* verdict next to a chaotic FTLE regime "
    "(chaotic throughout, intermittent, late onset) reads *below threshold*: the sharpness sits "
    "below 2/η while nearby runs separate; an *unstable* verdict (not diverged) of a run locked "
    "on a periodic orbit reads *above threshold*: the sharpness exceeds 2/η on the orbit. *Tangents vs replicas*: the tangent FTLE averaged over the "
    "window of the accepted replica fit against the fit's slope; they *disagree* when the ratio "
    "lies outside [½, 2] and the difference times the window is ≥ 5 (growth by e⁵), else "
    "*agree*; n/a without an accepted fit or without tangent exponents."
)


def end_state(period: float, dead: bool) -> str:
    """The orbit label of a run's end state ('' for none or unrecorded): a dead plateau (the
    loss stalled at the constant-output level) whatever the period, else the period's."""
    if dead:
        return "dead plateau"
    if not np.isfinite(period) or period < 1:
        return ""
    if period == 1:
        return "frozen (fixed point)"
    return f"periodic (period {int(period)})"


def curvature_words(verdict: str, ftle_regime: str, end: str = "") -> str:
    """The curvature verdict in words that agree with the FTLE regime and the end state of the
    same run."""
    if verdict.startswith("flat plateau") and end in ("dead plateau", "frozen (fixed point)"):
        return verdict.replace("flat plateau", end, 1)
    if verdict == "unstable" and end.startswith("periodic"):  # above 2/η, yet on a stable orbit
        return f"above threshold (on the {end.split('(')[1].rstrip(')')} orbit)"
    if verdict.startswith("stable") and ftle_regime in CHAOTIC_REGIMES:
        return verdict.replace("stable", "below threshold", 1)
    return verdict


def _window_ftle(lya: xr.Dataset, g: int) -> float:
    """The tangent λ1 averaged over the windows that overlap group g's replica-fit window."""
    if "fit_start" not in lya or "window" not in lya["ftle"].dims:
        return float("nan")
    lo, hi = float(lya["fit_start"].values[g]), float(lya["fit_stop"].values[g])
    w = int(lya.attrs.get("ftle_window", 0)) or 1
    ftle = np.asarray(lya["ftle"].values[g], np.float64)
    ftle = ftle[..., 0] if ftle.ndim > 1 else ftle
    starts = np.arange(ftle.size) * w + int(lya.attrs.get("t_start", 0))
    sel = (starts + w > lo) & (starts < hi) & np.isfinite(ftle)
    return float(ftle[sel].mean()) if sel.any() else float("nan")


def tangent_vs_replica(lya: xr.Dataset, g: int, tangent_reason: str = "") -> str:
    """'agree', 'disagree (…)' or 'n/a (…)' for group g by :data:`REGIME_LINE_RULE`."""
    if tangent_reason:
        return "n/a (no tangent exponents: the step is not smooth)"
    if not bool(lya["fit_accepted"].values[g]):
        return "n/a (no accepted replica fit)"
    slope = float(lya["fit_slope"].values[g])
    lam = _window_ftle(lya, g)
    if not np.isfinite(lam):
        return "n/a (no tangent FTLE in the fit window)"
    width = float(lya["fit_stop"].values[g]) - float(lya["fit_start"].values[g])
    ratio = lam / slope if slope else np.inf
    if (ratio < 0.5 or ratio > 2.0) and abs(lam - slope) * width >= 5.0:
        return f"disagree (tangent {fmt(lam)} vs replicas {fmt(slope)} per step)"
    return f"agree (tangent {fmt(lam)} vs replicas {fmt(slope)} per step)"


def regime_of(verdict: str, ftle_regime: str, end: str = "") -> str:
    """The run's reconciled regime by :data:`REGIME_LINE_RULE`."""
    before = f" (after: {ftle_regime})" if ftle_regime in CHAOTIC_REGIMES else ""
    if end:
        return f"{end}{before}"
    if verdict.startswith("flat plateau"):
        return f"flat plateau{before}"
    return ftle_regime or verdict or "n/a"


def end_state_of(lya: xr.Dataset | None, g: int) -> str:
    """:func:`end_state` of group g from a stored lyapunov group ('' without one)."""
    if lya is None or "period" not in lya:
        return ""
    return end_state(float(lya["period"].values[g]), bool(lya["dead"].values[g]))


def regime_markdown(groups: dict[str, xr.Dataset], results) -> list[str]:
    """The "Regime of each run" section, or [] when neither FTLEs nor curvature were stored."""
    lya, curv, ser = groups.get("lyapunov"), groups.get("curvature"), groups.get("series")
    base = lya if lya is not None else curv
    if base is None:
        return []
    reason = str(results.attrs.get("tangent_reason", ""))
    lines = [
        "## Regime of each run",
        "",
        REGIME_LINE_RULE,
        "",
        *table_head(
            "η",
            "seed",
            "regime",
            "curvature",
            "FTLE regime",
            "end state",
            "0–1 K",
            "tangents vs replicas",
        ),
    ]
    for g in range(base.sizes["group"]):
        ftle = str(lya["regime"].values[g]) if lya is not None else ""
        verdict = str(curv["verdict"].values[g]) if curv is not None else ""
        k01 = "n/a"
        if ser is not None:
            k = float(ser["k01"].values[g])
            k01 = fmt(k, ".2f") if np.isfinite(k) else "n/a"
        agree = tangent_vs_replica(lya, g, reason) if lya is not None else "n/a"
        end = end_state_of(lya, g)
        lines.append(
            f"| {float(base['learning_rate'].values[g]):.4g} | {int(base['seed'].values[g])} | "
            f"{regime_of(verdict, ftle, end)} | {curvature_words(verdict, ftle, end) or 'n/a'} | "
            f"{ftle or 'n/a'} | {end or 'none'} | {k01} | {agree} |"
        )
    if reason:
        lines += [
            "",
            f"Tangent exponents, CLVs and FTLEs are n/a: {reason}. The replica estimates "
            "(separation fits) are the measure of this run.",
        ]
    return [*lines, ""]


__all__ = [
    "CHAOTIC_REGIMES",
    "REGIME_LINE_RULE",
    "curvature_words",
    "end_state",
    "end_state_of",
    "regime_markdown",
    "regime_of",
    "tangent_vs_replica",
]
