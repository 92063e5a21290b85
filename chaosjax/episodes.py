"""Instability episodes: loss spikes, sharpness excursions above the stability threshold and
bursts of replica divergence found in one run's recorded series, each labelled *helpful*,
*harmful*, *neutral* or *unresolved* by the rule in :data:`EPISODE_RULE`.

Post-hoc analysis of numpy series (no JAX); the controllers that *set* the stability of
training are in :mod:`chaosjax.control`. A loss spike starts where
:func:`chaosjax.series.spike_mask` fires (the one spike detector of the package: the loss
above ``spike_factor`` × its running minimum).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from chaosjax.series import spike_mask

#: the documented detection and labelling rule (summaries repeat it)
EPISODE_RULE = (
    "Episodes are found on recorded series. A *loss spike* starts when the training loss "
    "exceeds spike_factor × its running minimum (the baseline) and ends when the loss is back "
    "within recover_factor × that baseline. A *sharpness excursion* starts when sharpness / "
    "threshold exceeds excursion and ends when it is back at or below 1. A *divergence burst* "
    "starts when the replica distance grows by burst_decades decades within burst_window "
    "records and ends when it stops growing. Overlapping intervals of any kind are one "
    "episode. Labels: *harmful* if the loss becomes non-finite or exceeds loss_bound between "
    "the start and the end of the episode (divergence; a divergence after an episode has "
    "recovered is an episode of its own), or if the loss has not returned within recover_factor × the "
    "pre-episode baseline within `recovery` steps of the start (no recovery); *unresolved* if "
    "it has not recovered but the run ended before that window closed; otherwise "
    "*helpful* if, settle records after the end, the sharpness is below (1 − tolerance) × the "
    "matched stable run's sharpness at the same step (without a matched run: the sharpness "
    "just before the episode), or the held-out loss is below (1 − tolerance) × the matched "
    "run's held-out loss at the same step (this test needs a matched run: a falling loss is "
    "always below its own past); otherwise *neutral* (recovered, neither flatter nor better)."
)


class Episode(NamedTuple):
    """One instability episode (steps are training steps; ``end`` = -1: did not end).

    ``numbers`` holds what the label was decided on: ``peak_ratio`` (peak loss / baseline),
    ``recovered_step`` (-1: never), ``sharpness_before``, ``sharpness_after``,
    ``reference_sharpness``, ``test_loss_before``, ``test_loss_after``,
    ``reference_test_loss`` (NaN when not available).
    """

    start: int
    peak: int
    end: int
    kinds: tuple[str, ...]
    label: str
    reason: str
    numbers: dict


def _series(name, x, n=None):
    if x is None:
        return None
    a = np.asarray(x, np.float64)
    if a.ndim == 0 and n is not None:
        return np.full(n, float(a))
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D series over records, got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name}: expected {n} records like loss, got {a.shape[0]}")
    return a


def _prior_min(loss: np.ndarray) -> np.ndarray:
    """(n,) minimum of the finite values strictly before each record (inf: none yet)."""
    acc = np.minimum.accumulate(np.where(np.isfinite(loss), loss, np.inf))
    return np.concatenate([[np.inf], acc[:-1]])


def _intervals_loss(loss, prior, spike_factor, recover_factor):
    out = []
    n = loss.shape[0]
    fires = spike_mask(loss, factor=spike_factor)  # above spike_factor × the running minimum
    i = 1
    while i < n:
        base = prior[i]
        if not np.isfinite(base):
            i += 1
            continue
        if not fires[i] and np.isfinite(loss[i]):  # a non-finite loss starts one too
            i += 1
            continue
        start, j = i, i
        while j < n and not (np.isfinite(loss[j]) and loss[j] <= recover_factor * base):
            j += 1
        end = j if j < n else -1
        seg = loss[start : (j if j < n else n)]
        peak = (
            start + int(np.nanargmax(np.where(np.isfinite(seg), seg, np.inf)))
            if seg.size
            else start
        )
        out.append((start, peak, end, "loss_spike"))
        i = j + 1 if j < n else n
    return out


def _intervals_ratio(ratio, excursion):
    out = []
    n = ratio.shape[0]
    i = 0
    while i < n:
        if not (np.isfinite(ratio[i]) and ratio[i] > excursion):
            i += 1
            continue
        start, j = i, i
        while j < n and not (np.isfinite(ratio[j]) and ratio[j] <= 1.0):
            j += 1
        seg = ratio[start:j]
        peak = start + int(np.nanargmax(seg)) if np.isfinite(seg).any() else start
        out.append((start, peak, j if j < n else -1, "sharpness"))
        i = j + 1
    return out


def _intervals_burst(distance, decades, window):
    out = []
    with np.errstate(divide="ignore", invalid="ignore"):
        logd = np.log10(distance)
    n = logd.shape[0]
    i, after = 1, 0  # growth is measured from records after the previous burst
    while i < n:
        lo = logd[max(after, i - window) : i]
        lo = lo[np.isfinite(lo)]
        if lo.size == 0 or not np.isfinite(logd[i]) or logd[i] - lo.min() < decades:
            i += 1
            continue
        start, j = i, i
        while j + 1 < n and np.isfinite(logd[j + 1]) and logd[j + 1] > logd[j]:
            j += 1
        out.append((start, j, j if j + 1 < n else -1, "divergence_burst"))
        i = after = j + 1
    return out


def _merge(intervals, n):
    """Merge overlapping (start, peak, end, kind) intervals (end -1 = open to the end)."""
    items = sorted(intervals)
    merged = []
    for s, p, e, kind in items:
        e_eff = n - 1 if e < 0 else e
        if merged and s <= merged[-1]["end_eff"]:
            m = merged[-1]
            m["kinds"].add(kind)
            m["end_eff"] = max(m["end_eff"], e_eff)
            m["open"] = m["open"] or e < 0
            if kind == "loss_spike":
                m["peak"] = p
        else:
            merged.append({"start": s, "peak": p, "end_eff": e_eff, "open": e < 0, "kinds": {kind}})
    return merged


def _recovered_label(numbers: dict, recovered: int, tolerance: float) -> tuple[str, str]:
    """(label, reason) of an episode that recovered in time: helpful when it ends flatter than
    the reference (or its own start) or with a better held-out loss than a matched run, else
    neutral."""
    ref_sharp = numbers["reference_sharpness"]
    if not np.isfinite(ref_sharp):
        ref_sharp = numbers["sharpness_before"]
    ref_test = numbers["reference_test_loss"]  # only against a matched run
    flatter = np.isfinite(ref_sharp) and numbers["sharpness_after"] < (1 - tolerance) * ref_sharp
    better = np.isfinite(ref_test) and numbers["test_loss_after"] < (1 - tolerance) * ref_test
    if flatter or better:
        label = "helpful"
        why = []
        if flatter:
            why.append(f"sharpness {numbers['sharpness_after']:.3g} < {ref_sharp:.3g}")
        if better:
            why.append(f"held-out loss {numbers['test_loss_after']:.3g} < {ref_test:.3g}")
        reason = f"recovered at step {recovered}; " + ", ".join(why)
    else:
        label = "neutral"
        reason = f"recovered at step {recovered}; neither flatter nor a better held-out loss"
    return label, reason


def instability_episodes(
    loss,
    *,
    steps=None,
    sharpness=None,
    threshold=None,
    distance=None,
    test_loss=None,
    reference_sharpness=None,
    reference_test_loss=None,
    spike_factor: float = 2.0,
    recover_factor: float = 1.1,
    excursion: float = 1.1,
    burst_decades: float = 2.0,
    burst_window: int = 10,
    recovery: int | None = None,
    settle: int = 5,
    tolerance: float = 0.05,
    loss_bound: float = 1e8,
) -> list[Episode]:
    """Find and label instability episodes in one run's recorded series (rule:
    :data:`EPISODE_RULE`).

    Args:
        loss: (n,) training loss at the records.
        steps: (n,) training steps of the records (default 0 … n−1).
        sharpness: (n,) λmax of the (preconditioned) Hessian, with ``threshold`` (scalar or
            (n,), e.g. 2/η) for excursions and flatness.
        distance: (n,) distance of a perturbed replica to this run, for divergence bursts.
        test_loss: (n,) held-out loss.
        reference_sharpness, reference_test_loss: (n,) the same series of a matched stable run
            (same initialisation, a stable η), recorded at the same steps. Without them an
            episode is *helpful* only if it ends flatter than it started.
        spike_factor, recover_factor, excursion, burst_decades, burst_window, settle,
            tolerance, loss_bound: the thresholds of the rule.
        recovery: steps within which the loss must recover (default: a quarter of the run).

    Returns:
        the episodes in time order.
    """
    loss = _series("loss", loss)
    n = loss.shape[0]
    if n < 2:
        raise ValueError(f"loss: needs at least 2 records, got {n}")
    steps = np.arange(n) if steps is None else np.asarray(steps)
    if steps.shape != (n,):
        raise ValueError(f"steps: expected shape ({n},), got {steps.shape}")
    sharp = _series("sharpness", sharpness, n)
    thr = _series("threshold", threshold, n)
    dist = _series("distance", distance, n)
    test = _series("test_loss", test_loss, n)
    ref_s = _series("reference_sharpness", reference_sharpness, n)
    ref_t = _series("reference_test_loss", reference_test_loss, n)
    for name, v in (("spike_factor", spike_factor), ("recover_factor", recover_factor)):
        if not v >= 1.0:
            raise ValueError(f"{name}: must be >= 1, got {v!r}")
    if recover_factor > spike_factor:
        raise ValueError(
            f"recover_factor: must be <= spike_factor={spike_factor}, got {recover_factor}"
        )
    if not excursion >= 1.0:
        raise ValueError(f"excursion: must be >= 1, got {excursion!r}")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance: must be in [0, 1), got {tolerance!r}")
    if recovery is None:
        recovery = max(1, int(steps[-1] - steps[0]) // 4)

    bad = ~np.isfinite(loss) | (loss > loss_bound)
    first_bad = int(np.argmax(bad)) if bad.any() else -1
    prior = _prior_min(loss)
    intervals = _intervals_loss(loss, prior, spike_factor, recover_factor)
    if sharp is not None and thr is not None:
        intervals += _intervals_ratio(sharp / thr, excursion)
    if dist is not None:
        intervals += _intervals_burst(dist, burst_decades, int(burst_window))
    if first_bad >= 0 and not any(
        s <= first_bad <= (n - 1 if e < 0 else e) for s, _, e, _ in intervals
    ):
        intervals.append((first_bad, first_bad, -1, "divergence"))

    nan = float("nan")
    episodes = []
    for m in _merge(intervals, n):
        s, p = m["start"], m["peak"]
        end = -1 if m["open"] else m["end_eff"]
        before = max(s - 1, 0)
        baseline = float(prior[max(s, 1)]) if np.isfinite(prior[max(s, 1)]) else nan
        peak_loss = loss[s : m["end_eff"] + 1]
        peak_loss = peak_loss[np.isfinite(peak_loss)]
        rec = np.flatnonzero(
            (np.arange(n) >= s) & np.isfinite(loss) & (loss <= recover_factor * baseline)
        )
        recovered = int(steps[rec[0]]) if rec.size else -1
        after = min((m["end_eff"] if end >= 0 else n - 1) + settle, n - 1)
        numbers = {
            "baseline_loss": baseline,
            "peak_ratio": float(peak_loss.max() / baseline)
            if peak_loss.size and baseline > 0
            else nan,
            "recovered_step": recovered,
            "sharpness_before": float(sharp[before]) if sharp is not None else nan,
            "sharpness_after": float(sharp[after]) if sharp is not None else nan,
            "reference_sharpness": float(ref_s[after]) if ref_s is not None else nan,
            "test_loss_before": float(test[before]) if test is not None else nan,
            "test_loss_after": float(test[after]) if test is not None else nan,
            "reference_test_loss": float(ref_t[after]) if ref_t is not None else nan,
        }
        if s <= first_bad <= m["end_eff"]:  # a divergence after the recovery is its own episode
            label, reason = "harmful", f"diverged at step {int(steps[first_bad])}"
        elif recovered < 0 and int(steps[-1]) - int(steps[s]) < recovery:
            label = "unresolved"
            reason = (
                f"the run ended {int(steps[-1]) - int(steps[s])} steps after the start, before "
                f"the recovery window of {recovery} steps closed"
            )
        elif recovered < 0 or recovered - int(steps[s]) > recovery:
            label = "harmful"
            reason = (
                f"no recovery within {recovery} steps: the loss stayed above "
                f"{recover_factor:g} × baseline {baseline:.3g}"
                + ("" if recovered < 0 else f" until step {recovered}")
            )
        else:
            label, reason = _recovered_label(numbers, recovered, tolerance)
        episodes.append(
            Episode(
                start=int(steps[s]),
                peak=int(steps[p]),
                end=int(steps[end]) if end >= 0 else -1,
                kinds=tuple(sorted(m["kinds"])),
                label=label,
                reason=reason,
                numbers=numbers,
            )
        )
    return episodes


def count_labels(episodes: Sequence[Episode]) -> dict[str, int]:
    """{"helpful": …, "harmful": …, "neutral": …, "unresolved": …} counts."""
    out = {"helpful": 0, "harmful": 0, "neutral": 0, "unresolved": 0}
    for e in episodes:
        out[e.label] += 1
    return out


__all__ = ["EPISODE_RULE", "Episode", "count_labels", "instability_episodes"]
