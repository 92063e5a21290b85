"""The state codec of a user's own training state (:class:`chaosjax.StepMap`): which leaves of
any pytree state are parameters (``params(state)``), which are the other dynamical floats
(optimizer moments), which are carried exactly (integer counters, PRNG keys, running
statistics, ``inject_hyperparams``' hyper-parameters) and which are static structure (an
Equinox module's functions); and the split of a state into ``(x, carried)`` and back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from chaosjax._layout import is_float, path_name
from chaosjax.optimizers import (
    carried_leaf,
)


def default_carried(name: str, leaf) -> bool:
    """Float leaves carried rather than dynamical by default: BatchNorm running statistics
    (``batch_stats``) and ``optax.inject_hyperparams``' hyper-parameters."""
    parts = name.split("/")
    return "batch_stats" in parts or carried_leaf(name, leaf)


def _params_default(state):
    """``state.params`` (a TrainState) or ``state["params"]`` (a dict)."""
    if hasattr(state, "params"):
        return state.params
    if isinstance(state, Mapping) and "params" in state:
        return state["params"]
    raise ValueError(
        f"params: the state ({type(state).__name__}) has no .params or ['params']; pass "
        "params=lambda state: ... that picks the parameters"
    )


def _locate_params(state, params_fn) -> tuple[list[int], Any]:
    """Indices (in the state's leaf order) of the leaves ``params_fn`` picks, in the
    parameters' own leaf order, and the parameters' treedef."""
    leaves, treedef = jax.tree_util.tree_flatten(state)
    n = len(leaves)
    picked = None
    try:  # the state with each leaf replaced by its index: params_fn picks indices
        marked = params_fn(jax.tree_util.tree_unflatten(treedef, list(range(n))))
        idx = jax.tree_util.tree_leaves(marked)
        if (
            idx
            and all(isinstance(i, int) and 0 <= i < n for i in idx)
            and len(set(idx)) == len(idx)
        ):
            picked = (list(idx), jax.tree_util.tree_structure(marked))
    except Exception:  # params_fn does more than pick: try identity below
        picked = None
    real = params_fn(state)
    real_leaves, ptreedef = jax.tree_util.tree_flatten(real)
    if picked is not None and picked[1] == ptreedef:
        if all(np.shape(leaves[i]) == np.shape(v) for i, v in zip(picked[0], real_leaves)):
            return picked[0], ptreedef
    ids = {id(v): i for i, v in enumerate(leaves)}
    idx = [ids.get(id(v), -1) for v in real_leaves]
    if real_leaves and -1 not in idx and len(set(idx)) == len(idx):
        return idx, ptreedef
    raise ValueError(
        "params: params(state) must return a part of the state (e.g. lambda s: s.params or "
        "lambda s: s[0]), not new arrays"
    )


def _is_array_leaf(v) -> bool:
    """An array-like leaf (it travels through jit); anything else — the activation function of
    an Equinox module, a string — is static structure of the state (``eqx.partition`` style)."""
    return isinstance(v, jax.Array | np.ndarray | np.generic | int | float | complex | bool)


def _static_key(v):
    try:
        hash(v)
    except TypeError:
        return id(v)
    return v


def on_array_leaves(fn, state):
    """``fn(state, *args)`` as a function of the state's array leaves alone, for a state whose
    other leaves (functions in an Equinox module) are static structure.

    Returns ``(g, arrays, dyn, rebuild)``: ``g(arrays, *args)`` calls ``fn`` on the state with
    its array leaves replaced and returns the output's array leaves (so it can be traced,
    transformed or shape-evaluated); ``arrays`` are the state's array leaves, ``dyn`` their
    indices among its leaves; ``rebuild(out_arrays)`` puts the output's static leaves back
    (call it after ``g`` has run or been traced)."""
    leaves, treedef = jax.tree_util.tree_flatten(state)
    dyn = [i for i, v in enumerate(leaves) if _is_array_leaf(v)]
    out_def = {}

    def g(arrays, *args):
        full = list(leaves)
        for i, v in zip(dyn, arrays):
            full[i] = v
        out = fn(jax.tree_util.tree_unflatten(treedef, full), *args)
        out_leaves, out_def["treedef"] = jax.tree_util.tree_flatten(out)
        out_def["static"] = {i: v for i, v in enumerate(out_leaves) if not _is_array_leaf(v)}
        return [v for v in out_leaves if _is_array_leaf(v)]

    def rebuild(out_arrays):
        it, static = iter(out_arrays), out_def["static"]
        n = out_def["treedef"].num_leaves
        return jax.tree_util.tree_unflatten(
            out_def["treedef"], [static[i] if i in static else next(it) for i in range(n)]
        )

    return g, [leaves[i] for i in dyn], dyn, rebuild


def _eval_shape_with_static(fn, state, *args):
    """``jax.eval_shape(fn, state, *args)`` for a state whose non-array leaves (functions in an
    Equinox module) are static: they are closed over, and come back as they were."""
    g, arrays, _, rebuild = on_array_leaves(fn, state)
    return rebuild(jax.eval_shape(g, arrays, *args))


class _StateSplit:
    """How a user's state maps to ``(x, carried leaves)``: parameters first (static, hashable).

    Array leaves are dynamical (float, not carried) or carried (integers, keys, running
    statistics); any other leaf (a function or string inside an Equinox module) is static: kept
    here and put back unchanged, never traced."""

    def __init__(self, state, params_fn, carried, dtype):
        flat, treedef = jax.tree_util.tree_flatten_with_path(state)
        names = [path_name(p) for p, _ in flat]
        leaves = [v for _, v in flat]
        self.static = {i: v for i, v in enumerate(leaves) if not _is_array_leaf(v)}
        p_all, ptreedef = _locate_params(state, params_fn)
        p_idx = [i for i in p_all if i not in self.static]
        for i in p_idx:
            if not is_float(leaves[i]):
                raise TypeError(
                    f"params: leaf {names[i]!r} picked by params(state) has dtype "
                    f"{jnp.result_type(leaves[i])}; parameters must be floats"
                )
        if not p_idx:
            raise ValueError("params: params(state) picks no floating-point leaves")
        p_set = set(p_idx)
        others = [
            i
            for i in range(len(leaves))
            if i not in p_set
            and i not in self.static
            and is_float(leaves[i])
            and not carried(names[i], leaves[i])
        ]
        order = list(p_idx) + others
        self.treedef = treedef
        self.ptreedef = ptreedef
        self.names = tuple(names)
        self.shapes = tuple(
            () if i in self.static else tuple(jnp.shape(v)) for i, v in enumerate(leaves)
        )
        self.dtypes = tuple(
            "static" if i in self.static else str(jnp.result_type(v)) for i, v in enumerate(leaves)
        )
        self.order = tuple(order)  # dynamical leaves, in x order
        self.p_idx = tuple(p_idx)
        self.p_all = tuple(p_all)  # every leaf of params(state), static ones included
        dyn = set(order)
        self.carried_idx = tuple(
            i for i in range(len(leaves)) if i not in dyn and i not in self.static
        )
        sizes = [int(np.prod(self.shapes[i], dtype=np.int64)) for i in order]
        self.offsets = tuple(int(o) for o in np.concatenate([[0], np.cumsum(sizes)])[:-1])
        self.sizes = tuple(sizes)
        self.n_params = int(sum(sizes[: len(p_idx)]))
        self.dim = int(sum(sizes))
        if dtype is None:
            dtype = jnp.result_type(*[leaves[i] for i in p_idx])
        self.dtype = jnp.dtype(dtype).name

    def _key(self):
        static = tuple((i, _static_key(v)) for i, v in self.static.items())
        return (self.treedef, self.ptreedef, self.names, self.shapes, self.dtypes, self.order,
                self.p_idx, self.dtype, static)  # fmt: skip

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, _StateSplit) and other._key() == self._key()

    def split(self, state) -> tuple[jax.Array, tuple]:
        # leaves, not flatten_up_to: a TrainState's static fields (tx, apply_fn) are new objects
        # for every state built, yet describe the same step
        leaves = jax.tree_util.tree_leaves(state)
        if len(leaves) != len(self.shapes) or any(
            i not in self.static and jnp.shape(v) != s
            for i, (v, s) in enumerate(zip(leaves, self.shapes))
        ):
            raise ValueError(
                "state: its leaves differ in number or shape from the state the map was built with"
            )
        x = jnp.concatenate([jnp.ravel(leaves[i]).astype(self.dtype) for i in self.order])
        return x, tuple(leaves[i] for i in self.carried_idx)

    def merge(self, x, carried) -> Any:
        leaves: list[Any] = [None] * len(self.shapes)
        for i, off, size in zip(self.order, self.offsets, self.sizes):
            leaves[i] = x[off : off + size].reshape(self.shapes[i]).astype(self.dtypes[i])
        for i, c in zip(self.carried_idx, carried):
            leaves[i] = c
        for i, v in self.static.items():
            leaves[i] = v
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def unravel_params(self, p) -> Any:
        slot = {i: j for j, i in enumerate(self.p_idx)}
        out = []
        for i in self.p_all:
            if i in self.static:
                out.append(self.static[i])
                continue
            off, size = self.offsets[slot[i]], self.sizes[slot[i]]
            out.append(p[off : off + size].reshape(self.shapes[i]).astype(self.dtypes[i]))
        return jax.tree_util.tree_unflatten(self.ptreedef, out)

    def param_groups(self) -> dict[str, tuple[int, int]]:
        out: dict[str, list[int]] = {}
        for j, i in enumerate(self.p_idx):
            name = self.names[i]
            group = name.rsplit("/", 1)[0] if "/" in name else name
            lo, hi = out.get(group, [self.offsets[j], self.offsets[j] + self.sizes[j]])
            out[group] = [min(lo, self.offsets[j]), max(hi, self.offsets[j] + self.sizes[j])]
        return {k: (v[0], v[1]) for k, v in out.items()}


__all__ = ["default_carried"]
