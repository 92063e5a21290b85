"""Orbits and bifurcations: where training locks, doubles its period and turns chaotic.

* :func:`detect_period` — the period of a recorded series of states (1 = fixed point, 0 =
  none within the tolerance);
* :func:`find_periodic_orbit` — a period-k orbit of any map by Newton–Krylov on
  F^k(x) − x (JVPs only, lineax's GMRES), with its Floquet multipliers;
* :func:`bifurcation` — hundreds of parameter values as one batched run of the engine
  (:func:`chaosjax.run_replicas`): the attractor sampled after a transient, the period and
  the leading Lyapunov exponent per value, and the values where the period changes, refined
  by bisection;
* :func:`plot_bifurcation` — the diagram above λ1(value).

Maps are adapted exactly as the engine adapts them (:func:`chaosjax._layout.plain_flow` for
``step(x, t)`` on any pytree state, ``TrainingMap.flow`` for training maps): the dynamical
coordinates are the flat float vector, the carried part (integer counters, keys, running
statistics) rides along and is held at its starting value during a Newton solve.

References:
    Feigenbaum, M. J. (1978). Quantitative universality for a class of nonlinear
    transformations.
    Kelley, C. T. (2003). Solving Nonlinear Equations with Newton's Method (Newton–Krylov).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from chaosjax._layout import layout_of, split_state
from chaosjax._map import is_training_map
from chaosjax._orbit_newton import (
    DENSE_MAX,
    Orbit,
    _adapt,
    _certify,
    _check_int,
    _check_tol,
    _Map,
    _solve,
)
from chaosjax._orbit_observer import PeriodTracker, probe
from chaosjax._orbit_plots import plot_bifurcation
from chaosjax._util import as_traceable

# ---------------------------------------------------------------------------------------------
# periods of a series


def _periods(tail: np.ndarray, tol: float, max_period: int, scale=None) -> np.ndarray:
    """Periods of a batch of windows ``tail`` (B, n, p) (float64 on the host)."""
    tail = np.asarray(tail, np.float64)
    n = tail.shape[1]
    kmax = min(max_period, n // 2)
    finite = np.all(np.isfinite(tail), axis=(1, 2))
    t = np.where(np.isfinite(tail), tail, 0.0)
    if scale is None:
        scale = np.max(np.linalg.norm(t, axis=-1), axis=1)
    scale = np.maximum(np.broadcast_to(np.asarray(scale, np.float64), (t.shape[0],)), 1e-300)
    out = np.zeros(t.shape[0], np.int64)
    for k in range(kmax, 0, -1):  # descending: the smallest k that holds wins
        d = np.max(np.linalg.norm(t[:, k:] - t[:, :-k], axis=-1), axis=1)
        out = np.where(d <= tol * scale, k, out)
    return np.where(finite, out, 0)


def detect_period(states, *, tol: float = 1e-7, window: int | None = None, max_period: int = 64,
                  scale: float | None = None) -> int:  # fmt: skip
    """The period of a series of states: the smallest k with ‖x_{t+k} − x_t‖ ≤ tol·scale for
    every pair (t, t + k) inside the window.

    Args:
        states: (T, ...) states, rows = time (each row flattened to a vector; a 1-D array is a
            scalar series). At least 2 rows.
        tol: the state tolerance, relative to ``scale``.
        window: the last ``window`` rows are examined (default: the last half, at least 2).
        max_period: the largest period tried. A period k is only accepted when the window
            holds at least two of its cycles (k ≤ window // 2), so periods above
            ``window // 2`` are never reported.
        scale: the states' scale (default: the largest ‖x_t‖ in the window). A series that
            decays geometrically to the origin is not a fixed point relative to its own size:
            pass an absolute ``scale`` (e.g. 1.0) for such series.

    Returns:
        k ≥ 1 (1 = fixed point), or 0 for none (no period up to the limit, or a non-finite
        state in the window: chaos, quasi-periodicity or a transient that has not settled).
    """
    x = np.asarray(states)
    if x.ndim == 0 or x.shape[0] < 2:
        raise ValueError(f"states: need at least 2 rows (rows = time), got shape {x.shape}")
    x = x.reshape(x.shape[0], -1) if x.ndim > 1 else x[:, None]
    n = x.shape[0]
    tol = _check_tol("tol", tol)
    max_period = _check_int("max_period", max_period, 1)
    window = max(2, n // 2) if window is None else _check_int("window", window, 2, n)
    if scale is not None:
        scale = _check_tol("scale", scale)
    return int(_periods(x[None, n - window :], tol, max_period, scale)[0])


# ---------------------------------------------------------------------------------------------
# periodic orbits


def find_periodic_orbit(
    step: Callable,
    x0,
    period: int,
    *,
    tol: float = 1e-10,
    max_iter: int = 50,
    t0: int = 0,
    args=None,
    n_multipliers: int = 10,
    dense_max: int = DENSE_MAX,
) -> Orbit:
    """A period-k orbit of ``step`` near ``x0``: Newton–Krylov on G(x) = F^k(x) − x.

    Each Newton step solves (∂F^k/∂x − I) dx = −G(x) with lineax's GMRES on a
    ``FunctionLinearOperator`` of ``jax.linearize`` (matrix-free: JVPs of the k-step map,
    never a dense Jacobian), followed by a backtracking line search (halving the step until
    ‖G‖ decreases). The whole solve is one jitted program per map (the period is an argument
    of it, not a constant). Fixed points that are not isolated (a continuum of minima of an
    over-parameterised network: multipliers exactly 1 along it) make F^k − I singular; Newton
    may then stall, and ``converged`` is False.

    The map is the engine's flat form of ``step`` (the same adapter as
    :func:`chaosjax.run_replicas`): for ``step(x, t)`` on a pytree state the float leaves are
    solved for and integer leaves / keys are carried; for a :class:`chaosjax.TrainingMap`
    (pass the map or its ``.step``) the unknowns are the flat float coordinates (parameters and
    float optimizer moments) and the carried part (step counters, ``MultiSteps`` counts, PRNG
    keys, BatchNorm statistics) is held fixed at its value in ``x0`` during the solve: the
    orbit is one of the k-step map F^k = F_{t0+k−1} ∘ … ∘ F_{t0} from that carry. For an
    autonomous map (a plain map, full-batch GD) ``t0`` is irrelevant; for a time-dependent one
    the orbit is of the map at fixed t0 (pass ``t0=0`` unless you mean otherwise).

    Floquet multipliers: the eigenvalues of ∂F^k/∂x at the orbit, leading by magnitude. Up to
    ``dense_max`` coordinates (default 256) the Jacobian is built densely (``jax.jacfwd``) and
    all eigenvalues come from ``numpy.linalg.eig``; above it an Arnoldi iteration of chaosjax's
    own (max(4n, 40) JVPs, full reorthogonalisation, no restarts) gives Ritz values, accurate
    for the well-separated leading multipliers.

    Args:
        step: ``step(x, t) -> x`` (``step(x, t, args)`` with ``args``), or a TrainingMap.
        x0: the starting guess (a state of the map).
        period: k ≥ 1.
        tol: convergence when ‖F^k(x) − x‖ ≤ tol·max(1, ‖x‖).
        max_iter: the Newton iteration budget.
        t0: the time of the first step of the orbit.
        args: the step's third argument (a training map: its hyper-parameter dict; default
            the map's own).
        n_multipliers: how many leading multipliers are returned (at most dim).
        dense_max: the dimension up to which the Jacobian is dense.

    Returns:
        :class:`Orbit`.
    """
    if isinstance(period, bool) or not isinstance(period, int | np.integer) or period < 1:
        raise ValueError(f"period: must be an integer >= 1, got {period!r}")
    tol = _check_tol("tol", tol)
    max_iter = _check_int("max_iter", max_iter, 1)
    if _as_training(step) is None:
        step, x0 = _scalar_as_vector(step, x0)
    mp = _adapt(step, x0, args)
    if not bool(jnp.all(jnp.isfinite(mp.x))):
        raise ValueError("x0: must be finite (got NaN or inf in the state)")
    n = min(_check_int("n_multipliers", n_multipliers, 1), int(mp.x.shape[0]))
    return _solve(mp, int(period), int(t0), tol, max_iter, n, _check_int("dense_max", dense_max, 0))


# ---------------------------------------------------------------------------------------------
# bifurcation diagrams


class Bifurcation(NamedTuple):
    """A bifurcation diagram: the attractor, its period and λ1 per parameter value.

    Attributes:
        values: (n,) the parameter values, as given.
        samples: (n, n_samples) the attractor sampled at the last n_samples steps (a plain
            map: ``project`` of the state, by default its first coordinate; a training map:
            the loss L(θ_t) of the full batch / the batch of step t). NaN for a replica that
            diverged.
        periods: (n,) the period of the attractor over the sampled window
            (:func:`detect_period` semantics: 0 = none up to the limit, chaotic, diverged or not
            settled within the run).
        lyapunov: (n,) the leading Lyapunov exponent per step, measured on the same run after
            the transient (and a tangent alignment of a eighth of the sampled window).
        points: (m,) the parameter values where the period changes, refined by bisection to
            ``refine_tol`` (sorted).
        transitions: (m, 2) the certified periods of the grid values on either side of
            each point.
        certified: (n,) the period of the stable orbit certified near the run's final state
            (Newton + multipliers, see :func:`bifurcation`; 0: none), the detected period
            where no orbit certifies. It differs from ``periods`` where the run had not
            settled within ``tol`` (a decaying oscillation of a stable fixed point reads as
            period 2, a slow approach as 0).
        info: the settings and timings (steps, transient, tol, refine_tol, rounds, seconds).
    """

    values: np.ndarray
    samples: np.ndarray
    periods: np.ndarray
    lyapunov: np.ndarray
    points: np.ndarray
    transitions: np.ndarray
    certified: np.ndarray
    info: dict


def _scalar_as_vector(step, x0):
    """A map on a scalar state (the logistic map) as a map on a (1,) vector: the engine's
    batched runs need a state axis. Other states pass unchanged."""
    if is_training_map(x0) or not (np.ndim(x0) == 0 and _is_number(x0)):
        return step, x0

    def vector_step(x, t, *args):
        return jnp.reshape(step(x[0], t, *args), (1,))

    return vector_step, jnp.reshape(jnp.asarray(x0, jnp.result_type(float)), (1,))


def _is_number(x) -> bool:
    return isinstance(x, float | int | np.number | jax.Array | np.ndarray) and not isinstance(
        x, bool
    )


def _as_training(step_or_map):
    if is_training_map(step_or_map):
        return step_or_map
    owner = getattr(step_or_map, "__self__", None)
    return owner if is_training_map(owner) else None


class _Scan(NamedTuple):
    """The engine's side of a bifurcation scan: what runs and how a row becomes a map."""

    model: Any  # the TrainingMap, or None
    step: Any  # the traceable plain step
    x0: Any
    layout: Any
    param: str
    custom: dict  # the probe (and a plain map's sample) recorded at every step
    window: int  # the steps a period is detected on
    tol: float
    max_period: int


def _observed(sc: _Scan, res):
    """The probes (R, window, p) a period is detected on and the sample series (R, window)."""
    n, w = len(res.final_state), sc.window
    probes = np.asarray(res.records["orbit_probe"], np.float64)[:, -w:].reshape(n, w, -1)
    if sc.model is not None:
        series = np.asarray(res.records["loss"], np.float64)[:, -w:]
        probes = np.concatenate([probes, series[..., None]], -1)
    else:
        series = np.asarray(res.records["orbit_sample"], np.float64)[:, -w:]
    return _periods(probes, sc.tol, sc.max_period), series


def _run(sc: _Scan, vals, *, steps, t0, record_every, custom=None, trackers=(), progress=False):
    """One batched run of the engine over the parameter values ``vals``."""
    from chaosjax.lyapunov import _prepare
    from chaosjax.replicas import make_replicas, run_replicas

    vals = np.asarray(vals, np.float64)
    if sc.model is not None:
        batch = make_replicas(sc.model, base=sc.x0, grid={sc.param: list(vals)})
        model, obs = sc.model, ("loss",) if custom else ()
    else:
        xs = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (len(vals), *a.shape)), sc.x0)
        model, batch, _ = _prepare(sc.step, xs, True, jnp.asarray(vals))
        obs = ()
    res = run_replicas(model, batch, steps=steps, record_every=record_every, observables=obs,
                       custom_observables=custom, trackers=trackers, t0=t0, progress=progress,
                       desc="bifurcation")  # fmt: skip
    return res, batch


def _row_map(sc: _Scan, res, batch, i: int) -> _Map:
    """Replica i's final state as a map at its parameter value."""
    if sc.model is not None:
        x, carry = split_state(sc.model.final_state(res, i))
        args = {k: v[i] for k, v in batch.hparams.items()}
        return _Map(_adapt(sc.model, sc.x0).program, "training", None, True, jnp.asarray(x),
                    () if carry is None else carry, args)  # fmt: skip
    carry = tuple(jnp.asarray(c[i]) for c in res.final_carry)
    return _Map(sc.step, "plain", sc.layout, True, jnp.asarray(res.final_state[i]), carry,
                batch.hparams[i])  # fmt: skip


def _settle(values, periods, cert) -> np.ndarray:
    """The certified period per value (0: none): a detected period k is replaced by its
    smallest divisor whose orbit certifies (a decaying oscillation of a stable fixed point
    passes as period 2), and kept where none does; a value that did not settle takes a neighbouring run's period where
    that orbit certifies. ``cert(i, k)`` tests value i."""
    order = np.argsort(values, kind="stable")
    out = np.zeros(len(values), np.int64)
    for i in order:
        k = int(periods[i])
        if k > 0:
            out[i] = next((j for j in range(1, k + 1) if k % j == 0 and cert(i, j)), k)
    p = out[order]
    pos = 0
    while pos < len(order):
        if p[pos]:
            pos += 1
            continue
        end = pos
        while end < len(order) and not p[end]:
            end += 1
        near = [int(p[pos - 1])] if pos else []
        near += [int(p[end])] if end < len(order) else []
        for q in range(pos, end):
            out[order[q]] = next((k for k in near if cert(order[q], k)), 0)
        pos = end
    return out


def _refine(sc: _Scan, values, periods, settled, cert, *, steps, t0, refine_tol, progress):
    """Bisection of every bracket of neighbouring values whose certified periods differ: by
    the orbit's stability where it certifies at one end only, by the run's own period where
    it certifies at neither end (Newton did not converge: e.g. a continuum of minima)."""
    order = np.argsort(values, kind="stable")
    brackets = []  # [lo, hi, lo passes (None: by the run's period), candidate, (k_lo, k_hi)]
    for a, b in itertools.pairwise(order):
        ka, kb = int(settled[a]), int(settled[b])
        if ka == kb or values[a] == values[b]:
            continue
        cand = min(k for k in (ka, kb) if k > 0)
        ya, yb = cert(a, cand), cert(b, cand)
        if ya != yb:
            brackets.append([float(values[a]), float(values[b]), ya, cand, (ka, kb)])
        elif not ya and periods[a] != periods[b]:
            brackets.append([float(values[a]), float(values[b]), None, int(periods[a]), (ka, kb)])
    rounds = 0
    if brackets and np.isfinite(refine_tol):
        width = max(b[1] - b[0] for b in brackets)
        rounds = max(0, math.ceil(math.log2(width / refine_tol)))
    for _ in range(rounds):
        mids = np.asarray([0.5 * (b[0] + b[1]) for b in brackets])
        r, bt = _run(sc, mids, steps=steps, t0=t0, record_every=1, custom=sc.custom,
                     progress=progress)  # fmt: skip
        sim = _observed(sc, r)[0]
        for i, b in enumerate(brackets):
            if b[2] is None:
                lo_side = sim[i] == b[3]
            else:
                lo_side = _certify(_row_map(sc, r, bt, i), b[3], t0 + steps) == b[2]
            if lo_side:
                b[0] = mids[i]
            else:
                b[1] = mids[i]
    pts = sorted((0.5 * (b[0] + b[1]), b[4]) for b in brackets)
    merged: list = []
    for p, ks in pts:
        if not (merged and p - merged[-1][0] <= 2 * refine_tol < np.inf):
            merged.append((p, ks))
    points = np.asarray([p for p, _ in merged], np.float64)
    trans = np.asarray([ks for _, ks in merged], np.int64).reshape(-1, 2)
    return points, trans, rounds


def bifurcation(
    step_or_map,
    x0,
    values,
    *,
    steps: int = 2000,
    transient: int | None = None,
    n_samples: int = 64,
    refine_tol: float = 1e-4,
    max_period: int = 16,
    tol: float = 1e-7,
    project: Callable | None = None,
    param: str = "learning_rate",
    t0: int = 0,
    refine: bool = True,
    progress: bool = False,
) -> Bifurcation:
    """A bifurcation diagram: every parameter value is a replica of ONE batched run.

    The run (:func:`chaosjax.run_replicas`, every value a replica of the batch) lasts
    ``steps`` steps from ``x0``; the first ``transient`` are dropped. On the remaining window
    it records the attractor (``samples``: its last ``n_samples`` steps), the period per value
    (:func:`detect_period` on the window with ``tol`` and ``max_period``, on the state itself
    for up to 16 coordinates, else on 8 evenly spaced coordinates and, for a training map, the
    loss), and λ1 per value from a :class:`chaosjax.LyapunovTracker` on the same run.

    ``points``: for every pair of neighbouring values whose periods differ, the value where
    the period changes, bisected to ``refine_tol``; each bisection round is one batched run
    of all brackets' midpoints. Near a period doubling the approach to the orbit is slow (its
    multiplier → −1: within δ of the bifurcation a run of N steps settles only when
    δ·N ≫ ln(1/tol)), so the simulated period there reads 0; a value is therefore classified
    by the orbit itself: the run's final state is polished by :func:`find_periodic_orbit` to
    the bracket's smaller nonzero period k, and the value is on the k side when that orbit
    exists with minimal period k and is stable (max |multiplier| < 1). A bracket whose ends
    both pass that test is an unsettled value, not a change, and is dropped; where it fails
    at both ends (no orbit certifies: Newton does not converge, e.g. on a continuum of minima
    of an over-parameterised network, or a neutral multiplier |μ| = 1 makes no orbit
    "stable"), the bisection falls back on the run's own period at the midpoints, and such
    points carry the run's unsettled zone: a doubling can then read as 1→2, 2→0, 0→2 within
    about ln(1/tol)/(window·|1 − |μ||) of each other. Points closer than 2·refine_tol are
    merged. Periodic windows opened by a saddle-node are found the same way; period doublings
    beyond ``max_period`` are reported where the last detected period loses stability.

    The run records the probe (and the sample) at every step: memory n_values · steps ·
    (p + 1) floats, p ≤ 16 probed coordinates. For the period of a long run at a coarse
    record cadence use the observer :class:`PeriodTracker` in :func:`chaosjax.run_replicas`.

    Args:
        step_or_map: ``step(x, t, p)`` with the parameter p as third argument, or a
            :class:`chaosjax.TrainingMap` (its ``param`` hyper-parameter is scanned).
        x0: the initial state (of every value).
        values: (n,) parameter values (finite).
        steps: the length of the run.
        transient: steps dropped (default: all but the last n_samples·max_period steps, at
            least 0).
        n_samples: the samples kept per value.
        refine_tol: the width to which points are bisected.
        max_period: the largest period detected.
        tol: the period tolerance (relative to the window's scale).
        project: ``project(x) -> scalar`` of the flat state of a plain map (default x[0]).
        param: the grid field of a training map.
        t0: the time of x0.
        refine: bisect the points (False: ``points`` are the midpoints of the brackets).
        progress: show the engine's progress bars.

    Returns:
        :class:`Bifurcation`.
    """
    from chaosjax.observers import LyapunovTracker

    start = time.perf_counter()
    v = np.asarray(values, np.float64) if np.ndim(values) else np.asarray([values], np.float64)
    if v.ndim != 1 or v.size < 1 or not np.all(np.isfinite(v)):
        raise ValueError("values: must be a 1-D sequence of finite parameter values (no NaN/inf)")
    steps = _check_int("steps", steps, 2)
    n_samples = _check_int("n_samples", n_samples, 1, steps)
    max_period = _check_int("max_period", max_period, 1)
    tol, refine_tol = _check_tol("tol", tol), _check_tol("refine_tol", refine_tol)
    if transient is None:
        transient = max(0, steps - n_samples * max_period)
    transient = _check_int("transient", transient, 0, steps - max(2, n_samples))
    model = _as_training(step_or_map)
    if model is None:
        step_or_map, x0 = _scalar_as_vector(step_or_map, x0)
    if model is not None:
        if param not in model.hparams:
            raise ValueError(f"param: unknown {param!r}; allowed: {sorted(model.hparams)}")
        xf = split_state(x0)[0]

        def probe_state(s):
            return probe(split_state(s)[0])

        custom = {"orbit_probe": probe_state}
    else:
        lay = layout_of(x0, what="x0")
        if lay.dim == 0:
            raise ValueError("x0: the state has no floating-point leaves")
        xf = lay.split(x0)[0]
        proj = project or (lambda x: x[0])
        custom = {"orbit_probe": probe, "orbit_sample": lambda x: proj(x)}
    if not bool(jnp.all(jnp.isfinite(jnp.asarray(xf)))):
        raise ValueError("x0: must be finite (got NaN or inf in the state)")
    window = steps - transient
    sc = _Scan(model, None if model is not None else as_traceable(step_or_map), x0,
               None if model is not None else lay, param, custom, window, tol, max_period)  # fmt: skip
    tracker = LyapunovTracker(k=1, rows="all", warmup=transient, align=window // 8)
    res, batch = _run(sc, v, steps=steps, t0=t0, record_every=1, custom=custom,
                      trackers=[tracker], progress=progress)  # fmt: skip
    periods, series = _observed(sc, res)
    samples = series[:, -n_samples:]
    growth = np.asarray(res.records["log_growth"], np.float64)[..., 0]
    n_ok = np.sum(np.isfinite(growth), axis=1)
    lyap = np.where(n_ok > 0, np.nansum(growth, axis=1) / np.maximum(n_ok, 1), np.nan)
    lyap = np.where(np.asarray(res.diverged_step) >= 0, np.nan, lyap)
    sim = time.perf_counter() - start
    cache: dict = {}

    def cert(i, k):
        if (i, k) not in cache:
            cache[i, k] = _certify(_row_map(sc, res, batch, int(i)), k, t0 + steps)
        return cache[i, k]

    settled = _settle(v, periods, cert)
    points, trans, rounds = _refine(
        sc, v, periods, settled, cert, steps=steps, t0=t0,
        refine_tol=refine_tol if refine else np.inf, progress=progress,
    )  # fmt: skip
    info = {"steps": steps, "transient": transient, "window": window, "tol": tol,
            "max_period": max_period, "refine_tol": refine_tol, "rounds": rounds,
            "param": param if model is not None else "p", "seconds_run": sim,
            "seconds": time.perf_counter() - start}  # fmt: skip
    return Bifurcation(v, samples, periods, lyap, points, trans, settled, info)


__all__ = [
    "Bifurcation",
    "Orbit",
    "PeriodTracker",
    "bifurcation",
    "detect_period",
    "find_periodic_orbit",
    "plot_bifurcation",
]
