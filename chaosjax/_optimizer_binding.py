"""The optimizer binding of a training map: an optimizer given as a registry name, a factory,
an optax transformation or an ``nnx.Optimizer`` resolved to one factory of transformations,
a user's optimizer state adopted into the structure the transformation builds, and which
integer leaves of that state are plain update counters derived from t.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.interpreters import partial_eval as pe

from chaosjax.nnx_adapter import is_nnx_optimizer, unwrap_variables
from chaosjax.optimizers import OPTIMIZERS, SCHEDULES, is_step_counter, make_schedule


def resolve_optimizer(optimizer, learning_rate, hparams, schedule, schedule_options):
    """``(factory(**hparams) -> GradientTransformation, hparams, name)`` of an optimizer given
    as a registry name, a factory, a ready transformation or an ``nnx.Optimizer``."""
    hparams = dict(hparams or {})
    if is_nnx_optimizer(optimizer):
        optimizer = optimizer.tx
    if isinstance(optimizer, optax.GradientTransformation):
        if hparams or learning_rate is not None:
            raise ValueError(
                "optimizer: a ready GradientTransformation has fixed hyper-parameters; pass a "
                "name or a factory make(**hparams) to set learning_rate/hparams"
            )
        fixed = optimizer
        return (lambda: fixed), {}, "custom"
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: unknown {optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
        spec = OPTIMIZERS[optimizer]
        unknown = set(hparams) - set(spec.defaults)
        if unknown:
            raise ValueError(
                f"hparams: {sorted(unknown)} not used by {optimizer!r}; allowed: {sorted(spec.defaults) or 'none'}"
            )
        if learning_rate is None:
            raise ValueError(f"learning_rate: required for optimizer {optimizer!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule: unknown {schedule!r}; allowed: {', '.join(SCHEDULES)}")
        make_schedule(schedule, 1.0, **schedule_options)  # validate options early
        hp = {**spec.defaults, **hparams, "learning_rate": float(learning_rate)}
        make = spec.make

        def factory(learning_rate, **kw):
            return make(make_schedule(schedule, learning_rate, **schedule_options), **kw)

        return factory, hp, optimizer
    if callable(optimizer):
        if learning_rate is not None:
            hparams["learning_rate"] = learning_rate
        name = getattr(optimizer, "__name__", None) or getattr(
            getattr(optimizer, "func", None), "__name__", "custom"
        )
        return optimizer, hparams, name
    raise TypeError(
        f"optimizer: expected a name ({', '.join(OPTIMIZERS)}), a factory, an optax "
        f"GradientTransformation or an nnx.Optimizer, got {type(optimizer).__name__}"
    )


def derived_counters(tmap, tx, params, opt_state, names, carried) -> tuple[bool, ...]:
    """Which carried optimizer leaves are plain update counters, derived from t.

    When every integer leaf is an optax ``count`` that one update moves by exactly +1, all
    of them come from t and the state stays flat; otherwise (``MultiSteps``,
    ``apply_if_finite``, …) every one is carried and advanced by the step itself."""
    if not carried:
        return ()
    plain = all(
        is_step_counter(n) and jnp.issubdtype(jnp.asarray(c).dtype, jnp.integer)
        for n, c in zip(names, carried)
    )
    if plain:
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        x, y = tmap.data["x_train"], tmap.data["y_train"]

        def counters_after_one_update(params, opt_state, x, y):
            # only the integer leaves are returned: the jaxpr keeps what they need (a
            # controller's Krylov solve is dead code here and is neither run nor compiled)
            _, new_state = optax.with_extra_args_support(tx).update(
                zeros, opt_state, params, **tmap._extra_args(params, x, y, zeros)
            )
            return tmap._opt_layout.split(new_state)[1]

        closed = jax.make_jaxpr(counters_after_one_update)(params, opt_state, x, y)
        kept, used_in = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
        leaves = jax.tree_util.tree_leaves((params, opt_state, x, y))
        args = [a for a, u in zip(leaves, used_in, strict=True) if u]
        new = jax.core.eval_jaxpr(kept, closed.consts, *args)
        plain = all(bool(jnp.all(b == a + 1)) for a, b in zip(carried, new))
    return tuple(plain for _ in carried)


def frozen(options: Mapping[str, Any]) -> tuple:
    """Schedule options as a hashable tuple (static pytree data)."""
    return tuple(
        sorted((k, tuple(v) if isinstance(v, list | tuple) else v) for k, v in options.items())
    )


def thawed(options: tuple) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options}


def adopt_opt_state(fresh, given):
    """A user's optimizer state in the structure ``tx.init(params)`` gives (an
    ``nnx.Optimizer`` wraps its leaves in variables): leaves matched in order, shapes checked."""
    given = unwrap_variables(given)
    ours, treedef = jax.tree_util.tree_flatten(fresh)
    theirs = jax.tree_util.tree_leaves(given)
    if len(ours) != len(theirs):
        raise ValueError(
            f"opt_state: {len(theirs)} leaves do not match the optimizer's state of "
            f"{len(ours)} leaves for these parameters"
        )
    for a, b in zip(ours, theirs):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(
                f"opt_state: a leaf of shape {jnp.shape(b)} where the optimizer has {jnp.shape(a)}"
            )
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(b, jnp.result_type(a)) for a, b in zip(ours, theirs)]
    )


__all__ = [
    "adopt_opt_state",
    "derived_counters",
    "frozen",
    "resolve_optimizer",
    "thawed",
]
