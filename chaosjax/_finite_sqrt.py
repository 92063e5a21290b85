"""Finite tangents through √ν at ν = 0, scoped to the optimizer update.

Adam-type updates divide a first moment by √(ν̂ + eps_root) + eps. With optax's default
``eps_root = 0`` an entry whose gradient has always been exactly 0 (a dead ReLU unit) has
ν = 0, and autodiff's derivative of √ there is ``dν / (2·0) = 0·∞ = NaN``. The update's true
derivative exists (the first moment is 0 wherever ν is), so chaosjax gives √ the derivative
limit 0 at exactly 0 — the value is identical.

The mechanism is a rewrite of one traced program, not a patch of ``jnp``:
:func:`finite_sqrt_derivative` traces ``fn`` to a jaxpr and evaluates it again with every
``sqrt`` whose operand depends on the *selected* inputs replaced by :func:`differentiable_sqrt`
(a ``custom_jvp`` of the same ``lax.sqrt``). Only those ``sqrt`` change; everything else is
bound exactly as traced, so values (and compiled arithmetic) are unchanged. The selection is
how a caller keeps the rewrite off the user's loss gradient: the training map selects the
gradient and the optimizer state of ``tx.update`` (a loss evaluated inside the update from the
parameters alone, as controllers do, is untouched); the ``from_step`` map selects the state
leaves that are not parameters (the optimizer's moments), so a ``sqrt`` in the user's loss,
which depends on the parameters and the batch only, keeps its derivative.

Dependence is followed through ``pjit``, ``cond``, ``while`` and ``scan`` (their bodies are
rewritten and rebound); custom derivatives (``custom_jvp``/``custom_vjp``) are left as the
user defined them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend.core import ClosedJaxpr, Literal

__all__ = ["differentiable_sqrt", "finite_sqrt_derivative"]


@jax.custom_jvp
def _sqrt(x):
    return jax.lax.sqrt(x)


@_sqrt.defjvp
def _sqrt_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    y = _sqrt(x)
    positive = x > 0
    return y, jnp.where(positive, dx / (2.0 * jnp.where(positive, y, 1.0)), jnp.zeros_like(dx))


def differentiable_sqrt(x, /):
    """``jnp.sqrt`` whose derivative at exactly 0 is the limit 0 instead of ∞ (the value is
    identical). Inside an optimizer update √ν is always multiplied by a first moment that is 0
    wherever ν is 0, so the update's true derivative exists there; autodiff's 0·∞ is NaN."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.result_type(float))
    return _sqrt(x)


_OPAQUE = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})


def _open(j):
    return (j.jaxpr, j.consts) if isinstance(j, ClosedJaxpr) else (j, ())


def _read(env, v):
    return v.val if isinstance(v, Literal) else env[v]


def _bind(eqn, params, invals) -> list:
    """Bind ``eqn``'s primitive as :func:`jax.core.eval_jaxpr` does (its source info and
    context, e.g. a matmul precision, included)."""
    from jax._src import source_info_util

    bound = eqn.primitive.get_bind_params(params)
    subfuns, bind_params = bound if isinstance(bound, tuple) else ((), bound)
    name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
    with (
        source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack),
        eqn.ctx.manager,
    ):
        out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


class _Rewriter:
    """Dependence of values on the selected inputs, and the rebinding of a jaxpr with the
    selected ``sqrt`` replaced. ``sel`` lists are booleans aligned with a jaxpr's invars."""

    # -- dependence (no evaluation) ---------------------------------------------------------

    def deps(self, jaxpr, sel_in: Sequence[bool]) -> tuple[list[bool], bool]:
        """(which outputs depend on the selected inputs, whether a selected sqrt is inside)."""
        env = dict(zip(jaxpr.invars, sel_in))
        hit = False
        for eqn in jaxpr.eqns:
            s_in = [False if isinstance(v, Literal) else env.get(v, False) for v in eqn.invars]
            s_out, h = self._eqn_deps(eqn, s_in)
            hit |= h
            env.update(zip(eqn.outvars, s_out))
        return [False if isinstance(v, Literal) else env.get(v, False) for v in jaxpr.outvars], hit

    def _eqn_deps(self, eqn, s_in):
        name, n = eqn.primitive.name, len(eqn.outvars)
        if name == "sqrt":
            return [s_in[0]], s_in[0]
        if name in _OPAQUE or not any(s_in):
            return [any(s_in)] * n, False
        plan = self._plan(eqn, s_in)
        if plan is None:  # no sub-program: every output may depend on every input
            return [any(s_in)] * n, False
        return plan[0], any(h for _, _, h in plan[1])

    def _plan(self, eqn, s_in):
        """For a higher-order eqn: (output selection, [(param key, sub sel, hit)]) or None."""
        p, name = eqn.params, eqn.primitive.name
        if name == "cond":
            outs, subs = None, []
            for br in p["branches"]:
                o, h = self.deps(_open(br)[0], s_in[1:])
                outs = o if outs is None else [a or b for a, b in zip(outs, o)]
                subs.append(("branches", s_in[1:], h))
            return outs, subs
        if name == "while":
            cn, bn = p["cond_nconsts"], p["body_nconsts"]
            body = _open(p["body_jaxpr"])[0]
            car = list(s_in[cn + bn :])
            while True:
                o, _ = self.deps(body, s_in[cn : cn + bn] + car)
                new = [a or b for a, b in zip(car, o)]
                if new == car:
                    break
                car = new
            _, hb = self.deps(body, s_in[cn : cn + bn] + car)
            _, hc = self.deps(_open(p["cond_jaxpr"])[0], s_in[:cn] + car)
            sub = [
                ("body_jaxpr", s_in[cn : cn + bn] + car, hb),
                ("cond_jaxpr", s_in[:cn] + car, hc),
            ]
            return car, sub
        if name == "scan":
            nc, nk = p["num_consts"], p["num_carry"]
            body = _open(p["jaxpr"])[0]
            sel = list(s_in)
            while True:
                o, _ = self.deps(body, sel)
                new = (
                    sel[:nc] + [a or b for a, b in zip(sel[nc : nc + nk], o[:nk])] + sel[nc + nk :]
                )
                if new == sel:
                    break
                sel = new
            o, h = self.deps(body, sel)
            return o, [("jaxpr", sel, h)]
        for key in ("jaxpr", "call_jaxpr"):  # pjit, closed_call, checkpoint, …
            sub = p.get(key)
            if sub is not None and len(_open(sub)[0].invars) == len(eqn.invars):
                o, h = self.deps(_open(sub)[0], s_in)
                return o, [(key, s_in, h)]
        return None

    # -- evaluation with the rewrite --------------------------------------------------------

    def eval(self, jaxpr, consts, args, sel_in):
        env = dict(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        sel = dict(zip(jaxpr.invars, sel_in))
        for eqn in jaxpr.eqns:
            invals = [_read(env, v) for v in eqn.invars]
            s_in = [False if isinstance(v, Literal) else sel.get(v, False) for v in eqn.invars]
            s_out, hit = self._eqn_deps(eqn, s_in)
            if eqn.primitive.name == "sqrt" and s_in[0]:
                outs = [differentiable_sqrt(invals[0])]
            else:
                params = self._rewritten_params(eqn, s_in) if hit else eqn.params
                outs = _bind(eqn, params, invals)
            env.update(zip(eqn.outvars, outs))
            sel.update(zip(eqn.outvars, s_out))
        return [_read(env, v) for v in jaxpr.outvars]

    def _rewritten_params(self, eqn, s_in):
        params = dict(eqn.params)
        _, subs = self._plan(eqn, s_in)
        if eqn.primitive.name == "cond":
            params["branches"] = tuple(
                self._rebuilt(br, s, h) for br, (_, s, h) in zip(params["branches"], subs)
            )
            return params
        for key, s, h in subs:
            params[key] = self._rebuilt(params[key], s, h)
        return params

    def _rebuilt(self, sub, sel, hit):
        if not hit:
            return sub
        jaxpr, consts = _open(sub)
        avals = [
            jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, weak_type=v.aval.weak_type)
            for v in jaxpr.invars
        ]
        new = jax.make_jaxpr(lambda *a: self.eval(jaxpr, consts, a, sel))(*avals)
        if isinstance(sub, ClosedJaxpr):
            return new
        if new.consts:
            raise NotImplementedError("an open sub-program that closes over constants")
        return new.jaxpr


def finite_sqrt_derivative(fn: Callable, select: Callable) -> Callable:
    """``fn`` with every ``sqrt`` whose operand depends on the selected inputs given the
    derivative limit 0 at exactly 0 (values unchanged; see the module doc).

    Args:
        fn: a traceable function of positional pytree arguments.
        select: ``select(*args)`` → a pytree of booleans with the structure of ``args`` (a
            prefix is enough): which input leaves the rewrite follows.

    Returns:
        A function with ``fn``'s signature and outputs.
    """

    def wrapped(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        leaves = jax.tree_util.tree_leaves(args)
        mask = jax.tree_util.tree_leaves(
            jax.tree_util.tree_map(
                lambda s, sub: jax.tree_util.tree_map(lambda _: bool(s), sub), select(*args), args
            )
        )
        if len(mask) != len(leaves) or len(leaves) != len(closed.jaxpr.invars):
            raise TypeError(
                f"finite_sqrt_derivative: {len(leaves)} argument leaves, {len(mask)} selection "
                f"flags and {len(closed.jaxpr.invars)} program inputs do not line up"
            )
        outs = _Rewriter().eval(closed.jaxpr, closed.consts, leaves, mask)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return wrapped
