"""What every training map shares, whatever builds it: one step and its loss as one compiled
program, the state codec around ``(x, carry)``, the parameter slice, the learning rate's
source and the optimizer's stability threshold at t.

:class:`TrainingCore` implements the map protocol (:class:`chaosjax.Map`) for the training
maps; :class:`chaosjax.TrainingMap` (a model, a loss, a dataset and an optax optimizer; the
NNX path) and :class:`chaosjax.StepMap` (your own ``train_step``) are siblings built on it.
A training map sets, in its ``__init__``: ``n_params``, ``has_carry``, ``carry0``, ``hparams``,
``state_dtype``, ``optimizer_name``, ``_lr_source`` and ``rng_seed``, and defines ``flow``,
``learning_rate_at`` and ``optimizer_hparams``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from chaosjax._layout import MapState, split_state
from chaosjax._map import Map
from chaosjax._util import FieldsPytree, warn_at_caller
from chaosjax.optimizers import OPTIMIZERS, stability_threshold


def warn_unknown_threshold(tmap) -> None:
    """One warning when a map names its optimizer's kind (so a stability threshold is asked
    for) but cannot know η_t: its thresholds and ηt units are NaN."""
    if tmap.learning_rate_source != "unknown" or tmap.optimizer_name in ("custom", None):
        return
    if tmap.optimizer_name not in OPTIMIZERS:
        return
    warn_at_caller(
        f"learning_rate: the map cannot know η_t of its {tmap.optimizer_name!r} optimizer (a ready "
        "GradientTransformation hides it), so thresholds 2/η and ηt units are NaN; wrap the "
        "optimizer in optax.inject_hyperparams (e.g. optax.inject_hyperparams(optax.sgd)"
        "(learning_rate=0.3)), pass a factory with learning_rate=, or a named optimizer",
    )


@jax.jit
def _step_and_loss(tmap, state, t, hparams):
    """One step and the loss before it, one compiled program per map structure and state shape."""
    x, carry = split_state(state)
    new_x, new_carry, loss = tmap.flow(x, () if carry is None else carry, t, hparams)
    return (new_x if carry is None else MapState(new_x, new_carry)), loss


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


#: the class behind :meth:`TrainingMap.from_step`, registered by :mod:`chaosjax.stepmap`
_STEP_MAP: dict[str, type] = {}


class TrainingCore(FieldsPytree, Map):
    """The shared part of the training maps (see the module doc)."""

    @property
    def has_loss(self) -> bool:
        """Whether the map has a loss (records, divergence flags, curvature)."""
        return True

    @property
    def learning_rate_source(self) -> str:
        """How η_t is known: ``"schedule"`` (a named optimizer's schedule, a function of t),
        ``"state"`` (held by the optimizer state: ``optax.inject_hyperparams`` or a chaosjax
        controller), ``"hparam"`` (a factory's ``learning_rate``, taken as constant), or
        ``"unknown"``."""
        return self._lr_source

    def n_params_of(self, dim: int) -> int:
        """The parameters lead the state: ``n_params`` of its ``dim`` coordinates."""
        return self.n_params

    def threshold_at(self, state, t, hparams=None) -> jax.Array:
        """The optimizer's stability threshold on λmax at step t (c/η_t, see
        :func:`chaosjax.optimizers.stability_threshold`); NaN when the optimizer or η_t is not
        known."""
        hp = self.hparams if hparams is None else hparams
        eta = self.learning_rate_at(state, t, hparams)
        thr, _ = stability_threshold(
            self.optimizer_name, {**self.optimizer_hparams, **hp, "learning_rate": eta}
        )
        return jnp.asarray(thr, self.state_dtype)

    def pack(self, x, carry=None):
        """The state of dynamical coordinates ``x`` and ``carry`` (x alone when nothing is
        carried)."""
        if not self.has_carry:
            return x
        return MapState(x, self.carry0 if carry is None else carry)

    def final_state(self, results, replica: int):
        """The state replica ``replica`` of a :func:`run_replicas` result ended in (its
        dynamical coordinates and, for a map that carries state, its carry)."""
        x = jnp.asarray(results.final_state[replica])
        if not self.has_carry:
            return x
        treedef = jax.tree_util.tree_structure(self.carry0)
        leaves = [jnp.asarray(c[replica]) for c in results.final_carry]
        return self.pack(x, jax.tree_util.tree_unflatten(treedef, leaves))

    def flat_params(self, state) -> jax.Array:
        """The parameter part of the state, shape (n_params,)."""
        x, _ = split_state(state)
        return x[..., : self.n_params]

    def with_params(self, state, p):
        """The state with its parameter part replaced by ``p`` (n_params,)."""
        x, carry = split_state(state)
        x = jnp.concatenate([p, x[self.n_params :]])
        return x if carry is None else MapState(x, carry)

    def curvature_loss(self, state, t=0, mode: str = "full", subset: int | None = None):
        """``(loss(p), p, info)``: the batch loss of :meth:`curvature_batch` as a function of
        the flat parameters (the map protocol's ``"loss"`` capability)."""
        batch, info = self.curvature_batch(t, mode, subset)
        params = self.flat_params(state)

        def loss(p):
            return self.batch_loss(self.unravel_params(p), batch, state)

        return loss, params, info

    def step_key(self, t):
        """The key of the model's random streams at step t (the same for every replica)."""
        return jax.random.fold_in(jax.random.key(self.rng_seed), t)

    def step_and_loss(self, state, t, hparams=None):
        """One step: ``(new_state, loss)`` where loss is the batch loss *before* the step.

        Compiled once per map structure and state shape (``jax.jit`` with the map as a pytree
        argument), so eager calls in a notebook do not dispatch op by op; inside your own
        ``jit``/``vmap``/``jvp``/``scan`` it is inlined like any jitted function."""
        return _step_and_loss(self, state, t, self.hparams if hparams is None else hparams)

    def step_with(self, state, t, hparams):
        """One step with explicit hyper-parameters (a dict of arrays; vmappable)."""
        return self.step_and_loss(state, t, hparams)[0]

    def step(self, state, t):
        """One optimizer step ``state_t -> state_{t+1}`` on batch ``t``."""
        return self.step_and_loss(state, t)[0]

    def learning_rates(self, steps, hparams=None) -> tuple[np.ndarray | None, str]:
        """η at each of ``steps`` when it is a function of t alone, with ``''``; else ``None``
        and the reason (η held by the optimizer state, or unknown)."""
        src = self.learning_rate_source
        if src in ("schedule", "hparam"):
            f = jax.vmap(lambda t: self.learning_rate_at(None, t, hparams))
            return np.asarray(f(jnp.asarray(steps)), np.float64), ""
        if src == "state":
            return None, (
                "η is held by the optimizer state (inject_hyperparams or a controller): known at "
                "the records, not at every step"
            )
        return None, (
            f"the optimizer ({self.optimizer_name}) does not expose its learning rate: pass a "
            "named optimizer, a factory with learning_rate, or optax.inject_hyperparams (from_step: "
            "learning_rate= and optimizer_kind=)"
        )


__all__ = ["TrainingCore", "split_state", "warn_unknown_threshold"]
