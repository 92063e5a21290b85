"""One map protocol: what the engine and the analyses may ask of a map.

A map advances one replica: ``flow(x, carry, t, args) -> (x′, carry′, aux)`` on its dynamical
coordinates ``x`` (a flat float vector: what tangents, perturbations and distances act on) and
its carried part (integer counters, PRNG keys, running statistics: advanced exactly, never
perturbed); ``aux`` is the loss of the step where the map has one. Beyond the flow a map
declares its *capabilities* (:attr:`Map.capabilities`):

* ``"loss"``: :meth:`Map.loss` of a state (loss records, curvature trackers);
* ``"accuracy"``: :meth:`Map.accuracy` (classification);
* ``"test"``: evaluation on a held-out split;
* ``"learning_rate"``: the learning rate at t and the optimizer's stability threshold;
* ``"outputs"``: the network's outputs on inputs (``output_of_params``, ``features``; the
  training response);
* ``"parameters"``: the leading :meth:`Map.n_params_of` coordinates of ``x`` are parameters,
  grouped in :attr:`Map.layers` (parameter norms, layer distances).

The engine and the analyses speak only this protocol; an analysis that needs a capability a
map lacks refuses in one line naming it (:func:`require`). :class:`PlainMap` adapts a plain
``step(x, t)`` (``step(x, t, args)``) on any pytree state; :class:`chaosjax.TrainingMap` and
its ``from_step``/``from_nnx`` paths implement it for training.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

CAPABILITIES = ("loss", "accuracy", "test", "learning_rate", "parameters", "outputs")


class Map(abc.ABC):
    """The protocol every map implements (see the module doc)."""

    @abc.abstractmethod
    def flow(self, x, carry, t, args) -> tuple[Any, Any, Any]:
        """One step of one replica: ``(x (dim,), carry, t, args) -> (x′, carry′, aux)``."""

    @property
    def capabilities(self) -> frozenset[str]:
        """What the map can do beyond its flow (names in :data:`CAPABILITIES`)."""
        return frozenset()

    @property
    def has_loss(self) -> bool:
        """Whether the flow's ``aux`` is a loss (divergence flags watch it)."""
        return False

    #: whether rows carry state beside ``x`` that observers see (:meth:`pack`); a map sets it
    has_carry: bool = False

    def pack(self, x, carry):
        """The rows as the map's states (what :meth:`loss` and observers take)."""
        return x

    def n_params_of(self, dim: int) -> int:
        """How many leading coordinates of ``x`` are parameters (norms, layer slices)."""
        return dim

    @property
    def layers(self) -> Mapping[str, tuple[int, int]]:
        """Named slices ``[a, b)`` of the parameters (layer norms and distances)."""
        return {}

    #: the optimizer's kind in chaosjax's registry (thresholds, preconditioners), or None
    optimizer_name: str | None = None

    def split(self, state) -> tuple[Any, Any]:
        """``(x, carry)`` of a state (``carry`` is ``()`` when nothing is carried)."""
        from chaosjax._layout import split_state

        x, carry = split_state(state)
        return x, () if carry is None else carry

    def flat_params(self, state):
        """The parameter part of a state, shape (n_params,)."""
        x, _ = self.split(state)
        return x[..., : self.n_params_of(x.shape[-1])]

    def step_with(self, state, t, hparams):
        """One step of a state with explicit per-row arguments."""
        x, carry = self.split(state)
        x2, carry2, _ = self.flow(x, carry, t, hparams)
        return self.pack(x2, carry2) if self.has_carry else x2

    def threshold_at(self, state, t, hparams=None):
        """The optimizer's stability threshold at step t: NaN unless the map knows it
        (capability ``"learning_rate"``)."""
        x, _ = self.split(state)
        return jnp.full((), jnp.nan, x.dtype)

    def loss(self, state, split: str = "train", t=None):
        """The loss of a state (capability ``"loss"``)."""
        raise NotImplementedError(f"{type(self).__name__} has no loss")

    def curvature_loss(self, state, t=0, mode: str = "full", subset: int | None = None):
        """``(loss(p), p, info)`` (capability ``"loss"``): the loss the step differentiates as a
        function of the flat parameters p (n_params,), at the state's parameters, on the data
        ``mode`` names (``"full"``, ``"subset"``, ``"batch"`` of step t); ``info`` a dict."""
        raise NotImplementedError(f"{type(self).__name__} has no loss")

    def accuracy(self, state, split: str = "train"):
        """The accuracy of a state (capability ``"accuracy"``)."""
        raise NotImplementedError(f"{type(self).__name__} has no accuracy")


def is_training_map(obj) -> bool:
    """Whether ``obj`` is a map whose leading coordinates are parameters (capability
    ``"parameters"``): a :class:`chaosjax.TrainingMap` from any ``from_*`` or a
    :class:`chaosjax.StepMap`, read through the protocol."""
    return isinstance(obj, Map) and "parameters" in obj.capabilities


def require(model: Map, capability: str, what: str, hint: str = "") -> None:
    """One-line ValueError when ``model`` lacks ``capability`` (``what`` names the request,
    ``hint`` says how to get it)."""
    if capability not in model.capabilities:
        have = ", ".join(sorted(model.capabilities)) or "none"
        raise ValueError(
            f"{what} needs a map with a {capability!r} capability; "
            f"{type(model).__name__} has: {have}{hint}"
        )


@jax.tree_util.register_pytree_node_class
class PlainMap(Map):
    """A plain ``step(x, t)`` (``step(x, t, args)`` with per-row arguments) on any pytree state,
    as a map: the state's float leaves are ``x``, its other leaves the carry (``layout``).

    Args:
        step: a :class:`jax.tree_util.Partial` (see :func:`chaosjax._util.as_traceable`).
        layout: the state's :class:`chaosjax._layout.Layout`.
        has_args: whether the step takes per-row arguments.
    """

    def __init__(self, step: Callable, layout, has_args: bool = False):
        self.step, self.layout, self.has_args = step, layout, bool(has_args)

    def flow(self, x, carry, t, args):
        from chaosjax._layout import plain_flow

        return plain_flow(self.step, x, carry, t, args, layout=self.layout, has_args=self.has_args)

    def tree_flatten(self):
        return (self.step,), (self.layout, self.has_args)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    def __repr__(self):
        return f"PlainMap({getattr(self.step, 'func', self.step)!r})"


def as_map(model, batch) -> Map:
    """``model`` as the map protocol: a :class:`chaosjax.Map` as it is, a plain
    ``step(x, t)`` callable as a :class:`chaosjax.PlainMap` on the batch's layout."""
    from chaosjax._util import as_traceable, check_step_signature

    if isinstance(model, Map):
        return model
    step = as_traceable(model)
    has_args = bool(jax.tree_util.tree_leaves(batch.hparams))
    if not has_args:
        check_step_signature(step)
    layout = batch.layout
    if layout is None:
        from chaosjax._layout import layout_of

        layout = layout_of(batch.states, batched=True)
    return PlainMap(step, layout, has_args)


__all__ = ["CAPABILITIES", "Map", "PlainMap", "as_map", "is_training_map", "require"]
