"""The period of a running run: :class:`PeriodTracker`, an observer of
:func:`chaosjax.run_replicas` (exported as :class:`chaosjax.orbits.PeriodTracker`).

It keeps, for every tracked replica, a ring buffer of the last ``window`` states (projected
on at most 16 coordinates or 8 projections, see :func:`probe`) advanced after every step inside the
engine's chunk, and records at the run's record cadence the period of that window with the
rule of :func:`chaosjax.orbits.detect_period` — on the one recorded trajectory.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from chaosjax._observer import Observer
from chaosjax.observers import Record, dynamic_rows


def probe_index(dim: int) -> np.ndarray:
    """The probe columns: all coordinates up to 16, else 8 projections (see :func:`probe`)."""
    return np.arange(dim) if dim <= 16 else np.arange(8)


def _projections(dim: int) -> np.ndarray:
    """8 fixed random unit directions (dim, 8) of the whole state (seeded, the same for every
    run of that dimension)."""
    p = np.random.default_rng(20261203).standard_normal((dim, 8))
    return p / np.linalg.norm(p, axis=0, keepdims=True)


def probe(x):
    """What a period is detected on, (..., p): every coordinate up to 16, else 8 fixed random
    projections of the whole state. A periodic state has periodic projections; projections of
    a non-periodic trajectory all repeating within the tolerance happens with probability 0
    (a subset of coordinates would not do: in a network whose saturated units are frozen,
    those coordinates repeat while the rest of the state moves)."""
    dim = x.shape[-1]
    if dim <= 16:
        return x
    return x @ jnp.asarray(_projections(dim), x.dtype)


def window_periods(buf, tol: float, max_period: int):
    """Periods of windows ``buf`` (B, W, p), jittable: the smallest k ≤ min(max_period, W // 2)
    with max_t ‖b_{t+k} − b_t‖ ≤ tol · max_t ‖b_t‖; 0 for none or a non-finite window."""
    kmax = min(int(max_period), buf.shape[1] // 2)
    finite = jnp.all(jnp.isfinite(buf), axis=(1, 2))
    b = jnp.where(jnp.isfinite(buf), buf, 0.0)
    scale = jnp.maximum(jnp.max(jnp.linalg.norm(b, axis=-1), axis=1), 1e-300)
    out = jnp.zeros(b.shape[0], jnp.int32)
    for k in range(kmax, 0, -1):
        d = jnp.max(jnp.linalg.norm(b[:, k:] - b[:, :-k], axis=-1), axis=1)
        out = jnp.where(d <= tol * scale, k, out)
    return jnp.where(finite, out, 0)


@dataclasses.dataclass(frozen=True)
class PeriodTracker(Observer):
    """The period of each tracked replica's last ``window`` states, recorded as ``period``
    (replica, step) at the run's record cadence.

    After every step the tracked rows' dynamical coordinates (up to 16 of them, see
    :func:`probe`) enter a ring buffer of ``window`` states; at each record the period
    is that of :func:`chaosjax.orbits.detect_period` on the buffer with ``tol`` and
    ``max_period`` (≤ window // 2): k ≥ 1, 0 for none, NaN until ``window`` states have been
    seen and for rows it does not track.

    Args:
        window: the states examined (the last ``window`` steps, the current state included).
        tol: the state tolerance relative to the largest ‖x_t‖ in the window.
        max_period: the largest period tried.
        rows: ``"all"`` (default) or ``"references"``.
        name: the record's name.
    """

    window: int = 128
    tol: float = 1e-7
    max_period: int = 64
    rows: str = "all"
    name: str = "period"

    advances = True

    def records(self, model):
        return {self.name: Record("step", (), "record")}

    def validate(self, model, dim=None, info=None):
        if self.rows not in ("all", "references"):
            raise ValueError(f"rows: unknown {self.rows!r}; allowed: all, references")
        w = self.window
        if isinstance(w, bool) or not isinstance(w, int | np.integer) or w < 2:
            raise ValueError(f"window: must be an integer >= 2, got {w!r}")
        m = self.max_period
        if isinstance(m, bool) or not isinstance(m, int | np.integer) or m < 1:
            raise ValueError(f"max_period: must be an integer >= 1, got {m!r}")
        if not (isinstance(self.tol, int | float) and math.isfinite(self.tol) and self.tol > 0):
            raise ValueError(f"tol: must be a positive finite number, got {self.tol!r}")

    def _probe(self, x):
        return probe(x)

    def _values(self, buf, seen):
        k = window_periods(buf, float(self.tol), int(self.max_period)).astype(buf.dtype)
        return {self.name: jnp.where(seen >= self.window, k, jnp.nan)}

    def init(self, model, states, hparams, t):
        p = self._probe(dynamic_rows(states))
        buf = jnp.zeros((p.shape[0], int(self.window), p.shape[1]), p.dtype).at[:, -1].set(p)
        seen = jnp.ones((p.shape[0],), jnp.int32)  # per row: observer states are row-major
        return self._values(buf, seen), (buf, seen)

    def update(self, model, states, hparams, state, t):
        return self._values(*state), state

    def advance(self, info, ctx, state):
        buf, seen = state
        p = self._probe(ctx.x_next)
        buf = jnp.concatenate([buf[:, 1:], p[:, None].astype(buf.dtype)], axis=1)
        return (buf, seen + 1), {}, None

    def memory(self, info, flow, x1, carry1, args1) -> dict[str, int]:
        p = len(probe_index(int(x1.shape[0])))
        return {type(self).__name__: 2 * int(self.window) * p * np.dtype(x1.dtype).itemsize}


__all__ = ["PeriodTracker", "probe", "probe_index", "window_periods"]
