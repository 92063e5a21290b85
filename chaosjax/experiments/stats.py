"""Statistics across seeds as the reports show them (docs/architecture.md, reporting rules): mean ±
standard error over seeds with the per-seed values beside it; a within-run error never
stands in for the spread between seeds."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from chaosjax._util import fmt

#: a loss has stalled when its range over a window is below this share of its level (the 0–1
#: test does not apply there, and a stalled loss at the constant-output level is a dead plateau)
STALLED_RTOL = 1e-4

#: seeds listed one by one in a table cell (more: their range)
MAX_LISTED = 10


class OverSeeds(NamedTuple):
    """``mean`` and standard error ``sem`` over the finite per-seed ``values`` (``n`` of
    them; sem NaN with fewer than 2)."""

    mean: float
    sem: float
    n: int
    values: np.ndarray


def over_seeds(values) -> OverSeeds:
    v = np.asarray(values, np.float64).ravel()
    ok = v[np.isfinite(v)]
    n = int(ok.size)
    mean = float(ok.mean()) if n else float("nan")
    sem = float(ok.std(ddof=1) / np.sqrt(n)) if n >= 2 else float("nan")
    return OverSeeds(mean, sem, n, v)


def seeds_cell(values, spec: str = ".3g") -> str:
    """``mean ± sem (v1, v2, …)`` for a table cell: per-seed values listed (their range when
    there are more than :data:`MAX_LISTED`); NaN values shown as n/a."""
    s = over_seeds(values)
    head = f"{fmt(s.mean, spec)} ± {fmt(s.sem, '.1g')}" if s.n >= 2 else fmt(s.mean, spec)
    v = s.values
    if v.size <= MAX_LISTED:
        tail = ", ".join(fmt(x, spec) for x in v)
    else:
        ok = v[np.isfinite(v)]
        rng = f"{fmt(ok.min(), spec)} … {fmt(ok.max(), spec)}" if ok.size else "n/a"
        tail = f"{v.size} seeds, range {rng}"
    return f"{head} ({tail})"


def finite_prefix(x: np.ndarray) -> np.ndarray:
    """The values before the first non-finite one."""
    bad = ~np.isfinite(x)
    return x[: int(np.argmax(bad))] if bad.any() else x


def last_finite(x: np.ndarray) -> float:
    """The last value before the series stops being finite (NaN if it never was)."""
    p = finite_prefix(np.asarray(x, np.float64))
    return float(p[-1]) if p.size else float("nan")


__all__ = [
    "MAX_LISTED",
    "STALLED_RTOL",
    "OverSeeds",
    "finite_prefix",
    "last_finite",
    "over_seeds",
    "seeds_cell",
]
