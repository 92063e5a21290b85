"""A Flax NNX model as pure functions of its variables, for :meth:`TrainingMap.from_nnx`.

The model is split once into a graph and three kinds of variables:

* ``nnx.Param``: the trained parameters (dynamical coordinates of the map);
* ``nnx.RngState`` (the keys and counts of Dropout and other random streams): never carried.
  At step t every stream's key is derived from (the map's ``rng_seed``, t, the stream's
  position) and its count restarts at 0, so every replica of a batch draws the same masks at
  the same step and the map is deterministic;
* everything else (``nnx.BatchStat`` running statistics, any other variable the model mutates
  in train mode): the model *carry*, advanced exactly by the step and never differentiated,
  perturbed or part of a distance.

Three graphs are kept, one per mode: *train* (the step: batch statistics, dropout on), *eval*
(``model.eval()``: running statistics, dropout off; for loss, accuracy and evaluation) and
*curvature* (train mode with dropout off: the loss the step differentiates, as sharpness
needs). The forward pass merges the graph with the variables inside the traced function (no
``nnx.jit``, so nothing is mutated across trace levels).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from chaosjax._layout import is_float, path_name
from chaosjax._util import one_line

MODES = ("train", "eval", "curvature")


def _nnx():
    from flax import nnx

    return nnx


def _is_key(x) -> bool:
    dt = getattr(x, "dtype", None)
    return dt is not None and jax.dtypes.issubdtype(dt, jax.dtypes.prng_key)


def _check_leaves(state, what: str) -> None:
    """Refuse variables chaosjax cannot carry: anything but numeric arrays and keys."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if _is_key(leaf):
            continue
        if isinstance(leaf, jax.Array | np.ndarray | np.generic | bool | int | float):
            dt = jnp.asarray(leaf).dtype if not hasattr(leaf, "dtype") else leaf.dtype
            if jnp.issubdtype(dt, jnp.number) or jnp.issubdtype(dt, jnp.bool_):
                continue
        raise TypeError(
            f"model: variable {path_name(path)!r} ({what}) holds a {type(leaf).__name__}; "
            "chaosjax carries numeric array variables only (store it as a jnp array, or outside "
            "an nnx.Variable)"
        )


def _cast(state, dtype):
    """Float leaves to ``dtype`` (None: unchanged); Python scalars become arrays."""

    def one(v):
        if _is_key(v):
            return v
        v = jnp.asarray(v)
        return v.astype(dtype) if dtype is not None and is_float(v) else v

    return jax.tree_util.tree_map(one, state)


class NNXForward:
    """``forward(params, carry, inputs, *, train, key) -> (outputs, carry')`` of an NNX graph.

    ``train=True`` with a ``key``: the step (train mode, random streams keyed by ``key``);
    ``train=True`` without a key: train mode with dropout off (the curvature loss);
    ``train=False``: eval mode. Static (hashable): it travels inside jitted programs.
    """

    def __init__(self, graphs: dict[str, Any], rng_treedef, rng_kinds: tuple, method: str):
        self.graphs = graphs
        self.rng_treedef = rng_treedef
        self.rng_kinds = rng_kinds  # per RngState leaf: key impl name, or None for a count
        self.method = method

    def _key_tuple(self):
        return (tuple(sorted(self.graphs.items(), key=lambda kv: kv[0])), self.rng_treedef,
                self.rng_kinds, self.method)  # fmt: skip

    def __hash__(self):
        return hash(self._key_tuple())

    def __eq__(self, other):
        return isinstance(other, NNXForward) and other._key_tuple() == self._key_tuple()

    def rng_state(self, key):
        """Fresh random-stream variables for step key ``key`` (None: a fixed dummy key; the
        stream is not used in the modes without randomness)."""
        if key is None:
            key = jax.random.key(0)
        leaves = []
        for i, kind in enumerate(self.rng_kinds):
            if kind is None:
                leaves.append(jnp.zeros((), jnp.uint32))
            else:
                k = jax.random.fold_in(key, i)
                leaves.append(jax.random.wrap_key_data(jax.random.key_data(k), impl=kind))
        return jax.tree_util.tree_unflatten(self.rng_treedef, leaves)

    def __call__(self, params, carry, inputs, *, train: bool, key=None):
        nnx = _nnx()
        mode = "eval" if not train else ("train" if key is not None else "curvature")
        model = nnx.merge(self.graphs[mode], params, self.rng_state(key), carry, copy=True)
        out = getattr(model, self.method)(inputs)
        if mode != "train":
            return out, carry
        *_, new_carry = nnx.split(model, nnx.Param, nnx.RngState, ...)
        new_carry = jax.tree_util.tree_map(
            lambda n, o: n if _is_key(o) else jnp.asarray(n).astype(jnp.asarray(o).dtype),
            new_carry,
            carry,
        )
        return out, new_carry

    def features(self, params, carry, inputs):
        """The model's ``features(x)`` (hidden representations), curvature mode."""
        nnx = _nnx()
        model = nnx.merge(self.graphs["curvature"], params, self.rng_state(None), carry, copy=True)
        return model.features(inputs)


def _features(forward, carry, params, inputs):
    return forward.features(params, carry, inputs)


class TrainApply:
    """``apply_fn(params, x)`` of a forward pass: train mode with dropout off (the loss the
    step differentiates), with the model carry it was built with."""

    def __init__(self, forward: NNXForward, carry):
        self.forward, self.carry = forward, carry

    def __call__(self, params, x):
        return self.forward(params, self.carry, x, train=True, key=None)[0]


def split_model(model, rng_seed: int = 0, dtype=None, method: str = "__call__"):
    """``(forward, params, carry, features_fn)`` of an NNX model.

    The user's model is not modified: the three mode graphs come from a copy.

    Raises:
        TypeError naming the variable when the model holds a value chaosjax cannot carry.
    """
    nnx = _nnx()
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model: expected a flax.nnx.Module, got {type(model).__name__}")
    copy = nnx.merge(*nnx.split(model), copy=True)
    graphs = {}
    copy.eval()
    graphs["eval"] = nnx.split(copy)[0]
    copy.train()
    graphs["train"] = nnx.split(copy)[0]
    copy.set_attributes(deterministic=True, raise_if_not_found=False)
    graphs["curvature"] = nnx.split(copy)[0]
    copy.train()
    _, params, rngs, carry = nnx.split(copy, nnx.Param, nnx.RngState, ...)
    _check_leaves(params, "a parameter")
    _check_leaves(carry, "carried state")
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if not is_float(leaf):
            raise TypeError(
                f"model: parameter {path_name(path)!r} has dtype {jnp.asarray(leaf).dtype}; "
                "nnx.Param variables must be floats (keep integer state in another variable type)"
            )
    rng_leaves, rng_treedef = jax.tree_util.tree_flatten(rngs)
    kinds = tuple(
        str(jax.random.key_impl(v)) if _is_key(v) else None for v in rng_leaves
    )  # fmt: skip
    forward = NNXForward(graphs, rng_treedef, kinds, method)
    params = _cast(params, dtype)
    carry = _cast(carry, dtype)
    features_fn = None
    if hasattr(model, "features"):
        features_fn = functools.partial(_features, forward, carry)
    del rng_seed  # keys are derived per step by the map (TrainingMap.step_key)
    return forward, params, carry, features_fn


def check_carry(forward: NNXForward, params, carry, inputs) -> None:
    """Refuse, naming the variable, a model whose train-mode step changes the structure, shape
    or dtype of a carried variable (a growing cache, a Python list), or that cannot be traced
    as a pure function of its variables."""
    key = jax.random.key(0)
    try:
        _, new = jax.eval_shape(
            lambda p, c, x: forward(p, c, x, train=True, key=key), params, carry, inputs
        )
        jax.eval_shape(lambda p, c, x: forward(p, c, x, train=False), params, carry, inputs)
    except Exception as e:  # a Flax trace error, a failing layer: one line, the cause named
        kind = ValueError if isinstance(e, ValueError) else TypeError
        raise kind(
            f"model: its forward pass cannot run as a pure function of its variables "
            f"({one_line(e)})"
        ) from e
    old_l = jax.tree_util.tree_leaves_with_path(carry)
    new_l = jax.tree_util.tree_leaves_with_path(new)
    if jax.tree_util.tree_structure(carry) != jax.tree_util.tree_structure(new):
        names_old = {path_name(p) for p, _ in old_l}
        names_new = {path_name(p) for p, _ in new_l}
        diff = sorted(names_old ^ names_new) or sorted(names_new)
        raise TypeError(
            f"model: variable {diff[0]!r} changes structure in a training step; chaosjax carries "
            "variables of fixed shape and dtype only"
        )
    for (path, a), (_, b) in zip(old_l, new_l):
        if jnp.shape(a) != b.shape or jnp.result_type(a) != b.dtype:
            raise TypeError(
                f"model: variable {path_name(path)!r} changes from {jnp.shape(a)} "
                f"{jnp.result_type(a)} to {b.shape} {b.dtype} in a training step; chaosjax carries "
                "variables of fixed shape and dtype only"
            )


def init_params(factory: Callable, dtype, key):
    """The parameters of ``factory(nnx.Rngs(key))`` (an independent initialisation)."""
    nnx = _nnx()
    model = factory(nnx.Rngs(key))
    params = nnx.split(model, nnx.Param, ...)[1]
    return _cast(params, dtype)


def optimizer_state(optimizer) -> Any:
    """The optax state of an ``nnx.Optimizer`` (its moments and step count), unwrapped."""
    return unwrap_variables(optimizer.opt_state)


def unwrap_variables(tree) -> Any:
    """A pytree with NNX variables replaced by their values (an ``nnx.Optimizer``'s state wraps
    every leaf in an ``OptState`` variable)."""
    try:
        nnx = _nnx()
    except ImportError:  # pragma: no cover - flax is a dependency
        return tree
    if isinstance(tree, nnx.State):
        tree = tree.to_pure_dict()

    def is_var(x):
        return isinstance(x, nnx.Variable)

    def value(v):
        return v.get_value() if hasattr(v, "get_value") else v.value

    return jax.tree_util.tree_map(lambda v: value(v) if is_var(v) else v, tree, is_leaf=is_var)


class PureForward:
    """The forward pass of a pure ``apply_fn(params, x)`` (nothing carried, no randomness)."""

    def __init__(self, apply_fn):
        self.apply_fn = apply_fn

    def __call__(self, params, model_carry, inputs, *, train: bool, key=None):
        del train, key
        return self.apply_fn(params, inputs), model_carry

    def __hash__(self):
        return hash(self.apply_fn)

    def __eq__(self, other):
        return isinstance(other, PureForward) and other.apply_fn == self.apply_fn


def is_nnx_optimizer(obj) -> bool:
    """Whether ``obj`` is a Flax ``nnx.Optimizer`` (its ``tx`` and ``opt_state`` are adopted)."""
    return type(obj).__name__ == "Optimizer" and hasattr(obj, "tx") and hasattr(obj, "opt_state")


def training_map(cls, model, dataset, model_factory, optimizer, kwargs):
    """The body of :meth:`chaosjax.TrainingMap.from_nnx`: the model split once, its carried
    state checked on two examples, a user's ``nnx.Optimizer`` adopted, and ``cls`` built on
    the pure forward pass."""
    dtype = kwargs.get("dtype")
    forward, params, carry, features = split_model(model, dtype=dtype)
    probe = dataset.x_train[:2]
    if np.issubdtype(probe.dtype, np.floating):
        pdt = jax.tree_util.tree_leaves(params)[0].dtype if dtype is None else dtype
        probe = probe.astype(pdt)
    check_carry(forward, params, carry, jnp.asarray(probe))
    if is_nnx_optimizer(optimizer):
        kwargs.setdefault("opt_state", optimizer_state(optimizer))
    init_fn = None
    if model_factory is not None:
        init_fn = functools.partial(init_params, model_factory, dtype)
    kwargs.setdefault("init_fn", init_fn)
    kwargs.setdefault("features_fn", features)
    kwargs.setdefault("name", type(model).__name__)
    return cls(
        TrainApply(forward, carry),
        params,
        dataset,
        optimizer=optimizer,
        _forward=forward,
        _model_carry=carry,
        **kwargs,
    )


__all__ = [
    "MODES",
    "NNXForward",
    "TrainApply",
    "check_carry",
    "init_params",
    "is_nnx_optimizer",
    "optimizer_state",
    "split_model",
    "training_map",
    "unwrap_variables",
]
