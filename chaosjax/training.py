"""The training map: one optimizer step as a deterministic map on a flat float state.

``TrainingMap`` turns (model, loss, dataset, optax optimizer, batch schedule) into
``step(state, t) -> state`` on one flat vector ``state = [parameters, float optimizer
moments]``. Integer optimizer counters are *not* in the state (``ravel_pytree`` would turn
them into floats and into spurious tangent directions): they are derived from ``t``. The
batch used at step ``t`` depends only on ``t`` (``fold_in(key, t)``), so replicas that start
from different states see the same data.

Hyper-parameters (learning rate, momentum, Adam's betas, …) are arrays passed to the step,
so a grid of learning rates runs as one vmapped batch (``step_with``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from chaosjax._layout import layout_of
from chaosjax._util import x64_enabled
from chaosjax.datasets import Dataset

# ---------------------------------------------------------------------------------------------
# optimizers and schedules


def _sgd(learning_rate):
    return optax.sgd(learning_rate)


def _momentum(learning_rate, momentum):
    return optax.sgd(learning_rate, momentum=momentum)


def _nesterov(learning_rate, momentum):
    return optax.sgd(learning_rate, momentum=momentum, nesterov=True)


def _adam(learning_rate, b1, b2, eps, eps_root):
    return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root)


def _adamw(learning_rate, b1, b2, eps, eps_root, weight_decay):
    return optax.adamw(
        learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=weight_decay
    )


def _rmsprop(learning_rate, decay, eps):
    return optax.rmsprop(learning_rate, decay=decay, eps=eps)


#: named optimizers: factory and default hyper-parameters (the learning rate is required).
OPTIMIZERS: dict[str, tuple[Callable, dict[str, float]]] = {
    "sgd": (_sgd, {}),
    "momentum": (_momentum, {"momentum": 0.9}),
    "nesterov": (_nesterov, {"momentum": 0.9}),
    # eps_root > 0 keeps Adam's map differentiable where a gradient entry is exactly zero
    # (√ν has no derivative at ν = 0: ReLU networks otherwise give NaN tangents); 1e-20 changes
    # the update by far less than eps. Set eps_root=0 for optax's exact default.
    "adam": (_adam, {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "eps_root": 1e-20}),
    "adamw": (
        _adamw,
        {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "eps_root": 1e-20, "weight_decay": 1e-4},
    ),
    "rmsprop": (_rmsprop, {"decay": 0.9, "eps": 1e-8}),
}

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
# losses

LOSSES = ("mse", "cross_entropy")


def mse_loss(outputs, targets):
    """½‖f − y‖² summed over outputs, averaged over examples."""
    return 0.5 * jnp.mean(jnp.sum((outputs - targets) ** 2, axis=-1))


def cross_entropy_loss(logits, targets):
    """Softmax cross-entropy, mean over examples; integer labels or probability rows."""
    if jnp.issubdtype(targets.dtype, jnp.integer):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def _loss_fn(loss) -> Callable:
    if callable(loss):
        return loss
    if loss == "mse":
        return mse_loss
    if loss == "cross_entropy":
        return cross_entropy_loss
    raise ValueError(f"loss: unknown {loss!r}; allowed: {', '.join(LOSSES)} or a callable")


# ---------------------------------------------------------------------------------------------
# the map


class TrainingMap:
    """One optimizer step as a map ``step(state, t) -> state`` on a flat float vector.

    Build it from a pure ``apply_fn(params, x)`` and its parameter pytree (this constructor),
    or from a Flax NNX model with :meth:`from_nnx`.

    Args:
        apply_fn: ``apply_fn(params, x) -> outputs`` of shape (batch, outputs).
        params: initial parameter pytree (float leaves).
        dataset: a :class:`chaosjax.datasets.Dataset`. For ``loss="mse"`` on a classification
            set the targets become one-hot rows.
        loss: ``"mse"`` (½‖f − y‖² mean), ``"cross_entropy"`` (softmax), or a callable
            ``loss(outputs, targets) -> scalar``.
        optimizer: a name from :data:`OPTIMIZERS`, a factory ``make(**hparams)`` returning an
            optax ``GradientTransformation``, or a ready ``GradientTransformation`` (then no
            hyper-parameter is vmappable). Every update receives optax's extra arguments
            ``value``, ``grad`` and ``value_fn`` (the batch loss of the parameter pytree), so
            the controllers of :mod:`chaosjax.control` work here, e.g.
            ``optimizer=functools.partial(control.sharpness_margin, every=10)`` with
            ``hparams={"margin": 1.0}``.
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

    The state has shape (dim,) = (n_params + n_moments,); ``n_params`` leading entries are the
    parameters in ``jax.tree_util`` order.
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
        if dtype is not None:
            params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)
        else:
            params = jax.tree_util.tree_map(jnp.asarray, params)
        self._apply_fn = apply_fn
        self._loss = _loss_fn(loss)
        self.loss_name = loss if isinstance(loss, str) else getattr(loss, "__name__", "custom")
        self.task = dataset.task
        if self.task == "classification" and self.loss_name == "mse":
            dataset = dataset.one_hot()
        pdtype = jax.tree_util.tree_leaves(params)[0].dtype
        self.state_dtype = jnp.dtype(pdtype).name
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
        # the learning-rate schedule of a named optimizer (η_t for thresholds and ηt units)
        self._schedule = (
            (schedule, _frozen(schedule_options or {})) if isinstance(optimizer, str) else None
        )
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
        self.init_fn = init_fn
        self.features_fn = features_fn
        self.matmul_precision = matmul_precision
        self.name = name or "training_map"

        # layout of parameters and optimizer state (one flat layout: chaosjax._layout)
        self._params_layout = layout_of(params, what="params")
        if self._params_layout.n_carried:
            bad = next(s for s in self._params_layout.leaves if not s.dynamic)
            raise TypeError(
                f"params: leaf {bad.name!r} has dtype {bad.dtype}; parameters must be floats"
            )
        n_params = self._params_layout.dim
        opt = self._factory(**self.hparams)
        opt_state = opt.init(params)
        self._opt_layout = layout_of(opt_state, what="optimizer state")
        self.counters0 = tuple(
            jnp.asarray(v)
            for v, spec in zip(jax.tree_util.tree_leaves(opt_state), self._opt_layout.leaves)
            if not spec.dynamic
        )
        self.n_params = n_params
        self.dim = n_params + self._opt_layout.dim
        self._check_counters(opt, params, opt_state)
        self._params0 = params
        if self._schedule is not None:
            self._lr_source = "schedule"
        elif _held_learning_rate(opt_state) is not None:
            self._lr_source = "state"
        else:
            self._lr_source = "hparam" if "learning_rate" in self.hparams else "unknown"

    # -- construction helpers --------------------------------------------------------------

    @staticmethod
    def _resolve_optimizer(optimizer, learning_rate, hparams, schedule, schedule_options):
        hparams = dict(hparams or {})
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
            base, defaults = OPTIMIZERS[optimizer]
            unknown = set(hparams) - set(defaults)
            if unknown:
                raise ValueError(
                    f"hparams: {sorted(unknown)} not used by {optimizer!r}; allowed: {sorted(defaults) or 'none'}"
                )
            if learning_rate is None:
                raise ValueError(f"learning_rate: required for optimizer {optimizer!r}")
            if schedule not in SCHEDULES:
                raise ValueError(f"schedule: unknown {schedule!r}; allowed: {', '.join(SCHEDULES)}")
            make_schedule(schedule, 1.0, **schedule_options)  # validate options early
            hp = {**defaults, **hparams, "learning_rate": float(learning_rate)}

            def factory(learning_rate, **kw):
                return base(make_schedule(schedule, learning_rate, **schedule_options), **kw)

            return factory, hp, optimizer
        if callable(optimizer):
            if learning_rate is not None:
                hparams["learning_rate"] = learning_rate
            name = getattr(optimizer, "__name__", None) or getattr(
                getattr(optimizer, "func", None), "__name__", "custom"
            )
            return optimizer, hparams, name
        raise TypeError(
            f"optimizer: expected a name ({', '.join(OPTIMIZERS)}), a factory or an optax "
            f"GradientTransformation, got {type(optimizer).__name__}"
        )

    def _check_counters(self, opt, params, opt_state):
        """Every integer optimizer leaf must be a counter (+1 per step) so it can come from t."""
        if not self.counters0:
            return
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        x, y = self.data["x_train"], self.data["y_train"]
        _, new_state = optax.with_extra_args_support(opt).update(
            zeros, opt_state, params, **self._extra_args(params, x, y, zeros)
        )
        new_ints = self._opt_layout.split(new_state)[1]
        for old, new in zip(self.counters0, new_ints):
            if not bool(jnp.all(new == old + 1)):
                raise ValueError(
                    "optimizer: its state holds an integer that is not a step counter; chaosjax "
                    "derives integer state from t and cannot represent this optimizer as a map"
                )

    @classmethod
    def from_nnx(cls, model, dataset: Dataset, *, model_factory: Callable | None = None, **kwargs):
        """Build from a Flax NNX model (split once; merged inside the step, no ``nnx.jit``).

        Args:
            model: an ``nnx.Module``; its ``nnx.Param`` variables are the trained parameters,
                any other state (e.g. batch statistics) is held fixed.
            dataset: the dataset.
            model_factory: optional ``model_factory(rngs) -> Module`` used by
                :meth:`init_from_key` for independent initialisations.
            **kwargs: as for :class:`TrainingMap`.
        """
        from flax import nnx

        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        apply_fn = _NNXApply(graphdef, rest)
        init_fn = None
        if model_factory is not None:

            def init_fn(key):
                return nnx.split(model_factory(nnx.Rngs(key)), nnx.Param, ...)[1]

        features_fn = None
        if hasattr(model, "features"):
            features_fn = _NNXApply(graphdef, rest, method="features")
        kwargs.setdefault("init_fn", init_fn)
        kwargs.setdefault("features_fn", features_fn)
        kwargs.setdefault("name", type(model).__name__)
        return cls(apply_fn, params, dataset, **kwargs)

    @classmethod
    def from_apply(cls, apply_fn, params, dataset, **kwargs):
        """Build from a pure ``apply_fn(params, x)`` (same as the constructor)."""
        return cls(apply_fn, params, dataset, **kwargs)

    def replace(self, **hparams) -> TrainingMap:
        """A copy with hyper-parameters replaced, e.g. ``tmap.replace(learning_rate=0.5)``."""
        unknown = set(hparams) - set(self.hparams)
        if unknown:
            raise ValueError(f"hparams: unknown {sorted(unknown)}; allowed: {sorted(self.hparams)}")
        leaves, treedef = jax.tree_util.tree_flatten(self)
        new = jax.tree_util.tree_unflatten(treedef, leaves)
        dt = jax.tree_util.tree_leaves(self._params0)[0].dtype
        new.hparams = {**self.hparams, **{k: jnp.asarray(v, dt) for k, v in hparams.items()}}
        return new

    # -- pytree -----------------------------------------------------------------------------

    _STATIC = (
        "_schedule",
        "_lr_source",
        "_apply_fn",
        "_loss",
        "loss_name",
        "task",
        "state_dtype",
        "dataset_name",
        "n_classes",
        "_factory",
        "optimizer_name",
        "batch_size",
        "batch_seed",
        "init_fn",
        "features_fn",
        "matmul_precision",
        "name",
        "_params_layout",
        "_opt_layout",
        "n_params",
        "dim",
    )
    _DYNAMIC = ("data", "hparams", "counters0", "_params0")

    def tree_flatten(self):
        return tuple(getattr(self, k) for k in self._DYNAMIC), tuple(
            getattr(self, k) for k in self._STATIC
        )

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        for k, v in zip(cls._STATIC, aux):
            setattr(obj, k, v)
        for k, v in zip(cls._DYNAMIC, children):
            setattr(obj, k, v)
        return obj

    # -- state <-> pytrees ------------------------------------------------------------------

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
        nan = jnp.full((), jnp.nan, self.state_dtype)
        if src == "schedule":
            kind, opts = self._schedule
            sched = make_schedule(kind, hp["learning_rate"], **_thawed(opts))
            return jnp.asarray(sched(t) if callable(sched) else sched, self.state_dtype)
        if src == "state":
            return jnp.asarray(_held_learning_rate(self.opt_state(state, t)), self.state_dtype)
        if src == "hparam":
            return jnp.asarray(hp["learning_rate"], self.state_dtype)
        return nan

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

    @property
    def apply_fn(self) -> Callable:
        """The network: ``apply_fn(params, x) -> outputs`` on a parameter pytree."""
        return self._apply_fn

    def init(self, params=None) -> jax.Array:
        """The flat state (dim,) for ``params`` (default: the construction parameters) and a
        freshly initialised optimizer state."""
        if params is None:
            params = self._params0
        params = jax.tree_util.tree_map(
            lambda a, ref: jnp.asarray(a, ref.dtype), params, self._params0
        )
        if jax.tree_util.tree_structure(params) != self._params_layout.treedef:
            raise ValueError("params: structure differs from the training map's parameters")
        opt_state = self._factory(**self.hparams).init(params)
        return self._flat(params, opt_state)

    def init_from_key(self, key) -> jax.Array:
        """The flat state for an independent initialisation drawn with ``key`` (or an int seed)."""
        if self.init_fn is None:
            raise ValueError(
                "init_fn: this training map has no initialiser; pass init_fn (or model_factory) "
                "to build replicas from independent seeds"
            )
        if isinstance(key, int | np.integer):
            key = jax.random.PRNGKey(int(key))
        return self.init(self.init_fn(key))

    def _flat(self, params, opt_state) -> jax.Array:
        p = self._params_layout.ravel(params).astype(self.state_dtype)
        o = self._opt_layout.split(opt_state)[0].astype(self.state_dtype)
        return jnp.concatenate([p, o])

    def params(self, state) -> Any:
        """Parameter pytree of a state (dim,)."""
        return self._params_layout.unravel(state[: self.n_params])

    def flat_params(self, state) -> jax.Array:
        """The parameter part of the state, shape (n_params,)."""
        return state[..., : self.n_params]

    def opt_state(self, state, t) -> Any:
        """The full optax state at step ``t`` (float moments from the state, counters from t)."""
        t = jnp.asarray(t)
        counters = tuple((c + t).astype(c.dtype) for c in self.counters0)
        return self._opt_layout.merge(state[self.n_params :], counters)

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

    # -- the map ----------------------------------------------------------------------------

    def _batch(self, t):
        x, y = self.data["x_train"], self.data["y_train"]
        if self.batch_size is None:
            return x, y
        key = jax.random.fold_in(jax.random.PRNGKey(self.batch_seed), t)
        idx = jax.random.choice(key, x.shape[0], (self.batch_size,), replace=False)
        return x[idx], y[idx]

    def batch_indices(self, t) -> jax.Array:
        """Indices of the training examples used at step ``t`` (all of them for full batch)."""
        n = self.data["x_train"].shape[0]
        if self.batch_size is None:
            return jnp.arange(n)
        key = jax.random.fold_in(jax.random.PRNGKey(self.batch_seed), t)
        return jax.random.choice(key, n, (self.batch_size,), replace=False)

    def loss_of_params(self, params, x=None, y=None) -> jax.Array:
        """Loss of a parameter pytree on (x, y) (default: the full training set)."""
        if x is None:
            x, y = self.data["x_train"], self.data["y_train"]
        return self._loss(self._apply_fn(params, x), y)

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

    def step_and_loss(self, state, t, hparams=None):
        """One step: ``(new_state, loss)`` where loss is the batch loss *before* the step."""
        hparams = self.hparams if hparams is None else hparams
        ctx = (
            jax.default_matmul_precision(self.matmul_precision)
            if self.matmul_precision
            else _nullcontext()
        )
        with ctx:
            params = self.params(state)
            opt_state = self.opt_state(state, t)
            x, y = self._batch(t)
            loss, grads = jax.value_and_grad(self.loss_of_params)(params, x, y)
            opt = optax.with_extra_args_support(self._factory(**hparams))
            updates, new_opt = opt.update(
                grads, opt_state, params, **self._extra_args(params, x, y, grads, loss)
            )
            new_params = optax.apply_updates(params, updates)
            return self._flat(new_params, new_opt).astype(state.dtype), loss

    def flow(self, x, carry, t, hparams):
        """The engine's form of one step: ``(x, carry, t, hparams) -> (x', carry', loss)``,
        ``x`` the dynamical coordinates (dim,), ``carry`` the carried leaves (none here)."""
        new, loss = self.step_and_loss(x, t, hparams)
        return new, carry, loss

    def step_with(self, state, t, hparams) -> jax.Array:
        """One step with explicit hyper-parameters (a dict of arrays; vmappable)."""
        return self.step_and_loss(state, t, hparams)[0]

    def step(self, state, t) -> jax.Array:
        """One optimizer step ``state_t -> state_{t+1}`` on batch ``t``; state shape (dim,)."""
        return self.step_and_loss(state, t)[0]

    # -- evaluation -------------------------------------------------------------------------

    def _split(self, split):
        if split not in ("train", "test"):
            raise ValueError(f"split: must be 'train' or 'test', got {split!r}")
        return self.data[f"x_{split}"], self.data[f"y_{split}"]

    def output(self, state, x) -> jax.Array:
        """Network outputs for inputs x (batch, features) → (batch, outputs)."""
        return self._apply_fn(self.params(state), x)

    def loss(self, state, split: str = "train") -> jax.Array:
        """Full-batch loss of the state on ``split`` ('train' or 'test')."""
        x, y = self._split(split)
        return self.loss_of_params(self.params(state), x, y)

    def accuracy(self, state, split: str = "train") -> jax.Array:
        """Classification accuracy on ``split`` (argmax of the outputs)."""
        if self.task != "classification":
            raise ValueError(f"accuracy: dataset {self.dataset_name!r} is a regression task")
        x, y = self._split(split)
        pred = jnp.argmax(self._apply_fn(self.params(state), x), axis=-1)
        labels = jnp.argmax(y, -1) if y.ndim == 2 else y
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
        return (
            f"TrainingMap({self.name}, data={self.dataset_name}, loss={self.loss_name}, "
            f"optimizer={self.optimizer_name}({hp}), batch={self.batch_size or 'full'}, "
            f"n_params={self.n_params}, dim={self.dim}, dtype={self.state_dtype})"
        )


jax.tree_util.register_pytree_node_class(TrainingMap)


def _frozen(options: Mapping[str, Any]) -> tuple:
    """Schedule options as a hashable tuple (static pytree data)."""
    return tuple(
        sorted((k, tuple(v) if isinstance(v, list | tuple) else v) for k, v in options.items())
    )


def _thawed(options: tuple) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options}


def _held_learning_rate(opt_state):
    """The learning rate an optimizer state holds (``inject_hyperparams``' hyperparams or a
    chaosjax controller's η), or None."""

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


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class _NNXApply:
    """``apply(params, x)`` for an NNX graph: merge inside the traced function."""

    def __init__(self, graphdef, rest, method: str = "__call__"):
        self.graphdef, self.rest, self.method = graphdef, rest, method

    def __call__(self, params, x):
        from flax import nnx

        model = nnx.merge(self.graphdef, params, self.rest)
        return getattr(model, self.method)(x)


__all__ = [
    "LOSSES",
    "OPTIMIZERS",
    "SCHEDULES",
    "TrainingMap",
    "cross_entropy_loss",
    "make_schedule",
    "mse_loss",
]
