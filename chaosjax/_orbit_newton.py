"""The Newton–Krylov core of :mod:`chaosjax.orbits`: a map in the engine's flat form, the
jitted solve of F^k(x) = x (lineax GMRES on ``jax.linearize``), the orbit's points and its
Floquet multipliers (dense ``jacfwd`` + ``numpy.linalg.eig`` up to :data:`DENSE_MAX`
coordinates, an Arnoldi iteration of JVPs above), and the stability certificate the
bifurcation scan classifies parameter values by."""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

from chaosjax._layout import layout_of, plain_flow, split_state
from chaosjax._map import is_training_map
from chaosjax._util import as_traceable

DENSE_MAX = 256  # up to this dimension the k-step Jacobian is built densely (jacfwd + eig)


def _check_tol(name: str, tol) -> float:
    try:
        tol = float(tol)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: must be a positive finite number, got {tol!r}") from None
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"{name}: must be a positive finite number, got {tol!r}")
    return tol


def _check_int(name: str, v, lo: int, hi: int | None = None) -> int:
    ok = isinstance(v, int | np.integer) and not isinstance(v, bool)
    if not ok or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name}: must be an integer {rng}, got {v!r}")
    return int(v)


class Orbit(NamedTuple):
    """A periodic orbit of a map.

    Attributes:
        points: (period, dim) the orbit's points x, F(x), …, F^{k−1}(x) in the flat
            dynamical coordinates.
        residual: ‖F^k(x) − x‖ at the returned point.
        converged: the residual met the tolerance within the iteration budget.
        multipliers: (n,) complex Floquet multipliers, the leading eigenvalues by magnitude of
            the k-step Jacobian ∂F^k/∂x at the orbit.
        stable: max |multiplier| < 1 (a converged orbit that attracts nearby states).
    """

    points: np.ndarray
    residual: float
    converged: bool
    multipliers: np.ndarray
    stable: bool


class _Map(NamedTuple):
    """A map in the engine's flat form: the program, how to call it and where it starts."""

    program: Any
    kind: str  # "training" or "plain"
    layout: Any
    has_args: bool
    x: jax.Array
    carry: Any
    args: Any


def _adapt(step, x0, args=None) -> _Map:
    """The engine's flat form of ``step`` at ``x0`` (a training map's own hyper-parameters
    unless ``args`` is given)."""
    from jax.tree_util import Partial

    model = getattr(step, "__self__", None) if not is_training_map(step) else step
    if is_training_map(model) and getattr(step, "__name__", "step") in ("step", "flow"):
        x, carry = split_state(x0)
        carry = () if carry is None else carry
        hp = model.hparams if args is None else args
        return _Map(Partial(type(model).flow, model), "training", None, True, jnp.asarray(x),
                    carry, hp)  # fmt: skip
    program = as_traceable(step)
    lay = layout_of(x0, what="x0")
    if lay.dim == 0:
        raise ValueError("x0: the state has no floating-point leaves (nothing to solve for)")
    x, carry = lay.split(x0)
    return _Map(program, "plain", lay, args is not None, x, tuple(carry), args)


def _flow_of(program, kind, layout, has_args):
    if kind == "training":
        return program
    return functools.partial(plain_flow, program, layout=layout, has_args=has_args)


def _iterate(flow, x, carry, t0, args, k):
    """F^k(x): k steps from (x, carry) at time t0 (k may be traced: one program for every
    period)."""

    def body(i, c):
        x, cr = c
        x2, cr2, _ = flow(x, cr, t0 + i, args)
        return x2, cr2

    return jax.lax.fori_loop(0, k, body, (x, carry))[0]


_STATIC = ("kind", "layout", "has_args")


@functools.partial(jax.jit, static_argnames=(*_STATIC, "period"))
def _points(program, x, carry, t0, args, *, kind, layout, has_args, period):
    """The k points x, F(x), …, F^{k−1}(x), (k, dim)."""
    flow = _flow_of(program, kind, layout, has_args)

    def body(c, t):
        x, cr = c
        x2, cr2, _ = flow(x, cr, t, args)
        return (x2, cr2), x

    return jax.lax.scan(body, (x, carry), t0 + jnp.arange(period))[1]


@functools.partial(jax.jit, static_argnames=(*_STATIC, "max_iter"))
def _newton(program, x0, carry, t0, args, tol, period, *, kind, layout, has_args, max_iter):
    """Damped Newton–Krylov on G(x) = F^k(x) − x (carry held fixed). Returns (x, residual,
    iterations)."""
    flow = _flow_of(program, kind, layout, has_args)

    def g(x):
        return _iterate(flow, x, carry, t0, args, period) - x

    n = x0.shape[0]
    solver = lx.GMRES(rtol=1e-9, atol=1e-14, restart=min(n, 40), max_steps=20 * min(n, 40) + 20)
    struct = jax.ShapeDtypeStruct(x0.shape, x0.dtype)

    def done(x, r):
        return r <= tol * jnp.maximum(1.0, jnp.linalg.norm(x))

    def cond(c):
        x, _gx, r, it, stalled = c
        return (it < max_iter) & ~done(x, r) & ~stalled & jnp.isfinite(r)

    def body(c):
        x, gx, r, it, _ = c
        _, lin = jax.linearize(g, x)
        op = lx.FunctionLinearOperator(lin, struct)
        dx = lx.linear_solve(op, -gx, solver, throw=False).value
        dx = jnp.where(jnp.all(jnp.isfinite(dx)), dx, -gx)

        def ls_cond(s):
            _a, _, _, rn, i = s
            return ~(rn < r) & (i < 30)

        def ls_body(s):
            a, _, _, _, i = s
            xn = x + a * dx
            gn = g(xn)
            rn = jnp.linalg.norm(gn)
            return a * 0.5, xn, gn, jnp.where(jnp.isfinite(rn), rn, jnp.inf), i + 1

        _, xn, gn, rn, _ = jax.lax.while_loop(ls_cond, ls_body, (1.0, x, gx, jnp.inf, 0))
        better = rn < r
        return (jnp.where(better, xn, x), jnp.where(better, gn, gx), jnp.minimum(rn, r),
                it + 1, ~better)  # fmt: skip

    g0 = g(x0)
    x, _gx, r, it, _ = jax.lax.while_loop(cond, body, (x0, g0, jnp.linalg.norm(g0), 0, False))
    return x, r, it


@functools.partial(jax.jit, static_argnames=(*_STATIC, "max_iter", "dense"))
def _orbit(program, x0, carry, t0, args, tol, period, *, kind, layout, has_args, max_iter, dense):
    """One program for every period: the Newton solve and (dense) the k-step Jacobian."""
    kw = dict(kind=kind, layout=layout, has_args=has_args)
    x, r, _ = _newton(program, x0, carry, t0, args, tol, period, max_iter=max_iter, **kw)
    flow = _flow_of(program, kind, layout, has_args)
    jac = jax.jacfwd(lambda y: _iterate(flow, y, carry, t0, args, period))(x) if dense else None
    return x, r, jac


@functools.partial(jax.jit, static_argnames=_STATIC)
def _jvp(program, x, carry, t0, args, v, period, *, kind, layout, has_args):
    flow = _flow_of(program, kind, layout, has_args)
    return jax.jvp(lambda y: _iterate(flow, y, carry, t0, args, period), (x,), (v,))[1]


def _arnoldi(matvec, dim: int, n: int, m: int, seed: int = 0) -> np.ndarray:
    """Ritz values of an m-step Arnoldi iteration (full reorthogonalisation, float64 on the
    host), the n largest by magnitude."""
    V = np.zeros((m + 1, dim))
    H = np.zeros((m + 1, m))
    v = np.random.default_rng(seed).normal(size=dim)
    V[0] = v / np.linalg.norm(v)
    for j in range(m):
        w = np.asarray(matvec(V[j]), np.float64)
        for _ in range(2):
            h = V[: j + 1] @ w
            w = w - h @ V[: j + 1]
            H[: j + 1, j] += h
        H[j + 1, j] = np.linalg.norm(w)
        if H[j + 1, j] < 1e-12 * max(1.0, np.abs(H[: j + 1, j]).max()):
            m = j + 1
            break
        V[j + 1] = w / H[j + 1, j]
    ev = np.linalg.eigvals(H[:m, :m])
    return _leading(ev, n)


def _leading(ev: np.ndarray, n: int) -> np.ndarray:
    return ev[np.argsort(-np.abs(ev), kind="stable")][:n]


def _solve(mp: _Map, period, t0, tol, max_iter, n_mult, dense_max) -> Orbit:
    kw = dict(kind=mp.kind, layout=mp.layout, has_args=mp.has_args)
    t0 = jnp.asarray(t0, jnp.int32)
    k = jnp.asarray(period, jnp.int32)
    dim = int(mp.x.shape[0])
    dense = dim <= dense_max
    x, r, jac = _orbit(mp.program, mp.x, mp.carry, t0, mp.args, tol, k, max_iter=max_iter,
                       dense=dense, **kw)  # fmt: skip
    pts = _points(mp.program, x, mp.carry, t0, mp.args, period=period, **kw)
    r = float(r)
    converged = bool(np.isfinite(r) and r <= tol * max(1.0, float(jnp.linalg.norm(x))))
    pts = np.asarray(pts)
    if not (np.all(np.isfinite(pts)) and np.isfinite(r)):
        mult = np.full(n_mult, np.nan + 0j)
    elif dense:
        mult = _leading(np.linalg.eigvals(np.asarray(jac, np.float64)), n_mult)
    else:

        def matvec(v):
            return _jvp(mp.program, x, mp.carry, t0, mp.args, jnp.asarray(v, x.dtype), k, **kw)

        mult = _arnoldi(matvec, dim, n_mult, min(dim, max(4 * n_mult, 40)))
    stable = bool(converged and np.all(np.isfinite(mult)) and np.max(np.abs(mult)) < 1.0)
    return Orbit(pts, r, converged, mult.astype(np.complex128), stable)


def _certify(mp: _Map, period: int, t0: int) -> bool:
    """True when a stable orbit of minimal period ``period`` lies near ``mp.x``."""
    if not bool(jnp.all(jnp.isfinite(mp.x))):
        return False
    o = _solve(mp, period, t0, 1e-11, 50, 1, DENSE_MAX)
    if not o.stable:
        return False
    size = max(1.0, float(np.max(np.linalg.norm(o.points, axis=1))))
    for j in range(1, period):
        if period % j == 0 and np.linalg.norm(o.points[j] - o.points[0]) <= 1e-7 * size:
            return False  # a shorter orbit (F^k also fixes the points of a j-cycle)
    return True
