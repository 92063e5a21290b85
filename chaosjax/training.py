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

What every training map shares (the compiled step, the state codec, thresholds) is
:class:`chaosjax._training_core.TrainingCore`; :class:`chaosjax.StepMap` is a sibling built on it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from chaosjax._finite_sqrt import finite_sqrt_derivative
from chaosjax._layout import Layout, MapState, layout_of
from chaosjax._optimizer_binding import (
    adopt_opt_state,
    derived_counters,
    frozen,
    resolve_optimizer,
    thawed,
)
from chaosjax._training_core import (
    _STEP_MAP,
    TrainingCore,
    _nullcontext,
    split_state,
    warn_unknown_threshold,
)
from chaosjax._util import x64_enabled
from chaosjax.datasets import Dataset
from chaosjax.losses import LOSSES, constant_loss, cross_entropy_loss, loss_function, mse_loss
from chaosjax.nnx_adapter import PureForward
from chaosjax.optimizers import (
    OPTIMIZERS,
    SCHEDULES,
    carried_leaf,
    held_learning_rate,
    make_schedule,
    with_hyperparams,
)


class TrainingMap(TrainingCore):
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
        self._forward = _forward if _forward is not None else PureForward(apply_fn)
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

        self._factory, hp, self.optimizer_name = resolve_optimizer(
            optimizer, learning_rate, hparams, schedule, dict(schedule_options or {})
        )
        self._schedule = (
            (schedule, frozen(schedule_options or {})) if isinstance(optimizer, str) else None
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
            opt_state = adopt_opt_state(tx.init(params), opt_state)
        self._opt_layout = layout_of(opt_state, carried=carried_leaf, what="optimizer state")
        carried = self._opt_layout.split(opt_state)[1]
        names = [s.name for s in self._opt_layout.leaves if not s.dynamic]
        self._counters = derived_counters(self, tx, params, opt_state, names, carried)
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

        return nnx_adapter.training_map(cls, model, dataset, model_factory, optimizer, kwargs)

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
            sched = make_schedule(kind, hp["learning_rate"], **thawed(opts))
            count = t + (self.counters0[0] if self.counters0 else 0)
            return jnp.asarray(sched(count) if callable(sched) else sched, self.state_dtype)
        if src == "state":
            held = held_learning_rate(self.opt_state(state, t, hp))
            return jnp.asarray(held, self.state_dtype)
        if src == "hparam":
            return jnp.asarray(hp["learning_rate"], self.state_dtype)
        return jnp.full((), jnp.nan, self.state_dtype)

    @property
    def capabilities(self) -> frozenset[str]:
        """The map protocol's capabilities (:mod:`chaosjax._map`): a loss, evaluation on the
        test split, the learning rate and threshold, parameters, the network's outputs, and
        accuracy on a classification task."""
        caps = {"loss", "test", "learning_rate", "parameters", "outputs"}
        return frozenset(caps | ({"accuracy"} if self.task == "classification" else set()))

    @property
    def optimizer_hparams(self) -> dict[str, Any]:
        """Hyper-parameters of the optimizer's stability threshold beyond ``hparams`` (none
        here: a named optimizer's are its ``hparams``)."""
        return {}

    # -- state <-> pytrees ------------------------------------------------------------------

    @property
    def apply_fn(self) -> Callable:
        """The network: ``apply_fn(params, x) -> outputs`` on a parameter pytree (the loss the
        step differentiates: train mode, dropout off)."""
        return self._apply_fn

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


def _as_arrays(params, dtype):
    if dtype is not None:
        return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)
    return jax.tree_util.tree_map(jnp.asarray, params)


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
