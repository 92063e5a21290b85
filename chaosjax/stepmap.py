"""Your own ``train_step(state, batch)`` as a chaosjax map (:meth:`TrainingMap.from_step`).

The state is yours, as you have it (a flax ``TrainState``, ``(params, opt_state,
batch_stats)``, mid-training included). chaosjax splits it once:

* the *dynamical* coordinates ``x`` (dim,): the float leaves of ``params(state)`` first (in
  ``jax.tree_util`` order), then every other float leaf (optimizer moments, …);
* the *carry*: integer leaves (step counters), PRNG keys, and float leaves that ``carried``
  marks (by default anything under ``batch_stats`` and ``optax.inject_hyperparams``'
  ``hyperparams``), advanced exactly by your step, never perturbed, never tangent, never in a
  distance — plus the metrics of the last step, when your step returns them.

``batch_fn(t, data)`` chooses the data of step t (jittable in t); ``data`` travels as an
argument of the jitted programs, never closed over.

The state codec (which leaves are parameters, moments, carried or static) is
:mod:`chaosjax._state_codec`; what every training map shares is
:class:`chaosjax._training_core.TrainingCore`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from chaosjax import training as _training
from chaosjax._finite_sqrt import finite_sqrt_derivative
from chaosjax._layout import MapState, split_state
from chaosjax._state_codec import (
    _eval_shape_with_static,
    _params_default,
    _StateSplit,
    default_carried,
    on_array_leaves,
)
from chaosjax._training_core import TrainingCore, _nullcontext
from chaosjax._util import one_line
from chaosjax.optimizers import (
    OPTIMIZERS,
    held_learning_rate,
    with_defaults,
)


class StepMap(TrainingCore):
    """A user's ``train_step(state, batch) -> state`` (or ``-> (state, metrics)``) as a map.

    Build it with :meth:`TrainingMap.from_step`. The map's state is ``MapState(x, carry)``
    (see :mod:`chaosjax.stepmap`); :meth:`user_state` gives yours back, :meth:`state_of` makes
    one of yours a map state.

    Args:
        train_step: your step, jittable, ``train_step(state, batch)``.
        state: your state at the start (any pytree; mid-training included).
        batch_fn: ``batch_fn(t, data) -> batch``, deterministic and jittable in t.
        data: the arrays ``batch_fn`` draws from (a pytree; passed to the jitted programs as an
            argument).
        loss_fn: optional ``loss_fn(params, batch) -> scalar``: loss records, divergence flags
            (a replica whose loss is not finite or exceeds the bound) and curvature. Without
            it only a ``"loss"`` entry of the step's metrics is used for divergence flags, and
            ``loss`` records and curvature are not available (errors say so).
        params: ``params(state)`` picks the trained parameters (default ``state.params``); it
            must return a part of the state.
        init_fn: optional ``init_fn(key) -> state``: independent initialisations.
        eval_batch: the batch of the ``loss`` records and of ``"full"``-mode curvature, e.g.
            the whole training set. Default: none, and then the loss record and curvature at
            record step t are of the batch of step t, L(θ_t; B_t) = ``loss_fn(params,
            batch_fn(t, data))`` — the parameters after t steps on the batch the next step
            uses.
        test_batch: optional batch of ``loss(state, "test")``.
        carried: ``carried(name, leaf) -> bool`` marking float leaves that are carried rather
            than dynamical (default :func:`default_carried`). Integer leaves and keys are always
            carried.
        optimizer_kind: optional name from :data:`chaosjax.optimizers.OPTIMIZERS` of the
            optimizer your step applies, with ``hparams`` (e.g. ``{"momentum": 0.9}``) and
            ``learning_rate``: the stability threshold needs them. η_t is read from the state
            where it holds one (``optax.inject_hyperparams``); without either, thresholds and
            ηt units are NaN with the reason.
        dtype: cast the dynamical coordinates to this dtype (default: the parameters' dtype).
        matmul_precision: matmul precision inside the step (default ``"highest"``).
        name: the map's name.
    """

    def __init__(
        self,
        train_step: Callable,
        state: Any,
        *,
        batch_fn: Callable,
        data: Any = None,
        loss_fn: Callable | None = None,
        params: Callable | None = None,
        init_fn: Callable | None = None,
        eval_batch: Any = None,
        test_batch: Any = None,
        carried: Callable[[str, Any], bool] | None = None,
        optimizer_kind: str | None = None,
        learning_rate: float | None = None,
        hparams: Mapping[str, float] | None = None,
        dtype=None,
        matmul_precision: str | None = "highest",
        name: str | None = None,
    ):
        if not callable(train_step):
            raise TypeError("train_step: expected a callable train_step(state, batch)")
        if not callable(batch_fn):
            raise TypeError("batch_fn: expected a callable batch_fn(t, data) -> batch")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("loss_fn: expected a callable loss_fn(params, batch) -> scalar")
        if optimizer_kind is not None and optimizer_kind not in OPTIMIZERS:
            raise ValueError(
                f"optimizer_kind: unknown {optimizer_kind!r}; allowed: {', '.join(OPTIMIZERS)} "
                "or None"
            )
        params_fn = params if params is not None else _params_default
        state = jax.tree_util.tree_map(_as_leaf, state)
        data = jax.tree_util.tree_map(jnp.asarray, data)
        self._state_split = _StateSplit(state, params_fn, carried or default_carried, dtype)
        self._train_step = train_step
        self._batch_fn = batch_fn
        self._loss_fn = loss_fn
        self._params_fn = params_fn
        self.data = data
        t0 = jax.ShapeDtypeStruct((), jnp.int32)
        try:
            batch_struct = jax.eval_shape(batch_fn, t0, data)
        except Exception as e:
            raise ValueError(
                f"batch_fn: must be jittable in t (t is a traced int32 inside the run): "
                f"{one_line(e)}"
            ) from e
        self.eval_batch = (
            None if eval_batch is None else jax.tree_util.tree_map(jnp.asarray, eval_batch)
        )
        self.test_batch = (
            None if test_batch is None else jax.tree_util.tree_map(jnp.asarray, test_batch)
        )
        try:
            out = _eval_shape_with_static(train_step, state, batch_struct)
        except Exception as e:
            raise ValueError(
                f"train_step: could not be traced on the state and batch_fn(t, data): {one_line(e)}"
            ) from e
        s_struct = jax.tree_util.tree_structure(state)
        if jax.tree_util.tree_structure(out) == s_struct:
            self._returns_metrics = False
            metrics = None
        elif (
            isinstance(out, tuple)
            and len(out) == 2
            and jax.tree_util.tree_structure(out[0]) == s_struct
        ):
            self._returns_metrics = True
            metrics = out[1]
        else:
            raise ValueError(
                "train_step: must return a state of the same structure as its input, or "
                "(state, metrics)"
            )
        self._metric_names = ()
        if metrics is not None:
            if not isinstance(metrics, Mapping):
                metrics = {"metric": metrics}
            self._metric_names = tuple(sorted(metrics))
        self._metrics0 = (
            {
                k: jnp.full(v.shape, jnp.nan, v.dtype)
                if jnp.issubdtype(v.dtype, jnp.inexact)
                else jnp.zeros(v.shape, v.dtype)
                for k, v in metrics.items()
            }
            if metrics is not None
            else {}
        )
        sp = self._state_split
        x0, carried0 = sp.split(state)
        self._x0 = x0
        self._state_carry0 = carried0
        self.state_dtype = sp.dtype
        self.n_params = sp.n_params
        self.dim = sp.dim
        self.has_carry = bool(jax.tree_util.tree_leaves((carried0, self._metrics0)))
        self.hparams = {}
        self._optimizer_hparams = (
            dict(with_defaults(optimizer_kind, dict(hparams or {}))) if optimizer_kind else {}
        )
        self._optimizer_hparams.pop("learning_rate", None)
        self.optimizer_name = optimizer_kind or "custom"
        self._declared_lr = None if learning_rate is None else float(learning_rate)
        if held_learning_rate(state) is not None:
            self._lr_source = "state"
        elif self._declared_lr is not None:
            self._lr_source = "hparam"
        else:
            self._lr_source = "unknown"
        _training.warn_unknown_threshold(self)
        self.init_fn = init_fn
        self.features_fn = None
        self.matmul_precision = matmul_precision
        self.name = name or getattr(train_step, "__name__", "train_step")
        self.loss_name = getattr(loss_fn, "__name__", "loss_fn") if loss_fn else "none"
        self.task = None
        self.dataset_name = "batch_fn"
        self.n_classes = None
        self.batch_size = None
        self.batch_seed = 0
        self.rng_seed = 0
        if loss_fn is not None:  # loss_fn must run on the parameters and a batch
            try:
                _eval_shape_with_static(loss_fn, params_fn(state), batch_struct)
            except Exception as e:
                raise ValueError(
                    f"loss_fn: could not be traced as loss_fn(params, batch): {one_line(e)}"
                ) from e

    # -- pytree -----------------------------------------------------------------------------

    # the pytree children (arrays); every other attribute is static (FieldsPytree)
    _DYNAMIC = ("data", "eval_batch", "test_batch", "hparams", "_x0", "_state_carry0", "_metrics0")

    # -- states -----------------------------------------------------------------------------

    @property
    def has_loss(self) -> bool:
        return self._loss_fn is not None or "loss" in self._metric_names

    @property
    def capabilities(self) -> frozenset[str]:
        """A loss of the state with ``loss_fn`` (``test`` with a ``test_batch``), and the
        learning rate where the state or the declaration holds one; no accuracy (the step's
        metrics carry it)."""
        caps = {"parameters"}
        if self._loss_fn is not None:
            caps |= {"loss"} | ({"test"} if self.test_batch is not None else set())
        if self._lr_source in ("state", "hparam"):
            caps.add("learning_rate")
        return frozenset(caps)

    @property
    def carry0(self):
        return (self._state_carry0, self._metrics0)

    def init(self, params=None):
        """The map state of the state it was built with (``params`` replaces its parameters;
        everything else, optimizer state included, is kept)."""
        state = self.pack(self._x0)
        if params is None:
            return state
        p = jnp.concatenate(
            [jnp.ravel(v).astype(self.state_dtype) for v in jax.tree_util.tree_leaves(params)]
        )
        if p.shape != (self.n_params,):
            raise ValueError(f"params: {p.shape[0]} entries where the map has {self.n_params}")
        return self.with_params(state, p)

    def init_from_key(self, key):
        """The map state of ``init_fn(key)`` (an independent initialisation)."""
        if self.init_fn is None:
            raise ValueError(
                "init_fn: this step map has no initialiser; pass init_fn(key) -> state to "
                "from_step to build replicas from independent seeds"
            )
        if isinstance(key, int | np.integer):
            key = jax.random.PRNGKey(int(key))
        return self.state_of(self.init_fn(key))

    def state_of(self, user_state):
        """The map state of one of your states (same structure as the one the map was built
        with)."""
        x, carried = self._state_split.split(jax.tree_util.tree_map(_as_leaf, user_state))
        return self.pack(x, (carried, self._metrics0))

    def user_state(self, state) -> Any:
        """Your state of a map state."""
        x, carry = split_state(state)
        carried = self._state_carry0 if carry is None else carry[0]
        return self._state_split.merge(x, carried)

    def metrics(self, state) -> dict[str, jax.Array]:
        """The metrics your step returned on the last step taken to reach ``state`` (NaN before
        the first step)."""
        _, carry = split_state(state)
        return dict(self._metrics0 if carry is None else carry[1])

    def metric_observables(self) -> dict[str, Callable]:
        """``{"metric_<name>": fn(state)}`` for ``run_replicas(custom_observables=...)``: the
        step's metrics at each record."""
        return {f"metric_{k}": _Metric(k) for k in self._metric_names}

    def params(self, state) -> Any:
        x, _ = split_state(state)
        return self._state_split.unravel_params(x[: self.n_params])

    def unravel_params(self, p) -> Any:
        return self._state_split.unravel_params(p)

    def opt_state(self, state, t=None) -> Any:
        """Your whole state (the optimizer state is inside it)."""
        return self.user_state(state)

    @property
    def layers(self) -> dict[str, tuple[int, int]]:
        return self._state_split.param_groups()

    @property
    def weight_mask(self) -> np.ndarray:
        m = np.zeros(self.n_params, bool)
        for j, i in enumerate(self._state_split.p_idx):
            last = self._state_split.names[i].rsplit("/", 1)[-1]
            is_w = last in ("kernel", "w", "weight", "W", "embedding") or (
                len(self._state_split.shapes[i]) >= 2 and last != "bias"
            )
            m[
                self._state_split.offsets[j] : self._state_split.offsets[j]
                + self._state_split.sizes[j]
            ] = is_w
        return m

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(self._state_split.names[i] for i in self._state_split.p_idx)

    @property
    def param_shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(self._state_split.shapes[i] for i in self._state_split.p_idx)

    # -- the map ----------------------------------------------------------------------------

    def batch(self, t) -> Any:
        """The batch of step t: ``batch_fn(t, data)``."""
        return self._batch_fn(t, self.data)

    def flow(self, x, carry, t, hparams):
        """``(x, carry, t, hparams) -> (x', carry', loss)``: one call of your step."""
        del hparams
        ctx = (
            jax.default_matmul_precision(self.matmul_precision)
            if self.matmul_precision
            else _nullcontext()
        )
        carried, _ = carry if self.has_carry else (self._state_carry0, self._metrics0)
        with ctx:
            state = self._state_split.merge(x, carried)
            batch = self._batch_fn(t, self.data)
            out = self._step_with_finite_sqrt(state, batch)
            new_state, metrics = out if self._returns_metrics else (out, None)
            if metrics is not None and not isinstance(metrics, Mapping):
                metrics = {"metric": metrics}
            if metrics is not None and "loss" in metrics:
                loss = jnp.asarray(metrics["loss"])
            elif self._loss_fn is not None:
                loss = self._loss_fn(self._params_fn(state), batch)
            else:
                loss = jnp.full((), jnp.nan, x.dtype)
            new_x, new_carried = self._state_split.split(new_state)
        if self.has_carry:
            m = {k: jnp.asarray(metrics[k]).astype(v.dtype) for k, v in self._metrics0.items()}
            new_carry = (tuple(new_carried), m)
        else:
            new_carry = carry
        return new_x.astype(x.dtype), new_carry, jnp.asarray(loss, x.dtype)

    def _step_with_finite_sqrt(self, state, batch):
        """``train_step(state, batch)`` with √ of the optimizer's moments differentiable at 0:
        the rewrite follows the state's array leaves that are not parameters, so a ``sqrt`` of
        the user's loss (a function of the parameters and the batch) keeps its derivative."""
        g, arrays, dyn, rebuild = on_array_leaves(self._train_step, state)
        params = set(self._state_split.p_idx)
        select = [i not in params for i in dyn]
        return rebuild(finite_sqrt_derivative(g, lambda a, b: (select, False))(arrays, batch))

    # -- losses -----------------------------------------------------------------------------

    def _need_loss(self, what: str):
        if self._loss_fn is None:
            raise ValueError(
                f"loss_fn: {what} needs loss_fn(params, batch); pass it to from_step (this map "
                "only has the metrics its step returns)"
            )

    def batch_loss(self, params, batch, state=None) -> jax.Array:
        self._need_loss("the loss of a parameter vector (curvature)")
        return self._loss_fn(params, batch)

    @property
    def constant_loss(self) -> float:
        """NaN: a step map has no labels of its own (no dead-plateau level)."""
        return float("nan")

    @property
    def loss_data(self) -> str:
        """What the loss records and full-mode curvature are of, in words."""
        if self.eval_batch is not None:
            return "eval_batch (the batch given to from_step)"
        return "the batch of each record step t, batch_fn(t, data): L(θ_t; B_t)"

    def record_batch(self, t=None):
        """The batch of the loss record and full-mode curvature at step t: ``eval_batch`` when
        given, else ``batch_fn(t, data)``."""
        if self.eval_batch is not None:
            return self.eval_batch
        if t is None:
            raise ValueError(
                "t: this map's loss is of the batch of step t (no eval_batch was given to "
                "from_step); pass t, or give eval_batch= (e.g. the whole training set)"
            )
        return self.batch(jnp.asarray(t, jnp.int32))

    def loss_of_params(self, params, x=None, y=None, t=None) -> jax.Array:
        if x is not None or y is not None:
            raise ValueError("loss_of_params: a step map's loss takes a batch: use batch_loss")
        return self.batch_loss(params, self.record_batch(t))

    def curvature_batch(self, t=0, mode: str = "full", subset: int | None = None):
        if mode == "full":
            return self.record_batch(t), {"mode": mode, "data": self.loss_data}
        if mode == "batch":
            return self.batch(t), {"mode": mode, "t": t}
        raise ValueError(
            f"mode: {mode!r} is not available for a step map; allowed: full (eval_batch), batch"
        )

    def loss(self, state, split: str = "train", t=None) -> jax.Array:
        """``loss_fn`` of the state's parameters on :meth:`record_batch` at step ``t``
        (``"train"``: ``eval_batch``, else the batch of step t) or on ``test_batch``
        (``"test"``; NaN without one)."""
        self._need_loss("the loss record")
        if split not in ("train", "test"):
            raise ValueError(f"split: must be 'train' or 'test', got {split!r}")
        if split == "test" and self.test_batch is None:
            return jnp.full((), jnp.nan, self.state_dtype)
        batch = self.record_batch(t) if split == "train" else self.test_batch
        return self._loss_fn(self.params(state), batch)

    def accuracy(self, state, split: str = "train"):
        raise ValueError(
            "accuracy: a step map has no labels of its own; return the accuracy in your step's "
            "metrics and record metric_observables()"
        )

    def evaluate(self, state, split: str = "test") -> dict[str, jax.Array]:
        return {"loss": self.loss(state, split)}

    def batch_indices(self, t):
        """Refused: a step map's batches are ``batch_fn(t, data)`` (:meth:`batch`), not indices
        into a training set of its own."""
        raise ValueError(
            "batch_indices: a step map has no training set of its own; its batch of step t is "
            "tmap.batch(t) (batch_fn(t, data))"
        )

    # -- learning rate ----------------------------------------------------------------------

    @property
    def learning_rate(self) -> float | None:
        return self._declared_lr

    @property
    def optimizer_hparams(self) -> dict[str, Any]:
        return dict(self._optimizer_hparams)

    def learning_rate_at(self, state, t, hparams=None) -> jax.Array:
        """η held by the state (``optax.inject_hyperparams``), else the declared
        ``learning_rate``, else NaN."""
        if self._lr_source == "state":
            return jnp.asarray(held_learning_rate(self.user_state(state)), self.state_dtype)
        if self._lr_source == "hparam":
            return jnp.asarray(self._declared_lr, self.state_dtype)
        return jnp.full((), jnp.nan, self.state_dtype)

    def replace(self, **hparams):
        raise ValueError(
            "hparams: a step map has no hyper-parameters of its own; build one per setting"
        )

    def __repr__(self) -> str:
        return (
            f"StepMap({self.name}, n_params={self.n_params}, dim={self.dim}, "
            f"carried leaves={len(self._state_carry0)}, metrics={list(self._metric_names)}, "
            f"loss={'yes' if self._loss_fn else 'no'}, dtype={self.state_dtype}"
            + (f"; loss records of {self.loss_data})" if self._loss_fn else ")")
        )


class _Metric:
    """``fn(state) -> the named metric of the last step`` (hashable)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, state):
        return split_state(state)[1][1][self.name]

    def __hash__(self):
        return hash(("metric", self.name))

    def __eq__(self, other):
        return isinstance(other, _Metric) and other.name == self.name


def _as_leaf(v):
    if isinstance(v, jax.Array) or v is None:
        return v
    if isinstance(v, np.ndarray | np.generic | int | float | bool):
        return jnp.asarray(v)
    return v


jax.tree_util.register_pytree_node_class(StepMap)
_training._STEP_MAP["class"] = StepMap  # TrainingMap.from_step builds one

__all__ = ["MapState", "StepMap", "default_carried"]
