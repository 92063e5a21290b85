"""Device memory one replica of a run needs, by part (the state, one step's intermediates,
each observer's state and update), from abstract traces: nothing is compiled."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from chaosjax._engine_rows import tracked_rows
from chaosjax._map import as_map
from chaosjax.observers import (
    RunInfo,
)
from chaosjax.sharding import (
    MemoryEstimate,
    estimate_bytes,
)

_MEMORY: dict = {}  # estimates by shapes: tracing a step costs tens of ms per call


def _shapes(tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(jnp.shape(v)), str(jnp.result_type(v))) for v in leaves)


def replica_memory(model, replicas, trackers: Sequence = (), *, info=None) -> MemoryEstimate:
    """Device memory one replica of a run needs, by part (see :func:`_replica_memory`);
    estimates are reused for the same shapes, model structure and observers."""
    try:
        key = (
            _shapes(as_map(model, replicas)),
            _shapes((replicas.states[:1], replicas.carry, replicas.hparams)),
            replicas.layout,
            tuple(trackers),
            info,
            tuple(_tracked_share(trackers, replicas.reference)),
        )
        hash(key)
    except TypeError:  # an unhashable piece (a custom observer): estimate afresh
        return _replica_memory(model, replicas, trackers, info=info)
    if key not in _MEMORY:
        _MEMORY[key] = _replica_memory(model, replicas, trackers, info=info)
    return _MEMORY[key]


def _tracked_share(trackers, reference) -> list[float]:
    """The share of rows each observer tracks."""
    out = []
    for tr in trackers:
        rows = tracked_rows(tr.rows, reference)
        out.append(1.0 if rows is None else len(rows) / len(reference))
    return out


def _replica_memory(model, replicas, trackers: Sequence = (), *, info=None) -> MemoryEstimate:
    """Device memory one replica of a run needs, by part.

    ``state``: the state and its copies inside a step (carry, update, frozen select);
    ``step``: every intermediate of one step (activations, gradients, optimizer update) from
    the step's jaxpr; one entry per observer: its carried state (Krylov warm starts, tangent
    bases) and the intermediates of one update, weighted by the share of rows it tracks.
    Arrays shared by all replicas (the dataset) are not counted.
    """
    model = as_map(model, replicas)
    dim = int(replicas.states.shape[1])
    dtype = replicas.states.dtype
    parts = {"state": 4 * dim * np.dtype(dtype).itemsize}
    t = jnp.zeros((), jnp.int32)
    flow = model.flow
    x1 = jax.ShapeDtypeStruct((dim,), dtype)
    c1 = _row_struct(replicas.carry)
    a1 = _row_struct(replicas.hparams)
    parts["step"] = estimate_bytes(lambda x, c, a: flow(x, c, t, a), x1, c1, a1)
    info = info or RunInfo(0, 1, 1)
    for tr, share in zip(trackers, _tracked_share(trackers, replicas.reference)):
        b = tr.memory(info, flow, x1, c1, a1)
        if isinstance(b, Mapping):  # named parts
            for name, v in b.items():
                parts[name] = parts.get(name, 0) + int(np.ceil(v * share))
            continue
        if b is None:  # the observer's own update on one row, estimated
            lead = functools.partial(
                jax.tree_util.tree_map, lambda c: jax.ShapeDtypeStruct((1, *c.shape), c.dtype)
            )
            xb = jax.ShapeDtypeStruct((1, dim), dtype)
            xb = model.pack(xb, lead(c1)) if model.has_carry else xb
            hb = lead(a1)
            _, ts = jax.eval_shape(lambda x, hp, tr=tr: tr.init(model, x, hp, t), xb, hb)
            b = estimate_bytes(lambda x, hp, st, tr=tr: tr.update(model, x, hp, st, t), xb, hb, ts)
        parts[type(tr).__name__] = int(np.ceil(b * share))
    return MemoryEstimate(parts)


def _row_struct(tree):
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)), tree
    )
