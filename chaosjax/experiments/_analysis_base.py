"""What every analysis stage of a run shares: the reference runs (member 0 of each group), their
xarray coordinates, the tangent tracker of the config and the FTLE regime and sign rules.

Re-exported by :mod:`chaosjax.experiments.analyses`.
"""

from __future__ import annotations

import numpy as np

from chaosjax.experiments._sections import BaseConfig
from chaosjax.experiments.stats import over_seeds


def reference_groups(batch) -> np.ndarray:
    """Indices of the reference replicas (member 0), one per (seed, grid point)."""
    return np.flatnonzero(np.asarray(batch.coords["member"]) == 0)


def group_coords(batch, refs) -> dict:
    """xarray coordinates of a per-reference-run analysis: group, reference, seed, η."""
    return {
        "group": np.arange(len(refs)),
        "reference": ("group", refs),
        "seed": ("group", np.asarray(batch.coords["seed"])[refs]),
        "learning_rate": ("group", learning_rate_labels(batch)[refs]),
    }


def learning_rate_labels(batch) -> np.ndarray:
    """(R,) η of each replica: its hyper-parameter, or the label the runner gives a map whose
    own optimizer or train step sets η."""
    hp = batch.hparams if isinstance(batch.hparams, dict) else {}
    if "learning_rate" in hp:
        return np.asarray(hp["learning_rate"], np.float64)
    return np.asarray(batch.coords["learning_rate"], np.float64)


def tangent_tracker(cfg: BaseConfig):
    """The one :class:`chaosjax.LyapunovTracker` of a run (None when no stage needs tangents).

    It serves the Lyapunov stage (exponents and FTLEs from ``lyapunov.warmup``), the CLV stage
    (its R factors and bases over the CLV window: the top-left blocks of the same QR process)
    and the control stage (λ1 over the last ``control.lyapunov_steps`` steps): k is the
    largest k asked for, and every number comes from the tangents of the recorded run.
    """
    import math

    from chaosjax.observers import CLVWindow, LyapunovTracker

    ly, c, ctl = cfg.lyapunov, cfg.clv, cfg.control
    if not (ly.enabled or c.enabled or ctl.enabled):
        return None
    k = max(ly.k if ly.enabled else 1, c.k if c.enabled else 1)
    if ly.enabled:
        warmup = ly.warmup
    elif c.enabled:
        warmup = 0
    else:
        warmup = cfg.steps - ctl.lyapunov_steps
    if c.enabled and not ly.enabled and ctl.enabled:
        warmup = min(c.align, cfg.steps - ctl.lyapunov_steps)
        warmup -= warmup % cfg.record_every
    window = None
    if c.enabled:
        re = ly.renorm_every
        n = c.steps or cfg.steps - c.align - c.backward_transient
        unit = math.lcm(cfg.record_every, re)
        keep = c.keep_every or unit * max(1, n // 10 // unit)
        window = CLVWindow(c.align, n, c.backward_transient, keep, keep == cfg.record_every)
    return LyapunovTracker(
        k=k, renorm_every=ly.renorm_every, warmup=warmup, rows="references", clv=window
    )


#: the regime of a run from its finite-time exponents (summaries repeat it)
REGIME_RULE = (
    "Regime of a run from its finite-time λ1 over consecutive windows of W steps: a window is "
    "*expanding* when λ1·W ≥ 5 (nearby trajectories separate by at least e⁵ within it). "
    "*Regular*: no expanding window; *chaotic throughout*: at least 80 % of the windows, the "
    "last one included, are expanding; *transient chaos then frozen*: the expanding windows "
    "form one block that ends before the last quarter of the run; *late onset*: one block that "
    "reaches into the last quarter; *intermittent*: two or more separate blocks."
)

#: when a sign of λ1 is claimed (summaries repeat it)
SIGN_RULE = (
    "λ1 > 0 is claimed when its mean over seeds times the accumulated steps T is ≥ 5 (growth "
    "by at least e⁵) and the mean lies more than 3 standard errors over seeds above 0 (at least "
    "3 seeds); < 0 likewise; otherwise *not resolved*: |λ1|·T < 5, or the seeds differ (the "
    "mean within 3 standard errors of 0); with fewer than 3 seeds no sign is claimed and each "
    "seed is shown."
)


def regime(ftle, window: int, diverged_step: int = -1) -> str:
    """The regime of one run by :data:`REGIME_RULE` from its λ1 FTLE windows (per step)."""
    f = np.asarray(ftle, np.float64)
    if diverged_step >= 0:
        return f"diverged (step {diverged_step})"
    f = f[np.isfinite(f)]
    if f.size == 0:
        return "n/a (no finite window)"
    e = f * window >= 5.0
    if not e.any():
        return "regular"
    n = e.size
    late = n - max(1, -(-n // 4))  # first window of the last quarter
    starts = np.flatnonzero(e & ~np.r_[False, e[:-1]])
    if e.mean() >= 0.8 and e[-1]:
        return "chaotic throughout"
    if starts.size >= 2:
        return "intermittent"
    end = int(np.flatnonzero(e)[-1])
    return "transient chaos then frozen" if end < late else "late onset"


def sign_of(values, steps: int) -> str:
    """The sign of λ1 over seeds by :data:`SIGN_RULE`."""
    s = over_seeds(values)
    if s.n == 0:
        return "n/a"
    if s.n < 3:
        return f"not claimed ({s.n} seed{'s' if s.n > 1 else ''})"
    if abs(s.mean) * steps < 5:
        return "not resolved (|λ1|·T < 5)"
    if s.mean - 3 * s.sem > 0:
        return "> 0"
    if s.mean + 3 * s.sem < 0:
        return "< 0"
    return "not resolved (within 3 SE over seeds)"


#: the rule of the orbit labels (summaries repeat it)
