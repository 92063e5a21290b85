"""Is a step differentiable where it matters? A verdict read from the step's program.

Tangent exponents (:func:`chaosjax.lyapunov_spectrum`, FTLEs, covariant vectors) are exponents
of the step's *derivative*. A step whose update is built from a piecewise-constant function of
the state — Lion's and sign-SGD's ``sign(·)``, rounding, a float→int cast, an ``argmax`` or
``top_k`` selection — has a derivative that is zero almost everywhere: the tangents see a
contracting map while any finite perturbation flips a sign and jumps by the learning rate. Its
tangent exponents are then meaningless, and finite-perturbation (replica, twin) estimates are
the measure.

:func:`step_smoothness` decides it from the jaxpr of one step: it follows which values depend
(through floating-point arithmetic) on the dynamical coordinates x, finds the piecewise-constant
primitives applied to such values, and asks whether their output reaches the next state x′ as a
value (Lion's ``η·sign(m)``). Exempt are

* guards: a piecewise-constant value that only chooses between branches (the predicate of
  ``select_n`` / ``jnp.where``, the index of ``lax.cond``) — NaN/finite guards such as the one
  inside optax's softmax cross-entropy, ``apply_if_finite``;
* integer-only paths: step counters, batch indices and permutations (they do not depend on x);
* measure-zero kinks: ReLU, ``max``, ``clip``, ``clip_by_global_norm``, whose comparisons feed
  selections (their derivative is defined almost everywhere and is not zero).

Verdicts for optax (tested): sgd, momentum, nesterov, adam, adamw, rmsprop, adafactor,
clipping chains, ``MultiSteps`` and ``apply_if_finite`` are smooth; lion and a sign-SGD
(``optax.sign_sgd``, or ``scale_by_sign``) are flagged.

Adafactor is smooth by this rule (its program has no piecewise-constant primitive), so its
tangent exponents are computed. Its update divides by a second moment with a fast decay
(β̂₂ = 1 − (t + 1)^−0.8: zero at the first step, so the first update is g/√(g² + 1e-30) ≈
sign(g) component-wise) and is then clipped by its block RMS: early steps are close to a sign
update whose derivative is large only where |g| ≲ 1e-15, and a finite perturbation does not
see the linearisation there. That is the likely reason reported tangent and replica estimates
of adafactor runs part; it is a hypothesis, not a measurement: on a 64→32→10 tanh MLP on
digits (minibatches of 64, η = 1e-2, 300 steps, float64, this CPU) the tangents gave
λ1·T = 0.54 and ε = 1e-8 replicas grew by e^0.66–e^0.84, which agree. The run summary's
regime table compares the two estimates wherever both exist and says when they disagree.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.core import Literal

#: primitives whose output is piecewise constant in a floating-point input
PIECEWISE_CONSTANT = frozenset(
    {"sign", "round", "floor", "ceil", "argmax", "argmin", "top_k", "nextafter"}
)


class NonSmoothWarning(UserWarning):
    """Tangent analyses of a step that is not smooth were voided (NaN with the reason)."""


class Smoothness(NamedTuple):
    """The verdict of :func:`step_smoothness`.

    Attributes:
        smooth: False when a piecewise-constant function of the state feeds the next state.
        primitives: the offending primitives, e.g. ``("sign",)``.
        reason: one sentence naming the primitive, where it was written (file:line (function),
            e.g. optax's ``scale_by_lion``) and what follows; ``""`` when smooth.
    """

    smooth: bool
    primitives: tuple[str, ...] = ()
    reason: str = ""


class _Found(NamedTuple):
    name: str
    where: str


def _is_float(aval) -> bool:
    return hasattr(aval, "dtype") and jnp.issubdtype(aval.dtype, jnp.inexact)


def _pc_output(eqn) -> list[bool]:
    """Which outputs of ``eqn`` are piecewise-constant functions of its (float) inputs."""
    name = eqn.primitive.name
    n = len(eqn.outvars)
    if name == "top_k":  # values are continuous, indices are a selection
        return [False, True][:n]
    if name in PIECEWISE_CONSTANT:
        return [True] * n
    if name == "convert_element_type":  # float → int or bool
        src = eqn.invars[0].aval
        return [_is_float(src) and not _is_float(eqn.outvars[0].aval)]
    return [False] * n


def _closed(j):
    """(jaxpr, consts) of a Jaxpr or ClosedJaxpr."""
    if hasattr(j, "jaxpr") and hasattr(j, "consts"):
        return j.jaxpr, j.consts
    return j, ()


def _sub_jaxprs(eqn) -> list:
    out = []
    for v in eqn.params.values():
        for sub in v if isinstance(v, tuple | list) else (v,):
            inner = _closed(sub)[0]
            if hasattr(inner, "eqns") and hasattr(inner, "invars"):
                out.append(inner)
    return out


_NONE: frozenset = frozenset()


def _union(sets) -> frozenset:
    out = set()
    for s in sets:
        out |= s
    return frozenset(out)


class _Analysis:
    """Forward taint analysis: ``dep`` = depends on x through float values; ``pc`` = the
    piecewise-constant functions of x (indices into ``found``) a value carries as a value (not
    only as a branch choice)."""

    def __init__(self):
        self.found: list[_Found] = []

    def run(self, jaxpr, dep_in: Sequence[bool], pc_in: Sequence[frozenset]):
        dep: dict = {}
        pc: dict = {}
        for v, d, p in zip(jaxpr.invars, dep_in, pc_in):
            dep[v], pc[v] = bool(d), p

        def get(tab, v, empty):
            return empty if isinstance(v, Literal) else tab.get(v, empty)

        for eqn in jaxpr.eqns:
            d_in = [get(dep, v, False) for v in eqn.invars]
            p_in = [get(pc, v, _NONE) for v in eqn.invars]
            d_out, p_out = self._eqn(eqn, d_in, p_in)
            for v, d, p in zip(eqn.outvars, d_out, p_out):
                dep[v], pc[v] = d, p
        return (
            [get(dep, v, False) for v in jaxpr.outvars],
            [get(pc, v, _NONE) for v in jaxpr.outvars],
        )

    def _eqn(self, eqn, d_in, p_in):
        name = eqn.primitive.name
        n_out = len(eqn.outvars)
        if name == "select_n":  # the predicate chooses: a guard, not a value
            d = any(d_in[1:])
            return [d] * n_out, [_union(p_in[1:])] * n_out
        if name == "cond":
            return self._cond(eqn, d_in, p_in)
        if name in ("while", "scan"):
            return self._loop(eqn, d_in, p_in)
        subs = _sub_jaxprs(eqn)
        if len(subs) == 1 and len(subs[0].invars) == len(eqn.invars):
            d, p = self.run(subs[0], d_in, p_in)
            if len(d) == n_out:
                return d, p
        d = any(d_in)
        p_all = _union(p_in)
        if subs:  # an unknown higher-order primitive: every input may reach every output
            for s in subs:
                _, p_sub = self.run(s, [d] * len(s.invars), [p_all] * len(s.invars))
                p_all = p_all | _union(p_sub)
        float_dep = any(_is_float(v.aval) and dv for v, dv in zip(eqn.invars, d_in))
        p = []
        for is_pc in _pc_output(eqn):
            if is_pc and float_dep:
                self.found.append(_Found(name, _where(eqn)))
                p.append(p_all | {len(self.found) - 1})
            else:
                p.append(p_all)
        return [d] * n_out, p

    def _cond(self, eqn, d_in, p_in):
        branches = eqn.params["branches"]
        ds, ps = [], []
        for br in branches:
            d, p = self.run(_closed(br)[0], d_in[1:], p_in[1:])
            ds.append(d)
            ps.append(p)
        return [any(c) for c in zip(*ds)], [_union(c) for c in zip(*ps)]

    def _loop(self, eqn, d_in, p_in):
        prm = eqn.params
        if eqn.primitive.name == "scan":
            body = _closed(prm["jaxpr"])[0]
            nc, ncar = prm["num_consts"], prm["num_carry"]
            d, p = list(d_in), list(p_in)
            for _ in range(len(body.invars) + 1):  # iterate the carries to a fixed point
                d_out, p_out = self.run(body, d, p)
                new_d = d[:nc] + [a or b for a, b in zip(d[nc : nc + ncar], d_out[:ncar])]
                new_p = p[:nc] + [a | b for a, b in zip(p[nc : nc + ncar], p_out[:ncar])]
                new_d += d[nc + ncar :]
                new_p += p[nc + ncar :]
                if new_d == d and new_p == p:
                    break
                d, p = new_d, new_p
            return d_out, p_out
        body = _closed(prm["body_jaxpr"])[0]
        cn, bn = prm["cond_nconsts"], prm["body_nconsts"]
        d_c, p_c = list(d_in[cn + bn :]), list(p_in[cn + bn :])
        for _ in range(len(d_c) + 1):
            d_out, p_out = self.run(body, d_in[cn : cn + bn] + d_c, p_in[cn : cn + bn] + p_c)
            new_d = [a or b for a, b in zip(d_c, d_out)]
            new_p = [a | b for a, b in zip(p_c, p_out)]
            if new_d == d_c and new_p == p_c:
                break
            d_c, p_c = new_d, new_p
        return d_c, p_c


def _where(eqn) -> str:
    """``file:line (function)`` of the user-level frame that wrote ``eqn`` (site-packages
    paths shortened to the package: ``optax/_src/transform.py:474 (scale_by_lion)``)."""
    try:
        from jax._src import source_info_util

        frame = source_info_util.user_frame(eqn.source_info.traceback)
    except Exception:  # the location is a courtesy, never a failure
        return ""
    if frame is None:
        return ""
    path = frame.file_name.split("site-packages/")[-1]
    fn = frame.function_name.split(".<locals>")[0]
    return f"{path}:{frame.start_line} ({fn})"


def flow_smoothness(flow: Callable, x, carry, t, args) -> Smoothness:
    """:func:`step_smoothness` of an engine flow ``flow(x, carry, t, args) -> (x′, carry′,
    aux)`` at one row (x (dim,) float; carry and args as the flow takes them)."""
    closed = jax.make_jaxpr(flow)(x, carry, t, args)
    n_x = len(jax.tree_util.tree_leaves(x))
    n_in = len(closed.jaxpr.invars)
    dep_in = [i < n_x for i in range(n_in)]
    an = _Analysis()
    _, pc_out = an.run(closed.jaxpr, dep_in, [_NONE] * n_in)
    n_xo = len(jax.tree_util.tree_leaves(jax.eval_shape(flow, x, carry, t, args)[0]))
    hits = [an.found[i] for i in sorted(_union(pc_out[:n_xo]))]
    if not hits:
        return Smoothness(True)
    names = tuple(dict.fromkeys(f.name for f in hits))
    where = [f.where for f in hits if f.where]
    loc = f" at {where[0]}" if where else ""
    reason = (
        f"the step is not smooth: {', '.join(names)}{loc} feeds the next state as a "
        "piecewise-constant function of it, so its derivative is zero almost everywhere and "
        "tangent exponents, CLVs and FTLEs do not measure the separation of nearby runs; use "
        "the replica (finite-perturbation) estimates, or allow_nonsmooth=True to compute them "
        "anyway"
    )
    return Smoothness(False, names, reason)


def step_smoothness(step, x0, *, t=0, args=None) -> Smoothness:
    """Whether ``step`` is smooth in the sense tangent exponents need (see the module doc).

    Args:
        step: ``step(x, t) -> x`` (``step(x, t, args)`` with ``args``) on any pytree state, or a
            :class:`chaosjax.TrainingMap` (``x0`` one of its states).
        x0: a state (float leaves are the dynamical coordinates).
        t: the step index the program is traced at.

    Returns:
        :class:`Smoothness` ``(smooth, primitives, reason)``.
    """
    from chaosjax._layout import layout_of, plain_flow, split_state
    from chaosjax._map import is_training_map
    from chaosjax._util import as_traceable

    if is_training_map(step):
        x, carry = split_state(x0)
        carry = () if carry is None else carry
        return flow_smoothness(step.flow, x, carry, jnp.asarray(t, jnp.int32), step.hparams)
    fn = as_traceable(step)
    lay = layout_of(x0, what="x0")
    x, carry = lay.split(x0)

    flow = functools.partial(plain_flow, fn, layout=lay, has_args=args is not None)
    return flow_smoothness(flow, x, tuple(carry), jnp.asarray(t, jnp.int32), args)


__all__ = [
    "PIECEWISE_CONSTANT",
    "NonSmoothWarning",
    "Smoothness",
    "flow_smoothness",
    "step_smoothness",
]
