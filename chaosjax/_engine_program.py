"""The compiled program of a run: the first record and a chunk of records (each a
``lax.scan`` over ``record_every`` steps of the vmapped flow), with the observers advancing
inside, on one device (``jax.jit``) or over a replica mesh (``shard_map``).

Pure functions of (map, per-row arguments, reference index, state, observer states, t, the
observers' rows) and a static :class:`_Spec`; :mod:`chaosjax.engine` calls them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from chaosjax._smalllinalg import pure_linalg
from chaosjax.observers import (
    RunInfo,
    StepContext,
    map_rows,
)
from chaosjax.sharding import (
    AXIS,
    donating_jit,
)

TRAINING_OBSERVABLES = (
    "loss",
    "accuracy",
    "test_loss",
    "test_accuracy",
    "param_norm",
    "layer_norm",
    "distance_l1",
    "distance_l2",
    "layer_distance",
    "layer_distance_l1",
)
GENERIC_OBSERVABLES = ("norm", "distance_l1", "distance_l2")
DISTANCES = ("distance_l1", "distance_l2", "layer_distance", "layer_distance_l1")
DISTANCE_AXIS = "distance_step"


# ---------------------------------------------------------------------------------------------
# the compiled program


class _Spec(NamedTuple):
    """Static description of a chunk (a jit static argument)."""

    names: tuple[str, ...]  # named observables at the record cadence
    custom: tuple[tuple[str, Callable], ...]
    n_records: int
    record_every: int
    loss_bound: float
    state_bound: float
    layers: tuple[tuple[int, int], ...]
    n_params: int
    trackers: tuple = ()
    info: RunInfo = RunInfo(0, 0, 1)
    has_loss: bool = False  # the flow's aux is a loss (divergence flags watch it)
    fine_distances: bool = False  # distances after every step (axis distance_step)
    owner: int = -1  # index of the tracker that takes the step itself (-1: none)
    strategy: str | int = "vmap"  # how the rows run: vmap, lax.map, or lax.map of vmap blocks


def _states(model, x, cr):
    """The rows as the map's states (:meth:`chaosjax.Map.pack`): a map that carries state
    (BatchNorm statistics, step counters) sees ``MapState(x, carry)``, every other map ``x``."""
    if model is not None and model.has_carry:
        return model.pack(x, cr)
    return x


def _observe(model, x, alive, ref, spec: _Spec, names, custom: bool = True, cr=(), t=None):
    """The named observables ``names`` (and the custom ones) of every row at record step t."""
    out = {}
    s = _states(model, x, cr)
    p = x[:, : spec.n_params]
    diff = p - p[ref]
    for name in names:
        if name == "loss":
            v = jax.vmap(lambda r: model.loss(r, "train", t))(s)
        elif name == "accuracy":
            v = jax.vmap(model.accuracy)(s)
        elif name == "test_loss":
            v = jax.vmap(lambda r: model.loss(r, "test"))(s)
        elif name == "test_accuracy":
            v = jax.vmap(lambda r: model.accuracy(r, "test"))(s)
        elif name in ("param_norm", "norm"):
            v = jnp.linalg.norm(p, axis=-1)
        elif name == "layer_norm":
            v = jnp.stack([jnp.linalg.norm(p[:, a:b], axis=-1) for a, b in spec.layers], -1)
        elif name == "distance_l1":
            v = jnp.sum(jnp.abs(diff), axis=-1)
        elif name == "distance_l2":
            v = jnp.linalg.norm(diff, axis=-1)
        elif name == "layer_distance":
            v = jnp.stack([jnp.linalg.norm(diff[:, a:b], axis=-1) for a, b in spec.layers], -1)
        elif name == "layer_distance_l1":
            v = jnp.stack([jnp.sum(jnp.abs(diff[:, a:b]), axis=-1) for a, b in spec.layers], -1)
        else:  # pragma: no cover - validated before
            raise ValueError(name)
        out[name] = v
    if custom:
        for name, fn in spec.custom:
            out[name] = jax.vmap(fn)(s)
    return _mask(out, alive, ref)


def _record_names(spec: _Spec) -> tuple[str, ...]:
    """Named observables computed at the records (distances move to their own cadence)."""
    if not spec.fine_distances:
        return spec.names
    return tuple(n for n in spec.names if n not in DISTANCES)


def _distances(x, alive, ref, spec: _Spec):
    """The distance observables after one step (fine cadence)."""
    names = tuple(n for n in spec.names if n in DISTANCES)
    return _observe(None, x, alive, ref, spec, names, custom=False)


def _mask(out, alive, ref=None):
    """NaN for replicas that diverged (and distances to a reference that diverged)."""
    dead_ref = ~alive[ref] if ref is not None else None
    res = {}
    for name, v in out.items():
        bad = ~alive
        if dead_ref is not None and name.startswith(("distance", "layer_distance")):
            bad = bad | dead_ref
        v = jnp.asarray(v)
        bad = bad.reshape(bad.shape + (1,) * (v.ndim - 1))
        res[name] = jnp.where(bad, jnp.nan, v.astype(jnp.result_type(float)))
    return res


def _take(tree, idx):
    """Rows ``idx`` of every leaf (out-of-range padding indices clip to a valid row)."""
    return jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0, mode="clip"), tree)


def _first(model, hp, ref, state, t, track, spec: _Spec):
    """The first record and the observers' cold starts."""
    x, cr, alive, _ = state
    out = _observe(model, x, alive, ref, spec, spec.names, cr=cr, t=t)
    s = _states(model, x, cr)
    tstates = []
    for tr, (idx, valid) in zip(spec.trackers, track):
        vals, ts = tr.init(model, _take(s, idx), _take(hp, idx), t)
        if tr.evaluates_all_rows:
            vals = {**vals, **tr.evaluate(model, s, idx, t)}
        out.update(_mask(dict(vals), _take(alive, idx) & valid))
        tstates.append(ts)
    return out, tuple(tstates)


def _update(tracker, model, x, hp, idx, ts, t):
    # x: the rows as the model's states (see _states)
    """A tracker's record-cadence update on its rows. A tracker that evaluates the recorded
    states (``evaluates_all_rows``, e.g. the loss the tangents saw) evaluates every row with
    the engine's own batched program and keeps its rows, so its numbers equal the records
    bit for bit (a batch of a different size compiles to different round-off)."""
    vals, ts = tracker.update(model, _take(x, idx), _take(hp, idx), ts, t)
    if tracker.evaluates_all_rows:
        vals = {**vals, **tracker.evaluate(model, x, idx, t)}
    return vals, ts


def _chunk(model, hp, ref, state, tstates, t0, track, spec: _Spec):
    flow = model.flow

    def step_b(x, cr, t, hp):
        return map_rows(lambda xi, ci, hi: flow(xi, ci, t, hi), x, cr, hp, strategy=spec.strategy)

    def inner(c, t):
        (x, cr, a, d), ts = c
        ts = list(ts)
        fine = {}
        if spec.owner >= 0:
            i = spec.owner
            ctx = StepContext(flow, x, cr, None, None, a, a, hp, t, spec.strategy)
            new_x, new_cr, loss, ts[i], vals = spec.trackers[i].step(spec.info, ctx, ts[i])
            fine.update(vals)
        else:
            new_x, new_cr, loss = step_b(x, cr, t, hp)
        ok = jnp.all(jnp.isfinite(new_x), axis=-1)
        if spec.has_loss:  # a plain step has no loss
            ok = ok & jnp.isfinite(loss) & (loss <= spec.loss_bound)
        if np.isfinite(spec.state_bound):
            ok = ok & (jnp.max(jnp.abs(new_x), axis=-1, initial=0.0) <= spec.state_bound)
        d = jnp.where(a & ~ok, t + 1, d)
        a2 = a & ok
        x2 = jnp.where(a2[:, None], new_x, x)
        cr2 = jax.tree_util.tree_map(
            lambda n, o: jnp.where(a2.reshape(a2.shape + (1,) * (n.ndim - 1)), n, o), new_cr, cr
        )
        for i, (tr, (idx, valid)) in enumerate(zip(spec.trackers, track)):
            if i == spec.owner or not tr.advances:
                continue
            rref = jnp.take(ref, idx, mode="clip")
            ctx = StepContext(
                flow,
                _take(x, idx),
                _take(cr, idx),
                _take(x2, idx),
                jnp.take(x2, rref, axis=0),
                _take(a2, idx) & valid,
                jnp.take(a2, rref),
                _take(hp, idx),
                t,
                spec.strategy,
            )
            ts[i], vals, rows = tr.advance(spec.info, ctx, ts[i])
            fine.update(vals)
            if rows is not None:  # padding indices are out of range: dropped
                x2 = x2.at[jnp.where(valid, idx, x2.shape[0])].set(rows, mode="drop")
        if spec.fine_distances:
            fine.update(_distances(x2, a2, ref, spec))
        return ((x2, cr2, a2, d), tuple(ts)), fine

    def outer(c, tr):
        c, fine = jax.lax.scan(inner, c, tr + jnp.arange(spec.record_every, dtype=tr.dtype))
        (x, cr, a, d), ts = c
        obs = _observe(model, x, a, ref, spec, _record_names(spec), cr=cr, t=tr + spec.record_every)
        s = _states(model, x, cr)
        ts = list(ts)
        for i, (tracker, (idx, valid)) in enumerate(zip(spec.trackers, track)):
            vals, ts[i] = _update(tracker, model, s, hp, idx, ts[i], tr + spec.record_every)
            obs.update(_mask(dict(vals), _take(a, idx) & valid))
        return ((x, cr, a, d), tuple(ts)), (obs, fine)

    times = t0 + spec.record_every * jnp.arange(spec.n_records, dtype=t0.dtype)
    return jax.lax.scan(outer, (state, tstates), times)


_chunk_jit = donating_jit(_chunk, ("spec",), (3, 4))  # states and observer states
_first_jit = jax.jit(_first, static_argnames=("spec",))


@functools.lru_cache(maxsize=64)
def _sharded_fns(mesh, spec: _Spec):
    """The first record and the chunk as ``shard_map`` programs over the replica mesh.

    Every device runs its own rows with no communication: each reference group lies whole on
    one device, so distances to the reference and the observers' rows are local. On the CPU
    backend the observers' small QR, eigen and SVD factorisations are traced without LAPACK
    custom calls (:mod:`chaosjax._smalllinalg`): batched LAPACK calls across CPU devices can
    deadlock XLA's runtime.
    """
    rows, rep = P(AXIS), P()
    cpu = jax.default_backend() == "cpu"
    first = jax.shard_map(
        functools.partial(_first, spec=spec),
        mesh=mesh,
        in_specs=(rep, rows, rows, rows, rep, rows),
        out_specs=(rows, rows),
        check_vma=False,
    )
    chunk = jax.shard_map(
        functools.partial(_chunk, spec=spec),
        mesh=mesh,
        in_specs=(rep, rows, rows, rows, rows, rep, rows),
        out_specs=((rows, rows), (P(None, AXIS), P(None, None, AXIS))),
        check_vma=False,
    )
    first = jax.jit(first)
    chunk = jax.jit(chunk, donate_argnums=() if cpu else (3, 4))
    if not cpu:
        return first, chunk

    def traced_pure(fn):  # trace (first call) without LAPACK custom calls on the CPU backend
        @functools.wraps(fn)
        def call(*args):
            with pure_linalg():
                return fn(*args)

        def lower(*args):
            with pure_linalg():
                return fn.lower(*args)

        call.lower = lower
        return call

    return traced_pure(first), traced_pure(chunk)
