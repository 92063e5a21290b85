"""The training map: one optimizer step as a deterministic map on the training state.

``TrainingMap`` turns (model, loss, dataset, optax optimizer, batch schedule) into
``step(state, t) -> state``. The *dynamical* coordinates — the parameters and the float
optimizer moments — form one flat vector ``x`` (dim,), parameters first: tangents,
perturbations and distances act on it. Everything else the step carries is *carried* and
advanced exactly, never perturbed, never tangent, never in a distance: the model's mutable
variables (BatchNorm running statistics), and the optimizer's integer leaves (``MultiSteps``
and ``apply_if_finite`` counts). When nothing is carried the state *is* ``x``; otherwise it is
a :class:`MapState` ``(x, carry)``. Plain optax update counters are derived from t, so an
SGD/Adam map keeps a flat state.

The batch used at step ``t`` depends only on ``t`` (``fold_in(key, t)``), and so do the keys of
the model's random streams (Dropout): replicas that start from different states see the same
data and the same masks, and the map is deterministic.

Hyper-parameters (learning rate, momentum, Adam's betas, …) are arrays passed to the step,
so a grid of learning rates runs as one vmapped batch (``step_with``).

Length: losses (:mod:`chaosjax.losses`), optimizers (:mod:`chaosjax.optimizers`), the flat
layout (:mod:`chaosjax._layout`) and the NNX adapter live elsewhere; what is here is the map
itself (step, flow, schedules in η_t), its states and its evaluation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.interpreters import partial_eval as pe

from chaosjax._finite_sqrt import finite_sqrt_derivative
from chaosjax._layout import Layout, MapState, layout_of
from chaosjax._map import Map
from chaosjax._util import FieldsPytree, warn_at_caller, x64_enabled
from chaosjax.datasets import Dataset
from chaosjax.losses import LOSSES, constant_loss, cross_entropy_loss, loss_function, mse_loss
from chaosjax.optimizers import (
    OPTIMIZERS,
    SCHEDULES,
    carried_leaf,
    held_learning_rate,
    is_step_counter,
    make_schedule,
    stability_threshold,
    with_hyperparams,
)


def split_state(state) -> tuple[Any, Any]:
    """``(x, carry)`` of a state (``carry`` is None for a flat state)."""
    if isinstance(state, MapState):
        return state.x, state.carry
    return state, None


class _PureForward:
    """The forward pass of a pure ``apply_fn(params, x)`` (nothing carried, no randomness)."""

    def __init__(self, apply_fn):
        self.apply_fn = apply_fn

    def __call__(self, params, model_carry, inputs, *, train: bool, key=None):
        del train, key
        return self.apply_fn(params, inputs), model_carry

    def __hash__(self):
        return hash(self.apply_fn)

    def __eq__(self, other):
        return isinstance(other, _PureForward) and other.apply_fn == self.apply_fn


class TrainingMap(FieldsPytree, Map):
    """One optimizer step as a map ``step(state, t) -> state``.

    Build it from a pure ``apply_fn(params, x)`` and its parameter pytree (this constructor),
    from a Flax NNX model with :meth:`from_nnx`, or from your own ``train_step`` with
    :meth:`from_step`.

    Args:
        apply_fn: ``apply_fn(params, x) -> outputs`` of shape (batch, outputs).
        params: initial parameter pytree (float leaves).
        dataset: a :class:`chaosjax.datasets.Dataset`. For ``loss="mse"`` on a classification
            set the targets become one-hot rows.
        loss: ``"mse"`` (½‖f − y‖² mean), ``"cross_entropy"`` (softmax), or a callable
            ``loss(outputs, targets) -> scalar``.
        optimizer: a name from :data:`chaosjax.optimizers.OPTIMIZERS`, a factory
            ``make(**hparams)`` returning an optax ``GradientTransformation`` (e.g.
            ``optax.inject_hyperparams(optax.adamw)``: its hyper-parameters vmap, so a
            learning-rate grid runs over your own transformation), or any ready optax
            transformation — chains, ``clip_by_global_norm``, ``MultiSteps``,
            ``apply_if_finite``, schedules — used exactly as given. Every update receives
            optax's extra arguments ``value``, ``grad`` and ``value_fn`` (the batch loss of the
            parameter pytree), so the controllers of :mod:`chaosjax.control` work here.
        learning_rate: the learning rate η (required for named optimizers).
        hparams: further hyper-parameters (e.g. ``{"momentum": 0.9}``); for a factory, every
            keyword it takes.
        schedule: learning-rate schedule kind (:data:`SCHEDULES`) for named optimizers, with
            ``schedule_options``.
        batch_size: ``None`` for full batch; else minibatches of this size drawn without
            replacement at step t from ``fold_in(PRNGKey(batch_seed), t)``.
        init_fn: optional ``init_fn(key) -> params`` for independent initialisations.
        features_fn: optional ``features_fn(params, x) -> list of (batch, width)`` hidden
            representations.
        dtype: cast float parameters (and the state) to this dtype.
        matmul_precision: matmul precision inside the step (``"highest"`` keeps float32
            tangents honest on GPUs; ``None`` keeps JAX's default).
        opt_state: an optimizer state to start from (mid-training: moments and step counts;
            schedules continue from its counts); default ``optimizer.init(params)``.
        rng_seed: seed of the keys of the model's random streams (Dropout): at step t they are
            derived from (rng_seed, t), the same for every replica.
        optimizer_kind: for an optimizer passed as a transformation or factory, the name in
            :data:`chaosjax.optimizers.OPTIMIZERS` whose stability threshold and curvature
            operator apply (e.g. ``"adamw"`` for ``optax.inject_hyperparams(optax.adamw)(...)``;
            its other hyper-parameters, such as β1, take the registry's defaults unless the
            map's ``hparams`` hold them). Without it a transformation's threshold is NaN.

    The state is the flat vector x (dim,) = (n_params + n_moments,) when nothing is carried
    (``n_params`` leading entries are the parameters in ``jax.tree_util`` order), else a
    :class:`MapState` ``(x, carry)``.
    """

    def __init__(
        self,
        apply_fn: Callable,
        params: Any,
        dataset: Dataset,
        *,
        loss: str | Callable = "mse",
        optimizer: str | Callable | optax.GradientTransformation = "sgd",
        learning_rate: float | None = None,
        hparams: Mapping[str, float] | None = None,
        schedule: str = "constant",
        schedule_options: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
        batch_seed: int = 0,
        init_fn: Callable | None = None,
        features_fn: Callable | None = None,
        dtype=None,
        matmul_precision: str | None = "highest",
        name: str | None = None,
        opt_state=None,
        rng_seed: int = 0,
        optimizer_kind: str | None = None,
        _forward=None,
        _model_carry=(),
    ):
        if not callable(apply_fn):
            raise TypeError("apply_fn: expected a callable apply_fn(params, x)")
        if not isinstance(dataset, Dataset):
            raise TypeError(
                f"dataset: expected a chaosjax.datasets.Dataset, got {type(dataset).__name__}"
            )
        if dtype is not None and jnp.dtype(dtype) == jnp.float64 and not x64_enabled():
            raise ValueError(
                "dtype: float64 needs jax_enable_x64; call jax.config.update('jax_enable_x64', True)"
            )
        params = _as_arrays(params, dtype)
        self._apply_fn = apply_fn
        self._forward = _forward if _forward is not None else _PureForward(apply_fn)
        self._loss = loss_function(loss)
        self.loss_name = loss if isinstance(loss, str) else getattr(loss, "__name__", "custom")
        self.task = dataset.task
        if self.task == "classification" and self.loss_name == "mse":
            dataset = dataset.one_hot()
        self._params_layout = layout_of(params, what="params")
        if self._params_layout.n_carried:
            bad = next(s for s in self._params_layout.leaves if not s.dynamic)
            raise TypeError(
                f"params: leaf {bad.name!r} has dtype {bad.dtype}; parameters must be floats"
            )
        self.state_dtype = self._params_layout.dtype
        data = dataset.astype(np.dtype(self.state_dtype))
        self.data = {
            "x_train": jnp.asarray(data.x_train),
            "y_train": jnp.asarray(data.y_train),
            "x_test": jnp.asarray(data.x_test),
            "y_test": jnp.asarray(data.y_test),
        }
        self.dataset_name = dataset.name
        self.n_classes = dataset.n_classes

        self._factory, hp, self.optimizer_name = self._resolve_optimizer(
            optimizer, learning_rate, hparams, schedule, dict(schedule_options or {})
        )
        self._schedule = (
            (schedule, _frozen(schedule_options or {})) if isinstance(optimizer, str) else None
        )
        if optimizer_kind is not None:
            if optimizer_kind not in OPTIMIZERS:
                raise ValueError(
                    f"optimizer_kind: unknown {optimizer_kind!r}; allowed: {', '.join(OPTIMIZERS)}"
                )
            if isinstance(optimizer, str) and optimizer != optimizer_kind:
                raise ValueError(
                    f"optimizer_kind: {optimizer_kind!r} contradicts optimizer={optimizer!r}"
                )
            self.optimizer_name = optimizer_kind
        pdtype = jnp.dtype(self.state_dtype)
        self.hparams = {k: jnp.asarray(v, pdtype) for k, v in sorted(hp.items())}

        n_train = int(self.data["x_train"].shape[0])
        if batch_size is not None and batch_size != 0:
            if int(batch_size) != batch_size or not 1 <= batch_size <= n_train:
                raise ValueError(
                    f"batch_size: must be an integer in [1, {n_train}] or None, got {batch_size!r}"
                )
            batch_size = None if int(batch_size) == n_train else int(batch_size)
        else:
            batch_size = None
        self.batch_size = batch_size
        self.batch_seed = int(batch_seed)
        self.rng_seed = int(rng_seed)
        self.init_fn = init_fn
        self.features_fn = features_fn
        self.matmul_precision = matmul_precision
        self.name = name or "training_map"
        self.n_params = self._params_layout.dim
        self._params0 = params
        self._model_carry0 = _model_carry

        # the optimizer state: float moments dynamical, integers carried or derived from t
        tx = self._factory(**self.hparams)
        if opt_state is None:
            opt_state = tx.init(params)
        else:
            opt_state = _adopt_opt_state(tx.init(params), opt_state)
        self._opt_layout = layout_of(opt_state, carried=carried_leaf, what="optimizer state")
        carried = self._opt_layout.split(opt_state)[1]
        names = [s.name for s in self._opt_layout.leaves if not s.dynamic]
        self._counters = self._derived_counters(tx, params, opt_state, names, carried)
        self.counters0 = tuple(jnp.asarray(c) for c, d in zip(carried, self._counters) if d)
        self._opt_carry0 = tuple(jnp.asarray(c) for c, d in zip(carried, self._counters) if not d)
        self._opt_floats0 = self._opt_layout.split(opt_state)[0]
        self.dim = self.n_params + self._opt_layout.dim
        self.has_carry = bool(jax.tree_util.tree_leaves((self._model_carry0, self._opt_carry0)))
        held = held_learning_rate(opt_state) is not None
        if self._schedule is not None:
            self._lr_source = "schedule"
        elif held:
            self._lr_source = "state"
        else:
            self._lr_source = "hparam" if "learning_rate" in self.hparams else "unknown"
        warn_unknown_threshold(self)

    # -- construction helpers --------------------------------------------------------------

    @staticmethod
    def _resolve_optimizer(optimizer, learning_rate, hparams, schedule, schedule_options):
        hparams = dict(hparams or {})
        if _is_nnx_optimizer(optimizer):
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
                raise ValueError(
                    f"optimizer: unknown {optimizer!r}; allowed: {', '.join(OPTIMIZERS)}"
                )
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

    def _derived_counters(self, tx, params, opt_state, names, carried) -> tuple[bool, ...]:
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
            x, y = self.data["x_train"], self.data["y_train"]

            def counters_after_one_update(params, opt_state, x, y):
                # only the integer leaves are returned: the jaxpr keeps what they need (a
                # controller's Krylov solve is dead code here and is neither run nor compiled)
                _, new_state = optax.with_extra_args_support(tx).update(
                    zeros, opt_state, params, **self._extra_args(params, x, y, zeros)
                )
                return self._opt_layout.split(new_state)[1]

            closed = jax.make_jaxpr(counters_after_one_update)(params, opt_state, x, y)
            kept, used_in = pe.dce_jaxpr(closed.jaxpr, True)
            leaves = jax.tree_util.tree_leaves((params, opt_state, x, y))
            args = [a for a, u in zip(leaves, used_in, strict=True) if u]
            new = jax.core.eval_jaxpr(kept, closed.consts, *args)
            plain = all(bool(jnp.all(b == a + 1)) for a, b in zip(carried, new))
        return tuple(plain for _ in carried)

    @classmethod
    def from_nnx(
        cls,
        model,
        dataset: Dataset,
        *,
        model_factory: Callable | None = None,
        optimizer="sgd",
        **kwargs,
    ):
        """Build from any Flax NNX model (split once; merged inside the step, no ``nnx.jit``).

        Its ``nnx.Param`` variables are trained. Every other variable the model updates in
        train mode (``nnx.BatchStat`` running statistics, and any other mutable collection) is
        carried by the map and advanced exactly by the step, outside the tangent space,
        perturbations and distances. Random streams (Dropout, stochastic depth) draw keys
        derived from (``rng_seed``, t), the same for every replica. The step runs in train
        mode; :meth:`loss`, :meth:`accuracy` and :meth:`evaluate` in eval mode; curvature
        (:meth:`loss_of_params`) in train mode with dropout off — the loss the step
        differentiates, with batch statistics of the examples it is evaluated on.

        Args:
            model: an ``nnx.Module``.
            dataset: the dataset.
            model_factory: optional ``model_factory(rngs) -> Module`` used by
                :meth:`init_from_key` for independent initialisations.
            optimizer: as for :class:`TrainingMap`, or your ``nnx.Optimizer``: its
                transformation, moments and step count are the starting state (an analysis can
                start mid-training; schedules continue).
            **kwargs: as for :class:`TrainingMap`.

        Raises:
            TypeError / ValueError naming the variable when the model holds state chaosjax
            cannot carry (a non-array value, a variable that changes shape in a step).
        """
        from chaosjax import nnx_adapter

        dtype = kwargs.get("dtype")
        forward, params, carry, features = nnx_adapter.split_model(model, dtype=dtype)
        probe = dataset.x_train[:2]
        if np.issubdtype(probe.dtype, np.floating):
            pdt = jax.tree_util.tree_leaves(params)[0].dtype if dtype is None else dtype
            probe = probe.astype(pdt)
        nnx_adapter.check_carry(forward, params, carry, jnp.asarray(probe))
        if _is_nnx_optimizer(optimizer):
            kwargs.setdefault("opt_state", nnx_adapter.optimizer_state(optimizer))
        init_fn = None
        if model_factory is not None:
            init_fn = functools.partial(nnx_adapter.init_params, model_factory, dtype)
        kwargs.setdefault("init_fn", init_fn)
        kwargs.setdefault("features_fn", features)
        kwargs.setdefault("name", type(model).__name__)
        return cls(
            nnx_adapter.TrainApply(forward, carry),
            params,
            dataset,
            optimizer=optimizer,
            _forward=forward,
            _model_carry=carry,
            **kwargs,
        )

    @classmethod
    def from_apply(cls, apply_fn, params, dataset, **kwargs):
        """Build from a pure ``apply_fn(params, x)`` (same as the constructor)."""
        return cls(apply_fn, params, dataset, **kwargs)

    @classmethod
    def from_step(cls, train_step, state, *, batch_fn, **kwargs):
        """Your own ``train_step(state, batch) -> state`` (or ``-> (state, metrics)``) as a map;
        see :class:`chaosjax.stepmap.StepMap` for the arguments."""
        # StepMap builds on this module and registers itself here when chaosjax is imported
        # (chaosjax/__init__ imports chaosjax.stepmap): no import back from this layer
        return _STEP_MAP["class"](train_step, state, batch_fn=batch_fn, **kwargs)

    def replace(self, **hparams) -> TrainingMap:
        """A copy with hyper-parameters replaced, e.g. ``tmap.replace(learning_rate=0.5)``."""
        unknown = set(hparams) - set(self.hparams)
        if unknown:
            raise ValueError(f"hparams: unknown {sorted(unknown)}; allowed: {sorted(self.hparams)}")
        leaves, treedef = jax.tree_util.tree_flatten(self)
        new = jax.tree_util.tree_unflatten(treedef, leaves)
        dt = jnp.dtype(self.state_dtype)
        new.hparams = {**self.hparams, **{k: jnp.asarray(v, dt) for k, v in hparams.items()}}
        return new

    # -- pytree -----------------------------------------------------------------------------

    # the pytree children (arrays); every other attribute is static (FieldsPytree)
    _DYNAMIC = (
        "data",
        "hparams",
        "counters0",
        "_params0",
        "_opt_floats0",
        "_opt_carry0",
        "_model_carry0",
    )

    # -- learning rate ----------------------------------------------------------------------

    @property
    def learning_rate(self) -> float | None:
        """The base (peak) learning rate; η at step t is :meth:`learning_rate_at`."""
        lr = self.hparams.get("learning_rate")
        return None if lr is None else float(lr)

    @property
    def learning_rate_source(self) -> str:
        """How η_t is known: ``"schedule"`` (a named optimizer's schedule, a function of t),
        ``"state"`` (held by the optimizer state: ``optax.inject_hyperparams`` or a chaosjax
        controller), ``"hparam"`` (a factory's ``learning_rate``, taken as constant), or
        ``"unknown"``."""
        return self._lr_source

    def learning_rate_at(self, state, t, hparams=None) -> jax.Array:
        """η of the step taken at ``t`` (jittable): a named optimizer's schedule at the step's
        count; the learning rate an ``optax.inject_hyperparams`` state or a chaosjax controller
        holds (the η of the last step taken); a factory's ``learning_rate`` hyper-parameter;
        NaN when the map cannot know (a ready ``GradientTransformation``:
        :attr:`learning_rate_source` says so). Thresholds 2/η_t and ηt units use it."""
        hp = self.hparams if hparams is None else hparams
        src = self.learning_rate_source
        if src == "schedule":
            kind, opts = self._schedule
            sched = make_schedule(kind, hp["learning_rate"], **_thawed(opts))
            count = t + (self.counters0[0] if self.counters0 else 0)
            return jnp.asarray(sched(count) if callable(sched) else sched, self.state_dtype)
        if src == "state":
            held = held_learning_rate(self.opt_state(state, t, hp))
            return jnp.asarray(held, self.state_dtype)
        if src == "hparam":
            return jnp.asarray(hp["learning_rate"], self.state_dtype)
        return jnp.full((), jnp.nan, self.state_dtype)

    @property
    def has_loss(self) -> bool:
        """Whether the map has a loss (records, divergence flags, curvature)."""
        return True

    @property
    def capabilities(self) -> frozenset[str]:
        """The map protocol's capabilities (:mod:`chaosjax._map`): a loss, evaluation on the
        test split, the learning rate and threshold, parameters, the network's outputs, and
        accuracy on a classification task."""
        caps = {"loss", "test", "learning_rate", "parameters", "outputs"}
        return frozenset(caps | ({"accuracy"} if self.task == "classification" else set()))

    def n_params_of(self, dim: int) -> int:
        """The parameters lead the state: ``n_params`` of its ``dim`` coordinates."""
        return self.n_params

    @property
    def optimizer_hparams(self) -> dict[str, Any]:
        """Hyper-parameters of the optimizer's stability threshold beyond ``hparams`` (none
        here: a named optimizer's are its ``hparams``)."""
        return {}

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
            "named optimizer, a factory with learning_rate, or optax.inject_hyperparams"
        )

    # -- state <-> pytrees ------------------------------------------------------------------

    @property
    def apply_fn(self) -> Callable:
        """The network: ``apply_fn(params, x) -> outputs`` on a parameter pytree (the loss the
        step differentiates: train mode, dropout off)."""
        return self._apply_fn

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

    @property
    def carry0(self):
        """The carried part of a fresh state: (model variables, optimizer integers)."""
        return (self._model_carry0, self._opt_carry0)

    def init(self, params=None):
        """The state for ``params`` (default: the construction parameters and optimizer state)
        with a fresh optimizer state for new parameters."""
        if params is None:
            return self.pack(jnp.concatenate([self._params_layout.ravel(self._params0),
                                              self._opt_floats0.astype(self.state_dtype)]))  # fmt: skip
        params = jax.tree_util.tree_map(
            lambda a, ref: jnp.asarray(a, ref.dtype), params, self._params0
        )
        if jax.tree_util.tree_structure(params) != self._params_layout.treedef:
            raise ValueError("params: structure differs from the training map's parameters")
        opt_state = self._factory(**self.hparams).init(params)
        floats, carried = self._opt_layout.split(opt_state)
        opt_carry = tuple(c for c, d in zip(carried, self._counters) if not d)
        x = jnp.concatenate([self._params_layout.ravel(params), floats.astype(self.state_dtype)])
        return self.pack(x, (self._model_carry0, opt_carry))

    def init_from_key(self, key):
        """The state of an independent initialisation drawn with ``key`` (or an int seed)."""
        if self.init_fn is None:
            raise ValueError(
                "init_fn: this training map has no initialiser; pass init_fn (or model_factory) "
                "to build replicas from independent seeds"
            )
        if isinstance(key, int | np.integer):
            key = jax.random.PRNGKey(int(key))
        return self.init(self.init_fn(key))

    def _flat(self, params, opt_state) -> tuple[jax.Array, tuple]:
        floats, carried = self._opt_layout.split(opt_state)
        x = jnp.concatenate(
            [
                self._params_layout.ravel(params).astype(self.state_dtype),
                floats.astype(self.state_dtype),
            ]
        )
        return x, tuple(c for c, d in zip(carried, self._counters) if not d)

    def params(self, state) -> Any:
        """Parameter pytree of a state."""
        x, _ = split_state(state)
        return self._params_layout.unravel(x[: self.n_params])

    def unravel_params(self, p) -> Any:
        """Parameter pytree of a flat parameter vector (n_params,)."""
        return self._params_layout.unravel(p)

    def flat_params(self, state) -> jax.Array:
        """The parameter part of the state, shape (n_params,)."""
        x, _ = split_state(state)
        return x[..., : self.n_params]

    def with_params(self, state, p):
        """The state with its parameter part replaced by ``p`` (n_params,)."""
        x, carry = split_state(state)
        x = jnp.concatenate([p, x[self.n_params :]])
        return x if carry is None else MapState(x, carry)

    def opt_state(self, state, t, hparams=None) -> Any:
        """The full optax state at step ``t`` (float moments from the state, counters from t,
        other integers from the carry, an ``inject_hyperparams`` state's hyper-parameters from
        ``hparams``, default the map's)."""
        x, carry = split_state(state)
        opt_carry = self._opt_carry0 if carry is None else carry[1]
        return self._opt_state(x, opt_carry, t, hparams)

    def _opt_state(self, x, opt_carry, t, hparams=None):
        t = jnp.asarray(t)
        derived = iter([(c + t).astype(c.dtype) for c in self.counters0])
        kept = iter(opt_carry)
        carried = tuple(next(derived) if d else next(kept) for d in self._counters)
        state = self._opt_layout.merge(x[self.n_params :], carried)
        return with_hyperparams(state, self.hparams if hparams is None else hparams)

    @property
    def layers(self) -> dict[str, tuple[int, int]]:
        """Parameter ranges per layer: {layer name: (start, stop)} within the parameter part."""
        return self._params_layout.groups()

    @property
    def weight_mask(self) -> np.ndarray:
        """Boolean mask (n_params,) of weight entries (kernels; not biases)."""
        return self._params_layout.weight_mask()

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self._params_layout.leaves)

    @property
    def param_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of the parameter leaves (in the state's order)."""
        return tuple(s.shape for s in self._params_layout.leaves)

    # -- the map ----------------------------------------------------------------------------

    def _batch(self, t):
        x, y = self.data["x_train"], self.data["y_train"]
        if self.batch_size is None:
            return x, y
        idx = self.batch_indices(t)
        return x[idx], y[idx]

    def batch_indices(self, t) -> jax.Array:
        """Indices of the training examples used at step ``t`` (all of them for full batch)."""
        n = self.data["x_train"].shape[0]
        if self.batch_size is None:
            return jnp.arange(n)
        key = jax.random.fold_in(jax.random.PRNGKey(self.batch_seed), t)
        return jax.random.choice(key, n, (self.batch_size,), replace=False)

    def step_key(self, t):
        """The key of the model's random streams at step t (the same for every replica)."""
        return jax.random.fold_in(jax.random.key(self.rng_seed), t)

    def loss_of_params(self, params, x=None, y=None) -> jax.Array:
        """Loss of a parameter pytree on (x, y) (default: the full training set) — the loss the
        step differentiates: train mode (batch statistics of these examples), dropout off."""
        if x is None:
            x, y = self.data["x_train"], self.data["y_train"]
        return self.batch_loss(params, (x, y))

    def _model_carry(self, state):
        carry = None if state is None else split_state(state)[1]
        return self._model_carry0 if carry is None else carry[0]

    def batch_loss(self, params, batch, state=None) -> jax.Array:
        """The step's loss of a parameter pytree on ``batch`` (the map's own batch form:
        ``(x, y)`` here), train mode with dropout off, with the model carry of ``state``."""
        xb, yb = batch
        out, _ = self._forward(params, self._model_carry(state), xb, train=True, key=None)
        return self._loss(out, yb)

    def output_of_params(self, params, x, state=None) -> jax.Array:
        """Outputs of a parameter pytree on inputs ``x`` as the step sees them (train mode,
        dropout off)."""
        return self._forward(params, self._model_carry(state), x, train=True, key=None)[0]

    def curvature_batch(self, t=0, mode: str = "full", subset: int | None = None):
        """``(batch, info)`` a curvature measurement uses: ``"full"`` the training set,
        ``"subset"`` its first ``subset`` examples, ``"batch"`` the minibatch of step t."""
        x, y = self.data["x_train"], self.data["y_train"]
        info = {"mode": mode}
        if mode == "subset":
            n = x.shape[0] if subset is None else int(subset)
            if not 1 <= n <= x.shape[0]:
                raise ValueError(f"subset: must be in [1, {x.shape[0]}], got {subset!r}")
            x, y = x[:n], y[:n]
            info["indices"] = (0, n)
        elif mode == "batch":
            idx = self.batch_indices(t)
            x, y = x[idx], y[idx]
            info["t"] = t
        elif mode != "full":
            raise ValueError(f"mode: unknown {mode!r}; allowed: full, subset, batch")
        return (x, y), info

    def _extra_args(self, params, x, y, grads, loss=None):
        """optax extra arguments of every update: the batch loss, its gradient and ``value_fn``
        (the batch loss as a function of the parameter pytree), as optax's line searches and
        :mod:`chaosjax.control` expect."""
        if loss is None:
            loss = self.loss_of_params(params, x, y)
        return {
            "value": loss,
            "grad": grads,
            "value_fn": lambda p: self.loss_of_params(p, x, y),
        }

    def flow(self, x, carry, t, hparams):
        """The engine's form of one step: ``(x, carry, t, hparams) -> (x', carry', loss)``,
        ``x`` the dynamical coordinates (dim,), ``carry`` the carried leaves (``()`` when the
        map carries nothing), loss the batch loss before the step."""
        ctx = (
            jax.default_matmul_precision(self.matmul_precision)
            if self.matmul_precision
            else _nullcontext()
        )
        model_carry, opt_carry = carry if self.has_carry else (self._model_carry0, ())
        with ctx:
            params = self.params(x)
            opt_state = self._opt_state(x, opt_carry, t, hparams)
            xb, yb = self._batch(t)
            key = self.step_key(t)

            def batch_loss(p):
                out, new_mc = self._forward(p, model_carry, xb, train=True, key=key)
                return self._loss(out, yb), new_mc

            (loss, new_mc), grads = jax.value_and_grad(batch_loss, has_aux=True)(params)
            tx = optax.with_extra_args_support(self._factory(**hparams))
            extra = {"value": loss, "grad": grads, "value_fn": lambda p: batch_loss(p)[0]}
            # √ of the update's moments differentiable at 0 (never the loss in value_fn)
            update = finite_sqrt_derivative(
                lambda g, s, p: tx.update(g, s, p, **extra), lambda g, s, p: (True, True, False)
            )
            updates, new_opt = update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            new_x, new_opt_carry = self._flat(new_params, new_opt)
        new_carry = (new_mc, new_opt_carry) if self.has_carry else carry
        return new_x.astype(x.dtype), new_carry, loss

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

    # -- evaluation (eval mode) -------------------------------------------------------------

    def _split(self, split):
        if split not in ("train", "test"):
            raise ValueError(f"split: must be 'train' or 'test', got {split!r}")
        return self.data[f"x_{split}"], self.data[f"y_{split}"]

    def _eval(self, state, x):
        xs, carry = split_state(state)
        model_carry = self._model_carry0 if carry is None else carry[0]
        out, _ = self._forward(self.params(xs), model_carry, x, train=False, key=None)
        return out

    def output(self, state, x) -> jax.Array:
        """Network outputs (eval mode) for inputs x (batch, ...) → (batch, outputs)."""
        return self._eval(state, x)

    @property
    def constant_loss(self) -> float:
        """The training loss of the best constant output (:func:`chaosjax.losses.constant_loss`:
        the class-prior entropy for cross-entropy): the level of a dead plateau."""
        return constant_loss(self.loss_name, self.data["y_train"])

    @property
    def loss_data(self) -> str:
        """What the loss records are of, in words (``from_step`` maps: see there)."""
        return "the whole training set (eval mode)"

    def loss(self, state, split: str = "train", t=None) -> jax.Array:
        """Full-batch loss of the state on ``split`` ('train' or 'test'), in eval mode (NaN
        without a test split); ``t`` is unused (the records of a ``from_step`` map are of the
        batch of step t)."""
        x, y = self._split(split)
        return self._loss(self._eval(state, x), y)

    def accuracy(self, state, split: str = "train") -> jax.Array:
        """Classification accuracy on ``split`` (argmax of the outputs, eval mode)."""
        if self.task != "classification":
            raise ValueError(f"accuracy: dataset {self.dataset_name!r} is a regression task")
        x, y = self._split(split)
        pred = jnp.argmax(self._eval(state, x), axis=-1)
        labels = jnp.argmax(y, -1) if y.ndim == pred.ndim + 1 else y
        return jnp.mean((pred == labels).astype(self.state_dtype))

    def evaluate(self, state, split: str = "test") -> dict[str, jax.Array]:
        """``{"loss": …, "accuracy": …}`` on ``split`` (accuracy for classification only)."""
        out = {"loss": self.loss(state, split)}
        if self.task == "classification":
            out["accuracy"] = self.accuracy(state, split)
        return out

    def features(self, state, x) -> list:
        """Hidden representations (list of (batch, width)) if the model exposes them."""
        if self.features_fn is None:
            raise ValueError("features_fn: this training map's model exposes no hidden features")
        return self.features_fn(self.params(state), x)

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={float(v):g}" for k, v in self.hparams.items())
        carry = ", carries state" if self.has_carry else ""
        return (
            f"{type(self).__name__}({self.name}, data={self.dataset_name}, loss={self.loss_name}, "
            f"optimizer={self.optimizer_name}({hp}), batch={self.batch_size or 'full'}, "
            f"n_params={self.n_params}, dim={self.dim}, dtype={self.state_dtype}{carry}; "
            f"loss records of {self.loss_data})"
        )


jax.tree_util.register_pytree_node_class(TrainingMap)

#: the class behind :meth:`TrainingMap.from_step`, registered by :mod:`chaosjax.stepmap`
_STEP_MAP: dict[str, type] = {}


@jax.jit
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


def _step_and_loss(tmap, state, t, hparams):
    x, carry = split_state(state)
    new_x, new_carry, loss = tmap.flow(x, () if carry is None else carry, t, hparams)
    return (new_x if carry is None else MapState(new_x, new_carry)), loss


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _as_arrays(params, dtype):
    if dtype is not None:
        return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)
    return jax.tree_util.tree_map(jnp.asarray, params)


def _frozen(options: Mapping[str, Any]) -> tuple:
    """Schedule options as a hashable tuple (static pytree data)."""
    return tuple(
        sorted((k, tuple(v) if isinstance(v, list | tuple) else v) for k, v in options.items())
    )


def _thawed(options: tuple) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options}


def _is_nnx_optimizer(obj) -> bool:
    return type(obj).__name__ == "Optimizer" and hasattr(obj, "tx") and hasattr(obj, "opt_state")


def _adopt_opt_state(fresh, given):
    """A user's optimizer state in the structure ``tx.init(params)`` gives (an
    ``nnx.Optimizer`` wraps its leaves in variables): leaves matched in order, shapes checked."""
    from chaosjax.nnx_adapter import unwrap_variables

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
    "LOSSES",
    "OPTIMIZERS",
    "SCHEDULES",
    "Layout",
    "MapState",
    "TrainingMap",
    "cross_entropy_loss",
    "make_schedule",
    "mse_loss",
    "split_state",
]
