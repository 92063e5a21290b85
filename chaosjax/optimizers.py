"""The one optimizer registry, learning-rate schedules, and how chaosjax differentiates optax.

Every piece of chaosjax that needs to know an optimizer asks here: the training map builds it,
the controllers (:mod:`chaosjax.control`) take its direction, the curvature tracker its
stability threshold and operator, and the config its allowed names.

=============  ========================  ==============================  ==================
name           hyper-parameters          stability threshold on λmax     operator
=============  ========================  ==============================  ==================
``sgd``        —                         2/η                             Hessian
``momentum``   momentum β                (2 + 2β)/η                      Hessian
``nesterov``   momentum β                (2 + 2β)/(η(1 + 2β))            Hessian
``adam``       b1, b2, eps, eps_root     (2 + 2β1)/((1 − β1)η)           P^-1/2 H P^-1/2
``adamw``      … + weight_decay          (2 + 2β1)/((1 − β1)η)           P^-1/2 H P^-1/2
``rmsprop``    decay, eps                2/η                             P^-1/2 H P^-1/2
=============  ========================  ==============================  ==================

The named ``adam``/``adamw`` keep a tiny ``eps_root = 1e-20`` by default (optax's is 0), and
say so; optax's own transformations work as given with their defaults: chaosjax
differentiates the optimizer's √ with the limit 0 where its argument is exactly 0
(:func:`chaosjax._finite_sqrt.finite_sqrt_derivative`, a rewrite of the traced update), so a ReLU network's exactly-zero gradient entries do not turn
Adam's tangents into autodiff's 0·∞ = NaN. The trajectory is unchanged: only the derivative
at that one point differs (the true derivative of the update exists there, since √ν is
multiplied by a zero first moment).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class OptimizerSpec(NamedTuple):
    """One named optimizer: how to build it, its defaults, its stability constant c (the
    threshold on λmax of its operator is c/η), the operator, and its update direction (what a
    controller scales by its own η; None where no controller drives it)."""

    make: Callable
    defaults: Mapping[str, float]
    constant: Callable[[Mapping[str, Any]], Any]
    operator: str
    direction: Callable | None


def _adam_direction(hp):
    return optax.scale_by_adam(b1=hp["b1"], b2=hp["b2"], eps=hp["eps"], eps_root=hp["eps_root"])


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(
        lambda lr: optax.sgd(lr), {}, lambda hp: 2.0, "hessian", lambda hp: optax.identity()
    ),
    "momentum": OptimizerSpec(
        lambda lr, momentum: optax.sgd(lr, momentum=momentum),
        {"momentum": 0.9},
        lambda hp: 2.0 + 2.0 * hp["momentum"],
        "hessian",
        lambda hp: optax.trace(decay=hp["momentum"]),
    ),
    "nesterov": OptimizerSpec(
        lambda lr, momentum: optax.sgd(lr, momentum=momentum, nesterov=True),
        {"momentum": 0.9},
        lambda hp: (2.0 + 2.0 * hp["momentum"]) / (1.0 + 2.0 * hp["momentum"]),
        "hessian",
        lambda hp: optax.trace(decay=hp["momentum"], nesterov=True),
    ),
    "adam": OptimizerSpec(
        lambda lr, b1, b2, eps, eps_root: optax.adam(lr, b1=b1, b2=b2, eps=eps, eps_root=eps_root),
        {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "eps_root": 1e-20},
        lambda hp: (2.0 + 2.0 * hp["b1"]) / (1.0 - hp["b1"]),
        "preconditioned",
        _adam_direction,
    ),
    "adamw": OptimizerSpec(
        lambda lr, b1, b2, eps, eps_root, weight_decay: optax.adamw(
            lr, b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=weight_decay
        ),
        {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "eps_root": 1e-20, "weight_decay": 1e-4},
        lambda hp: (2.0 + 2.0 * hp["b1"]) / (1.0 - hp["b1"]),
        "preconditioned",
        None,
    ),
    "rmsprop": OptimizerSpec(
        lambda lr, decay, eps: optax.rmsprop(lr, decay=decay, eps=eps),
        {"decay": 0.9, "eps": 1e-8},
        lambda hp: 2.0,
        "preconditioned",
        lambda hp: optax.scale_by_rms(decay=hp["decay"], eps=hp["eps"]),
    ),
}

#: optimizers a controller can drive (it takes their direction and sets η itself)
CONTROLLED = tuple(name for name, spec in OPTIMIZERS.items() if spec.direction is not None)


def spec(name: str) -> OptimizerSpec:
    """The registry entry of optimizer ``name`` (ValueError naming the allowed names)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer: unknown {name!r}; allowed: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def with_defaults(name: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The optimizer's hyper-parameters: its defaults overridden by ``hparams`` (refusing
    names it does not take; ``learning_rate`` passes through)."""
    s = spec(name)
    unknown = set(hparams) - set(s.defaults) - {"learning_rate"}
    if unknown:
        raise ValueError(
            f"hparams: {sorted(unknown)} not used by {name!r}; allowed: "
            f"{sorted(s.defaults) or 'none'}"
        )
    return {**s.defaults, **hparams}


def stability_threshold(optimizer: str, hparams: Mapping[str, Any]) -> tuple[Any, str]:
    """The optimizer's stability threshold on the largest curvature, and its operator.

    GD 2/η; heavy ball (2 + 2β)/η; Nesterov (2 + 2β)/(η(1 + 2β)); Adam/AdamW
    (2 + 2β1)/((1 − β1)η) and RMSProp 2/η on the preconditioned operator P^{-1/2} H P^{-1/2}.

    Returns:
        ``(threshold, operator)`` with operator ``"hessian"`` or ``"preconditioned"``;
        ``(nan, "unknown")`` for optimizers without a known threshold or without a learning rate.
    """
    lr = hparams.get("learning_rate")
    if lr is None or optimizer not in OPTIMIZERS:
        return float("nan"), "unknown"
    s = OPTIMIZERS[optimizer]
    return s.constant({**s.defaults, **hparams}) / lr, s.operator


def operator_of(optimizer: str) -> str:
    """The curvature operator of an optimizer's threshold (``"hessian"`` for unknown ones)."""
    s = OPTIMIZERS.get(optimizer)
    return s.operator if s is not None else "hessian"


# ---------------------------------------------------------------------------------------------
# schedules

SCHEDULES = ("constant", "cosine", "step", "warmup", "exponential")


def make_schedule(kind: str, learning_rate, **options) -> Callable | Any:
    """A learning-rate schedule whose peak value ``learning_rate`` may be a traced array.

    Args:
        kind: ``"constant"``; ``"cosine"`` (``decay_steps``, ``alpha``=0); ``"step"``
            (``boundaries``: steps at which η is multiplied by ``factor``=0.1);
            ``"warmup"`` (linear from 0 over ``warmup_steps``); ``"exponential"``
            (``decay_rate`` per ``transition_steps``=1).
        learning_rate: the base (peak) learning rate.

    Returns:
        ``learning_rate`` itself for ``"constant"``, otherwise an optax schedule ``count -> η``.
    """
    if kind == "constant":
        if options:
            raise ValueError(f"schedule: 'constant' takes no options, got {sorted(options)}")
        return learning_rate
    if kind == "cosine":
        return optax.cosine_decay_schedule(
            learning_rate, int(options["decay_steps"]), alpha=float(options.get("alpha", 0.0))
        )
    if kind == "step":
        bounds = [int(b) for b in options["boundaries"]]
        factor = float(options.get("factor", 0.1))
        return optax.piecewise_constant_schedule(learning_rate, {b: factor for b in bounds})
    if kind == "warmup":
        w = int(options["warmup_steps"])
        return optax.linear_schedule(0.0 * learning_rate, learning_rate, w)
    if kind == "exponential":
        return optax.exponential_decay(
            learning_rate,
            int(options.get("transition_steps", 1)),
            float(options["decay_rate"]),
        )
    raise ValueError(f"schedule: unknown kind {kind!r}; allowed: {', '.join(SCHEDULES)}")


# ---------------------------------------------------------------------------------------------
# reading an optimizer state


def held_learning_rate(opt_state):
    """The learning rate an optimizer state holds (``optax.inject_hyperparams``' hyperparams or
    a chaosjax controller's η), or None."""

    def is_node(n):
        return isinstance(n, tuple) and hasattr(n, "_fields")

    for node in jax.tree_util.tree_leaves(opt_state, is_leaf=is_node):
        if not is_node(node):
            continue
        hyper = getattr(node, "hyperparams", None)
        if isinstance(hyper, Mapping) and "learning_rate" in hyper:
            return hyper["learning_rate"]
        if type(node).__name__ in ("SharpnessControlState", "FTLEControlState"):
            return node.learning_rate
    return None


def with_hyperparams(opt_state, hparams: Mapping[str, Any]):
    """The state with the numeric hyper-parameters an ``optax.inject_hyperparams`` state holds
    replaced by ``hparams`` of the same name: its updates read them from the state, so this is
    how a per-replica grid over a user's transformation takes effect (for constants it is what
    ``init`` with those values stores)."""
    if not hparams:
        return opt_state

    def is_node(n):
        return isinstance(n, tuple) and hasattr(n, "_fields")

    def fix(node):
        if not is_node(node):
            return node
        hyper = getattr(node, "hyperparams", None)
        if isinstance(hyper, Mapping) and any(k in hyper for k in hparams):
            new = {
                k: (jnp.asarray(hparams[k]).astype(jnp.result_type(v)) if k in hparams else v)
                for k, v in hyper.items()
            }
            node = node._replace(hyperparams=new)
        if hasattr(node, "hyperparams"):
            return node
        return node._make(jax.tree_util.tree_map(fix, c, is_leaf=is_node) for c in node)

    return jax.tree_util.tree_map(fix, opt_state, is_leaf=is_node)


#: optax's own defaults where chaosjax's named optimizers differ (a transformation passed as
#: given is optax's, not chaosjax's)
OPTAX_DEFAULTS = {"eps_root": 0.0}


def held_hyperparams(opt_state) -> dict[str, Any]:
    """The hyper-parameters an ``optax.inject_hyperparams`` state holds ({} when none)."""

    def is_node(n):
        return isinstance(n, tuple) and hasattr(n, "_fields")

    for node in jax.tree_util.tree_leaves(opt_state, is_leaf=is_node):
        hyper = getattr(node, "hyperparams", None) if is_node(node) else None
        if isinstance(hyper, Mapping):
            return dict(hyper)
    return {}


def optimizer_hparams(tmap, opt_state, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Every hyper-parameter a map's optimizer runs with, as far as chaosjax can know: the
    registry's defaults of its kind (optax's own for a transformation passed as given), what
    an ``inject_hyperparams`` state holds, and the map's ``hparams`` (per replica)."""
    out: dict[str, Any] = {}
    s = OPTIMIZERS.get(tmap.optimizer_name)
    if s is not None:
        out.update(s.defaults)
        if getattr(tmap, "_schedule", None) is None:  # not built by name: optax's defaults
            out.update({k: v for k, v in OPTAX_DEFAULTS.items() if k in out})
    out.update(getattr(tmap, "optimizer_hparams", {}))
    out.update(held_hyperparams(opt_state))
    out.update(hparams)
    return out


def carried_leaf(name: str, leaf) -> bool:
    """Float optimizer-state leaves that are carried rather than dynamical: the
    hyper-parameters ``optax.inject_hyperparams`` keeps in its state (constants or schedule
    values, not dynamics: in the tangent space they would add spurious zero exponents)."""
    return "hyperparams" in name.split("/")


def is_step_counter(name: str) -> bool:
    """An optax update counter (a ``count`` field): +1 per step, derived from t."""
    return name.rsplit("/", 1)[-1] == "count"


__all__ = [
    "CONTROLLED",
    "OPTIMIZERS",
    "SCHEDULES",
    "OptimizerSpec",
    "carried_leaf",
    "held_hyperparams",
    "held_learning_rate",
    "is_step_counter",
    "make_schedule",
    "operator_of",
    "optimizer_hparams",
    "spec",
    "stability_threshold",
    "with_defaults",
    "with_hyperparams",
]
