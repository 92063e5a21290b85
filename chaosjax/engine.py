"""The one engine: a batch of replicas advanced by one chunked driver, watched by observers.

Every analysis of a trajectory runs here. A chunk is one jitted ``lax.scan`` over records
(each a ``lax.scan`` over ``record_every`` steps) of the vmapped step; observers
(:mod:`chaosjax.observers`, the curvature and response trackers) advance inside the same
chunk, on the very states the run records: tangents and replica distances after every step,
expensive trackers (Lanczos) at every record. Between chunks the host loop gathers the records
(float64), updates the progress bar, appends to a zarr stream and writes a checkpoint, so an
interrupted run resumes to the same arrays. A replica whose state or loss stops being finite
(or whose loss exceeds ``loss_bound``) is flagged with its step and frozen; its later records
are NaN and the rest of the batch goes on. The replica axis can be sharded over devices
(each reference group whole on one device, no collective in a chunk) and a batch that does
not fit runs in passes of whole reference groups.

:func:`run_replicas` (exported as :func:`chaosjax.run_replicas`) is the one driver;
:func:`chaosjax.lyapunov_spectrum`, :func:`chaosjax.twin_lyapunov` and
:func:`chaosjax.covariant_lyapunov_vectors` are thin calls of it.

Length: this is the one driver of every analysis; the chunk program, the float64 host
accumulation, checkpoints and resume, passes and sharding share one run's state and
fingerprint. The checkpoint format and the memory plan are the next pieces to move out.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from chaosjax._map import Map, PlainMap, require
from chaosjax._observer import check_observer
from chaosjax._smalllinalg import pure_linalg
from chaosjax._util import atomic_write_bytes, dumps, environment_info, warn_at_caller
from chaosjax.observers import (
    ROWS,
    Record,
    RunInfo,
    StepContext,
    check_strategy,
    map_rows,
    records_of,
)
from chaosjax.results import ReplicaResults, ZarrStream
from chaosjax.sharding import (
    AXIS,
    MemoryEstimate,
    donating_jit,
    estimate_bytes,
    from_local_rows,
    gather,
    is_main_process,
    is_sharded,
    local_rows,
    mesh_size,
    pass_path,
    plan_batches,
    process_path,
    put_rows,
    replica_mesh,
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


# ---------------------------------------------------------------------------------------------
# where rows live


def groups_of(reference: np.ndarray) -> list[list[int]]:
    """Rows of each reference group, groups in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(np.asarray(reference)):
        groups.setdefault(int(r), []).append(i)
    return list(groups.values())


def assign(sizes: Sequence[int], n_dev: int) -> tuple[list[int], list[int]]:
    """Each group (of these sizes, in order) to the least-loaded device: (device per group,
    rows per device)."""
    load = [0] * n_dev
    device = []
    for n in sizes:
        d = load.index(min(load))
        device.append(d)
        load[d] += n
    return device, load


def device_layout(reference: np.ndarray, n_dev: int):
    """Rows per device, each reference group whole on one device (balanced by row count).

    Returns ``(perm, local_ref, pos)``: ``perm`` (n_dev·B,) the original row at each layout
    position (padding repeats a row of the same device and is its own reference),
    ``local_ref`` the reference's index inside the device block, ``pos`` (R,) the layout
    position of each original row.
    """
    reference = np.asarray(reference)
    groups = groups_of(reference)
    blocks: list[list[int]] = [[] for _ in range(n_dev)]
    for rows, d in zip(groups, assign([len(g) for g in groups], n_dev)[0]):
        blocks[d].extend(rows)
    B = max(len(b) for b in blocks)
    perm, local_ref, pos = [], [], np.empty(len(reference), np.int64)
    for d, block in enumerate(blocks):
        where = {r: i for i, r in enumerate(block)}
        for i, r in enumerate(block):
            pos[r] = d * B + i
            perm.append(r)
            local_ref.append(where[int(reference[r])])
        for i in range(len(block), B):  # padding: a copy of a row of this block (or row 0)
            perm.append(block[0] if block else 0)
            local_ref.append(i)
    return np.asarray(perm, np.int64), np.asarray(local_ref, np.int32), pos


def tracked_rows(rows: str, reference: np.ndarray) -> np.ndarray | None:
    """Original indices of the rows an observer tracks (None: every row)."""
    reference = np.asarray(reference)
    own = reference == np.arange(reference.size)
    if rows == "all" or (rows == "references" and own.all()):
        return None
    if rows == "references":
        return np.flatnonzero(own)
    if rows == "perturbed":
        return np.flatnonzero(~own)
    raise ValueError(f"rows: unknown {rows!r}; allowed: {', '.join(ROWS)}")


class _RowLayout:
    """The device layout of a batch and of each observer's tracked rows inside it."""

    def __init__(self, reference: np.ndarray, n_dev: int, row_sets: list[np.ndarray | None]):
        self.R = len(reference)
        self.n_dev = n_dev
        self.perm, self.local_ref, self.pos = device_layout(reference, n_dev)
        self.B = len(self.perm) // n_dev
        self.Rp = len(self.perm)
        real = np.zeros(self.Rp, bool)
        real[self.pos] = True
        self.identity = self.Rp == self.R and np.array_equal(self.pos, np.arange(self.R))
        self.tracks = []  # per observer: (idx, valid, original rows, their positions)
        for rows in row_sets:
            if rows is None:
                idx = np.tile(np.arange(self.B), n_dev)
                self.tracks.append((idx, real.copy(), np.arange(self.R), self.pos))
                continue
            per_dev = [[] for _ in range(n_dev)]
            for r in rows:
                p = int(self.pos[r])
                per_dev[p // self.B].append((p % self.B, int(r)))
            T = max(1, max(len(v) for v in per_dev))
            idx = np.full(n_dev * T, self.B, np.int64)
            valid = np.zeros(n_dev * T, bool)
            orig, where = [], []
            for d, items in enumerate(per_dev):
                for j, (local, r) in enumerate(items):
                    idx[d * T + j] = local
                    valid[d * T + j] = True
                    orig.append(r)
                    where.append(d * T + j)
            order = np.argsort(orig)
            self.tracks.append(
                (idx, valid, np.asarray(orig, np.int64)[order], np.asarray(where)[order])
            )

    def to_rows(self, arr: np.ndarray, which: int | None) -> np.ndarray:
        """Rows of a gathered array (padded layout on axis 0) → (R, ...) in the original order
        (NaN for rows an observer does not track)."""
        if which is None:
            return arr if self.identity else arr[self.pos]
        _, _, orig, where = self.tracks[which]
        out = np.full((self.R, *arr.shape[1:]), np.nan, np.result_type(arr.dtype, np.float64))
        out[orig] = arr[where]
        return out


# ---------------------------------------------------------------------------------------------
# checkpoints


class Checkpoint:
    """Atomic ``.npz`` checkpoint of a run (no pickle): the carry, the observers' states and
    every record so far."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.exists()

    def save(self, fingerprint: str, t: int, arrays: dict[str, np.ndarray]) -> None:
        buf = io.BytesIO()
        np.savez(buf, __fingerprint__=np.asarray(fingerprint), __t__=np.asarray(t), **arrays)
        atomic_write_bytes(self.path, buf.getvalue())

    def load(self, fingerprint: str) -> tuple[int, dict[str, np.ndarray]]:
        with np.load(self.path, allow_pickle=False) as z:
            fp = str(z["__fingerprint__"])
            if fp != fingerprint:
                raise ValueError(
                    f"resume: checkpoint {self.path} was written for a different run "
                    "(configuration, replicas or sizes differ); start afresh instead"
                )
            return int(z["__t__"]), {k: z[k] for k in z.files if not k.startswith("__")}


# ---------------------------------------------------------------------------------------------
# memory


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


# ---------------------------------------------------------------------------------------------
# the driver


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


#: the capability of the map each named observable needs
_OBSERVABLE_NEEDS = {
    "loss": "loss",
    "test_loss": "loss",
    "accuracy": "accuracy",
    "test_accuracy": "accuracy",
}
_LOSS_HINT = (
    "; from_step: pass loss_fn(params, batch), or record the step's metrics "
    "(custom_observables=tmap.metric_observables())"
)


def _check_observables(model: Map, observables) -> tuple[str, ...]:
    """The named observables of a run on ``model`` (its defaults when None), or one line
    naming the one the map cannot give."""
    caps = model.capabilities
    params = "parameters" in caps
    if observables is None:
        observables = (
            (("loss",) if "loss" in caps else ())
            + ("param_norm", "distance_l1", "distance_l2")
            + (("accuracy",) if "accuracy" in caps else ())
            if params
            else ("norm", "distance_l2")
        )
    observables = tuple(observables)
    allowed = TRAINING_OBSERVABLES if params else GENERIC_OBSERVABLES
    for name in observables:
        if name not in allowed:
            raise ValueError(f"observables: unknown {name!r}; allowed: {', '.join(allowed)}")
        need = _OBSERVABLE_NEEDS.get(name)
        if need is not None:
            require(model, need, f"observables: {name!r}", _LOSS_HINT if need == "loss" else "")
    return observables


def coords_of(batch) -> dict[str, np.ndarray]:
    """The stored coordinates of a batch: its labels, the reference index and every
    hyper-parameter per replica."""
    coords = dict(batch.coords)
    coords["reference"] = np.asarray(batch.reference)
    if isinstance(batch.hparams, Mapping):
        for k, v in batch.hparams.items():
            if np.ndim(v) == 1:
                coords.setdefault(k, np.asarray(v))
    return coords


def _chunk_plan(t: int, end: int, chunk_steps: int, stops: Sequence[int]) -> int:
    """Steps of the next chunk: at most chunk_steps, ending at the next snapshot step."""
    n = min(chunk_steps, end - t)
    for s in stops:
        if t < s < t + n:
            n = s - t
    return n


def run_replicas(
    model,
    replicas,
    *,
    steps: int,
    record_every: int = 1,
    observables: Sequence[str] | None = None,
    custom_observables: Mapping[str, Callable] | None = None,
    trackers: Sequence = (),
    distance_every: int | None = None,
    chunk_steps: int | None = None,
    loss_bound: float = 1e8,
    state_bound: float = np.inf,
    t0: int = 0,
    progress: bool = True,
    desc: str = "replicas",
    checkpoint: str | os.PathLike | None = None,
    store: str | os.PathLike | None = None,
    resume: bool = False,
    attrs: Mapping[str, Any] | None = None,
    on_chunk: Callable[[int], None] | None = None,
    devices=None,
    memory_limit=None,
    strategy: str | int | None = None,
) -> ReplicaResults:
    """Run a replica batch for ``steps`` steps, record observables and advance observers.

    This is chaosjax's one engine: every analysis of a trajectory (Lyapunov spectra, FTLEs,
    CLVs, twin estimates, curvature, training response, replica distances) is an observer
    advanced inside the same jitted chunk as the states it observes, so every number of a run
    is measured on the trajectory that was recorded.

    Args:
        model: a :class:`TrainingMap` or a plain ``step(x, t)`` callable (``step(x, t, args)``
            when the batch carries per-replica arguments in ``hparams``).
        replicas: from :func:`make_replicas`.
        steps: number of steps (a multiple of ``record_every``).
        record_every: record cadence; records are at t0, t0 + r, …, t0 + steps.
        observables: names to record. Training maps: ``loss``, ``accuracy``, ``test_loss``,
            ``test_accuracy``, ``param_norm``, ``layer_norm`` (per layer), ``distance_l1``,
            ``distance_l2`` (parameters, to
            the reference replica), ``layer_distance`` / ``layer_distance_l1`` (per layer).
            Plain maps: ``norm``, ``distance_l1``, ``distance_l2``.
        custom_observables: {name: fn(state) -> scalar or vector}, vmapped over replicas.
        trackers: observers: :class:`chaosjax.LyapunovTracker` (tangents and FTLEs along the
            recorded trajectory), :class:`chaosjax.CurvatureTracker`,
            :class:`chaosjax.ResponseTracker`, or any object following the protocol of
            :mod:`chaosjax.observers`. Their state (tangent bases, warm starts) is carried
            between steps and records and checkpointed.
        distance_every: cadence of the distance observables, a divisor of ``record_every``
            (default: ``record_every``). Finer distances get their own time axis
            ``distance_step`` (see :meth:`ReplicaResults.steps_of`): a fit of the replica
            separation needs its points, while expensive trackers keep ``record_every``.
        chunk_steps: steps per jitted chunk (default about 500, a multiple of record_every).
        loss_bound: a replica whose batch loss exceeds this (or is not finite) diverges.
        state_bound: a replica whose largest |state entry| exceeds this diverges.
        t0: time of the initial states (batches and optimizer counters follow t).
        progress: show a tqdm progress bar.
        checkpoint: path of a ``.npz`` checkpoint written after every chunk.
        store: path of a zarr store the records are appended to chunk by chunk.
        resume: continue from ``checkpoint`` if it exists.
        attrs: extra metadata stored with the results.
        on_chunk: called with the current time after every chunk (tests use it to interrupt).
        devices: devices sharing the replica axis (:func:`chaosjax.sharding.replica_mesh`):
            ``None`` = every accelerator (of every process after
            :func:`chaosjax.sharding.initialize_distributed`; one device on the CPU
            backend), an int = that many local
            devices, or a list of devices / a mesh. States, observer states and
            hyper-parameters stay on the devices between chunks; only the records come back.
        desc: the progress bar's label.
        memory_limit: bytes (or ``"8GiB"``) a device may use; default 80 % of the device's
            (or the host's share of) memory. A batch that does not fit runs in passes of
            whole reference groups; a run in which one replica does not fit is refused.
        strategy: how a device runs its replicas' steps (and the observers' per-row steps):
            ``"vmap"`` (one batched program), ``"map"`` (``lax.map``, a loop inside the
            program) or an int B (``lax.map`` over vmapped blocks of B). Default: the rule of
            :func:`default_strategy` (from the model and the backend, never from timing, so a
            rerun or a resume compiles the same program). Recorded in ``attrs`` and in the
            checkpoint's fingerprint. Results agree to round-off; only speed and memory differ.

    Returns:
        :class:`ReplicaResults` with records (R, steps // record_every + 1, ...) on the
        record axis, and the observers' own axes (``results.steps_of(name)``).
    """
    steps, record_every = int(steps), int(record_every)
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    if record_every < 1 or steps % record_every:
        raise ValueError(f"record_every: must be >= 1 and divide steps={steps}, got {record_every}")
    model = as_map(model, replicas)
    observables = _check_observables(model, observables)
    custom = tuple(sorted((custom_observables or {}).items()))
    for name, fn in custom:
        if name in observables or not callable(fn):
            raise ValueError(f"custom_observables: {name!r} must be a new name with a callable")
    if distance_every is None:
        distance_every = record_every
    distance_every = int(distance_every)
    if distance_every < 1 or record_every % distance_every:
        raise ValueError(
            f"distance_every: must be a positive divisor of record_every={record_every}, "
            f"got {distance_every}"
        )
    fine_distances = distance_every < record_every and any(n in DISTANCES for n in observables)
    strategy = default_strategy(model) if strategy is None else check_strategy(strategy)
    info = RunInfo(int(t0), steps, record_every)
    trackers = tuple(trackers)
    dim = int(replicas.states.shape[1])
    taken = set(observables) | {c[0] for c in custom}
    rec_specs: dict[str, tuple[int, Record]] = {}
    for i, tr in enumerate(trackers):
        check_observer(tr)
        for need in tr.requires:
            require(model, need, f"trackers: {type(tr).__name__}")
        tr.validate(model, dim=dim, info=info)
        recs = records_of(tr, model)
        clash = taken & set(recs)
        if clash:
            raise ValueError(f"trackers: record names {sorted(clash)} are used twice")
        taken |= set(recs)
        for name, r in recs.items():
            rec_specs[name] = (i, r)

    trackers, tangent_reason = _void_nonsmooth(trackers, model.flow, replicas, t0)
    layers = tuple(model.layers.values())
    layer_names = tuple(model.layers)
    n_params = model.n_params_of(dim)
    R = len(replicas)
    if chunk_steps is None:
        chunk_steps = max(record_every, (500 // record_every) * record_every)
    chunk_steps = int(chunk_steps)
    if chunk_steps < 1 or chunk_steps % record_every:
        raise ValueError(f"chunk_steps: must be a positive multiple of record_every={record_every}")
    chunk_steps = min(chunk_steps, steps)
    mesh = replica_mesh(devices)
    sharded = is_sharded(mesh)
    n_dev = mesh_size(mesh) if sharded else 1
    estimate = replica_memory(model, replicas, trackers, info=info)
    plan = plan_batches(R, estimate, mesh, memory_limit=memory_limit)
    meta = {
        "environment": environment_info(),
        "dtype": str(replicas.states.dtype),
        "devices": int(mesh.devices.size),
        "processes": jax.process_count(),
        "memory_plan": plan.describe(),
        "replica_strategy": str(strategy),
        **({"tangent_reason": tangent_reason} if tangent_reason else {}),
        **dict(attrs or {}),
    }
    coords = coords_of(replicas)
    main = is_main_process()
    owner = _owner(trackers, replicas.reference)
    stops = sorted({int(s) for tr in trackers for s in tr.snapshot_steps(info)})
    axes_all: dict[str, np.ndarray] = {}
    for tr in trackers:
        axes_all.update({k: np.asarray(v) for k, v in tr.axes(info).items()})
    if fine_distances:
        axes_all[DISTANCE_AXIS] = np.arange(t0, t0 + steps + 1, distance_every, dtype=np.int64)
    dims: dict[str, tuple[str, ...]] = {
        name: (r.axis, *r.dims) for name, (_, r) in rec_specs.items() if r.axis != "step" or r.dims
    }
    if fine_distances:
        for name in observables:
            if name in DISTANCES:
                dims[name] = (DISTANCE_AXIS, *(("layer",) if "layer" in name else ()))
    transient = tuple(name for name, (_, r) in rec_specs.items() if not r.stored)

    def spec_for(n):
        return _Spec(
            observables,
            custom,
            n // record_every,
            record_every,
            float(loss_bound),
            float(state_bound),
            layers,
            n_params,
            trackers,
            info,
            model.has_loss,
            fine_distances,
            owner,
            strategy,
        )

    def result_from(rec_steps, records, axes_steps, states, div_step, carry, batch_coords):
        return ReplicaResults(
            steps=np.concatenate(rec_steps),
            records={k: np.concatenate(v, axis=1) for k, v in records.items()},
            final_state=np.asarray(states),
            diverged_step=np.asarray(div_step),
            coords=batch_coords,
            layer_names=layer_names,
            attrs=meta,
            dims=dims,
            axes={k: np.concatenate(v) for k, v in axes_steps.items()},
            final_carry=tuple(np.asarray(c) for c in carry),
            transient=transient,
        )

    def call(which: int, spec: _Spec, args):  # 0: first record, 1: a chunk
        if sharded:
            return _sharded_fns(mesh, spec)[which](*args)
        return (_first_jit, _chunk_jit)[which](*args, spec=spec)

    def one_pass(batch, checkpoint, stream, bar) -> ReplicaResults:
        R = len(batch)
        row_sets = [
            None if i == owner else tracked_rows(tr.rows, batch.reference)
            for i, tr in enumerate(trackers)
        ]
        lay = _RowLayout(batch.reference, n_dev, row_sets)
        owner_of = {name: i for name, (i, _) in rec_specs.items()}
        which_of = {  # the row space of every record: None = every row
            name: (None if row_sets[i] is None else i) for name, i in owner_of.items()
        }

        def place(x):  # host rows (R, ...) → device rows (Rp, ...) in the device layout
            x = np.asarray(x)[lay.perm]
            return put_rows(x, mesh) if sharded else jnp.asarray(x)

        def place_track(i):
            idx, valid, _, _ = lay.tracks[i]
            if sharded:
                return put_rows(idx, mesh), put_rows(valid, mesh)
            return jnp.asarray(idx), jnp.asarray(valid)

        def host(x):  # device rows → host rows (R, ...), original order, on every process
            return gather(x)[lay.pos]

        ref = put_rows(lay.local_ref, mesh) if sharded else jnp.asarray(lay.local_ref)
        hp = jax.tree_util.tree_map(place, batch.hparams)
        track = tuple(place_track(i) for i in range(len(trackers)))
        fingerprint = dumps(
            {
                "steps": steps,
                "record_every": record_every,
                "distance_every": distance_every,
                "chunk_steps": chunk_steps,
                "strategy": str(strategy),
                "t0": int(t0),
                "observables": observables,
                "custom": [c[0] for c in custom],
                "trackers": [repr(tr) for tr in trackers],
                "R": R,
                "padded": lay.Rp,
                "processes": jax.process_count(),
                "shape": list(batch.states.shape),
                "coords": {k: np.asarray(v).tolist() for k, v in batch.coords.items()},
                "state_sum": float(np.asarray(batch.states, np.float64).sum()),
            }
        )
        ckpt = Checkpoint(process_path(checkpoint)) if checkpoint else None
        batch_coords = coords_of(batch)

        def pack(name, tree):  # all rows (one process) or this process's rows, per leaf
            out = {}
            for j, x in enumerate(jax.tree_util.tree_leaves(tree)):
                if jax.process_count() == 1:
                    out[f"{name}__{j}"] = gather(x)
                else:
                    rows, data = local_rows(x)
                    out[f"{name}__{j}"], out[f"{name}__{j}__rows"] = data, rows
            return out

        def unpack(arrays, name, like):
            leaves, treedef = jax.tree_util.tree_flatten(like)
            out = []
            for j, leaf in enumerate(leaves):
                data = arrays[f"{name}__{j}"]
                if f"{name}__{j}__rows" in arrays:
                    shape = (jnp.shape(leaf)[0], *data.shape[1:])
                    out.append(from_local_rows(arrays[f"{name}__{j}__rows"], data, shape, mesh))
                else:
                    out.append(put_rows(data, mesh) if sharded else jnp.asarray(data))
            return jax.tree_util.tree_unflatten(treedef, out)

        records: dict[str, list[np.ndarray]] = {}
        axes_steps: dict[str, list[np.ndarray]] = {}
        rec_steps: list[np.ndarray] = []

        def merge(into_rec, into_axes, new_rec, new_axes):
            for name, v in new_rec.items():
                into_rec.setdefault(name, []).append(v)
            for axis, st in new_axes.items():
                into_axes.setdefault(axis, []).append(np.asarray(st, np.int64))

        def snapshots(t, state, tstates):
            """Records of the observers that read their state at step t (CLV bases, states
            kept for later analyses): ({name: (R, 1, ...)}, {axis: [t]})."""
            out, axes = {}, {}
            xs = None
            for i, tr in enumerate(trackers):
                if t not in tr.snapshot_steps(info):
                    continue
                if xs is None:
                    xs = gather(state[0])
                idx = np.minimum(np.asarray(lay.tracks[i][0]), lay.B - 1)
                blocks = np.repeat(np.arange(n_dev), len(idx) // n_dev) * lay.B
                which = None if row_sets[i] is None else i
                vals = tr.snapshot(info, t, gather(tstates[i]), xs[blocks + idx])
                for name, v in vals.items():
                    out[name] = lay.to_rows(np.asarray(v, np.float64), which)[:, None]
                    axes[rec_specs[name][1].axis] = [t]
            return out, axes

        def axis_of(name):
            if name in rec_specs:
                return rec_specs[name][1].axis
            return DISTANCE_AXIS if fine_distances and name in DISTANCES else "step"

        def to_host(vals, steps_here=None, rec_at=None):
            """Device values → host rows: record-cadence values (at the record steps
            ``rec_at``) or the per-step values of a chunk (at ``steps_here``), kept at the steps
            of their axes."""
            out, axes = {}, {}
            for name, v in vals.items():
                v = np.asarray(v, np.float64)
                which = which_of.get(name)
                axis = axis_of(name)
                if steps_here is None:  # (n_records, rows, ...)
                    out[name] = lay.to_rows(np.moveaxis(v, 1, 0), which)
                    if axis != "step":  # a record-cadence value kept at its own axis' steps
                        sel = np.isin(rec_at, axes_all[axis])
                        out[name] = out[name][:, sel]
                        axes[axis] = rec_at[sel]
                    continue
                v = v.reshape(-1, *v.shape[2:])  # (n_rec·record_every, rows, ...)
                v = lay.to_rows(np.moveaxis(v, 1, 0), which)
                sel = np.isin(steps_here, axes_all[axis])
                out[name] = v if sel.all() else v[:, sel]
                axes[axis] = steps_here[sel]
            return out, axes

        def host_records(values, steps_by_axis, rec):
            out = {}
            for tr in trackers:
                out.update(tr.host_records(info, values, steps_by_axis, rec))
            return out

        def carried(state):
            return [host(c) for c in jax.tree_util.tree_leaves(state[1])]

        t = int(t0)
        resumed = False
        if resume and ckpt is not None and ckpt.exists():
            t, arrays = ckpt.load(fingerprint)
            like_state = (
                jax.ShapeDtypeStruct((lay.Rp, dim), replicas.states.dtype),
                jax.tree_util.tree_map(
                    lambda c: jax.ShapeDtypeStruct((lay.Rp, *np.shape(c)[1:]), np.asarray(c).dtype),
                    batch.carry,
                ),
                jax.ShapeDtypeStruct((lay.Rp,), bool),
                jax.ShapeDtypeStruct((lay.Rp,), np.int32),
            )
            state = unpack(arrays, "state", like_state)
            like_ts = jax.eval_shape(
                lambda: call(
                    0,
                    spec_for(record_every),
                    (model, hp, ref, state, jnp.asarray(t, jnp.int32), track),
                )
            )[1]
            tstates = unpack(arrays, "tracker", like_ts)
            rec_steps = [arrays["rec_steps"]]
            for k in arrays:
                if k.startswith("record__"):
                    records[k[len("record__") :]] = [arrays[k]]
                elif k.startswith("axis__"):
                    axes_steps[k[len("axis__") :]] = [arrays[k]]
            resumed = True
            if store:  # gathers are collectives: every process takes part
                st_host, div_host, cr_host = host(state[0]), host(state[3]), carried(state)
                if stream is not None:
                    stream.append(
                        result_from(
                            rec_steps,
                            _stored(records, transient),
                            axes_steps,
                            st_host,
                            div_host,
                            cr_host,
                            batch_coords,
                        ).to_xarray()
                    )
        else:
            state = (
                place(batch.states),
                jax.tree_util.tree_map(place, batch.carry),
                place(np.ones((R,), bool)),
                place(np.full((R,), -1, np.int32)),
            )
            obs0, tstates = call(
                0,
                spec_for(record_every),
                (model, hp, ref, state, jnp.asarray(t, jnp.int32), track),
            )
            first = {name: np.asarray(v)[None] for name, v in gather(obs0).items()}
            first, first_axes = to_host(first, rec_at=np.asarray([t]))
            first_axes = {**{axis: np.zeros(0, np.int64) for axis in axes_all}, **first_axes}
            for tr in trackers:
                first.update(tr.empty_host_records(R, 1))
            snap, snap_axes = snapshots(t, state, tstates)
            first.update(snap)
            first_axes.update(snap_axes)
            rec_steps = [np.asarray([t])]
            merge(records, axes_steps, first, first_axes)
            if stream is not None:
                stream.append(
                    result_from(
                        rec_steps,
                        _stored(records, transient),
                        axes_steps,
                        np.asarray(batch.states),
                        np.full(R, -1, np.int32),
                        [np.asarray(c) for c in jax.tree_util.tree_leaves(batch.carry)],
                        batch_coords,
                    ).to_xarray()
                )
        if bar is not None:
            bar.update(t - int(t0))
        end = int(t0) + steps
        while t < end:
            n = _chunk_plan(t, end, chunk_steps, stops)
            args = (model, hp, ref, state, tstates, jnp.asarray(t, jnp.int32), track)
            (state, tstates), (obs, fine) = call(1, spec_for(n), args)
            obs, fine = gather(obs), gather(fine)  # the only device → host transfer
            new_steps = t + record_every * (1 + np.arange(n // record_every))
            chunk, chunk_axes = to_host(obs, rec_at=new_steps)
            fine_vals, fine_axes = to_host(fine, t + 1 + np.arange(n))
            chunk.update(host_records(fine_vals, fine_axes, new_steps))
            chunk.update(fine_vals)
            chunk_axes.update(fine_axes)
            t += n
            snap, snap_axes = snapshots(t, state, tstates)
            chunk.update(snap)
            chunk_axes.update(snap_axes)
            merge(records, axes_steps, chunk, chunk_axes)
            rec_steps.append(new_steps)
            if store:  # gathers are collectives: every process takes part
                now = (host(state[0]), host(state[3]), carried(state))
                if stream is not None:
                    stream.append(
                        result_from(
                            [new_steps],
                            {k: [v] for k, v in _stored(chunk, transient).items()},
                            {k: [v] for k, v in chunk_axes.items()},
                            *now,
                            batch_coords,
                        ).to_xarray()
                    )
            if ckpt is not None:
                arrays = {**pack("state", state), **pack("tracker", tstates)}
                arrays["rec_steps"] = np.concatenate(rec_steps)
                for k, v in records.items():
                    arrays[f"record__{k}"] = np.concatenate(v, axis=1)
                for k, v in axes_steps.items():
                    arrays[f"axis__{k}"] = np.concatenate(v)
                ckpt.save(fingerprint, t, arrays)
            if bar is not None:
                bar.update(n)
                bar.set_postfix(alive=f"{int(host(state[2]).sum())}/{R}")
            if on_chunk is not None:
                on_chunk(t)
        meta["resumed"] = max(int(resumed), int(meta.get("resumed", 0)))
        res = result_from(
            rec_steps,
            records,
            axes_steps,
            host(state[0]),
            host(state[3]),
            carried(state),
            batch_coords,
        )
        ts_host = gather(tstates)
        res.tracker_states = [
            jax.tree_util.tree_map(
                lambda a, i=i: (
                    lay.to_rows(np.asarray(a), None if row_sets[i] is None else i)
                    if np.ndim(a)
                    else a
                ),
                ts_host[i],
            )
            for i in range(len(trackers))
        ]
        return res

    capacity = plan.limit_bytes // max(plan.bytes_per_replica, 1)  # rows a device can hold
    passes = pass_rows(replicas.reference, capacity, plan.n_devices if sharded else 1)
    stream = ZarrStream(store) if store and main else None
    bar = tqdm(
        total=steps * len(passes),
        disable=not (progress and main),
        unit="step",
        desc=desc,
        dynamic_ncols=True,
    )
    t_start = time.perf_counter()
    try:
        if len(passes) == 1:
            result = one_pass(replicas, checkpoint, stream, bar)
        else:
            parts = []
            for i, rows in enumerate(passes):
                ck = pass_path(checkpoint, i) if checkpoint else None
                parts.append((rows, one_pass(replicas.subset(rows), ck, None, bar)))
            result = _merge_passes(parts, R, coords)
            if stream is not None:
                stream.append(result.to_xarray())
    finally:
        bar.close()
    meta["wall_time_s"] = time.perf_counter() - t_start
    meta["passes"] = len(passes)
    return result


#: the default replica strategy per model kind and backend, from measurements recorded in
#: benchmarks/RESULTS.md ("Replica strategies"): on the CPU, vmapping a convolution over
#: per-replica weights turns it into a grouped convolution that XLA runs ~3x slower than a
#: loop over replicas; dense layers and plain maps batch well everywhere; GPUs batch both.
STRATEGY_RULE = (
    "vmap everywhere, except on the CPU backend for a training map whose step contains a "
    "convolution (conv_general_dilated in its jaxpr): lax.map over replicas. Measured: "
    "vmapping a convolution over per-replica weights makes it a grouped convolution that XLA's "
    "CPU backend runs about three times slower than a loop; on a GPU vmap is the fast path"
)


#: convolution verdicts by map structure (treedef and leaf shapes): module-level, never on a map
_CONVOLUTION: dict = {}


def _has_convolution(treedef, shapes, model) -> bool:
    """Whether the map's step contains a convolution: traced once per map structure
    (abstractly: nothing is compiled), never cached on the map itself."""
    from chaosjax.sharding import jaxpr_primitives

    key = (treedef, shapes)
    if key not in _CONVOLUTION:
        jaxpr = jax.make_jaxpr(lambda s: model.step(s, 0))(model.init()).jaxpr
        _CONVOLUTION[key] = "conv_general_dilated" in jaxpr_primitives(jaxpr)
    return _CONVOLUTION[key]


def default_strategy(model, backend: str | None = None) -> str:
    """The replica strategy of :data:`STRATEGY_RULE` for ``model`` on ``backend`` (default:
    JAX's default backend). Decided from the step's program, never from timing, so a rerun or
    a resume compiles the same program."""
    backend = backend or jax.default_backend()
    model = getattr(model, "__self__", model)  # a map's bound step: the map
    if backend != "cpu" or not isinstance(model, Map) or "parameters" not in model.capabilities:
        return "vmap"
    leaves, treedef = jax.tree_util.tree_flatten(model)
    shapes = tuple((jnp.shape(v), jnp.result_type(v)) for v in leaves)
    has_conv = _has_convolution(treedef, shapes, model)
    return "map" if has_conv else "vmap"


def _void_nonsmooth(trackers, flow, replicas, t0) -> tuple[tuple, str]:
    """The trackers, with every tangent observer voided (NaN records) when the step is not
    smooth (:func:`chaosjax.smoothness.flow_smoothness`) unless it allows it; and the reason.
    Decided from the step's program at the first row, once per run, with one warning."""
    from chaosjax.smoothness import NonSmoothWarning, flow_smoothness

    need = [i for i, tr in enumerate(trackers) if tr.uses_tangents and not tr.allow_nonsmooth]
    if not need:
        return trackers, ""

    def row0(tree):
        return jax.tree_util.tree_map(lambda a: jnp.asarray(a)[0], tree)

    verdict = flow_smoothness(
        flow,
        jnp.asarray(replicas.states[0]),
        row0(replicas.carry),
        jnp.asarray(t0, jnp.int32),
        row0(replicas.hparams),
    )
    if verdict.smooth:
        return trackers, ""
    warn_at_caller(verdict.reason, NonSmoothWarning)
    voided = tuple(
        dataclasses.replace(tr, void=verdict.reason) if i in need else tr
        for i, tr in enumerate(trackers)
    )
    return voided, verdict.reason


def _stored(records, transient):
    return {k: v for k, v in records.items() if k not in transient}


def _owner(trackers, reference) -> int:
    """The observer that takes the step itself: a tangent observer that tracks every row
    (its linearisation computes the step anyway). -1 when there is none."""
    for i, tr in enumerate(trackers):
        if tr.takes_step and tracked_rows(tr.rows, reference) is None:
            return i
    return -1


def pass_rows(reference: np.ndarray, per_device: int, n_dev: int) -> list[np.ndarray]:
    """Split rows into passes of at most ``per_device`` rows on each of ``n_dev`` devices,
    keeping every reference group whole on one device (groups in order, each to the
    least-loaded device, as :func:`device_layout` places them)."""
    passes, cur, load = [], [], [0] * n_dev
    for rows in groups_of(reference):
        if len(rows) > per_device:
            raise ValueError(
                f"memory_limit: a reference group of {len(rows)} replicas does not fit on one "
                f"device ({per_device} per device); use fewer perturbed replicas per group or "
                "more memory"
            )
        d = load.index(min(load))
        if cur and load[d] + len(rows) > per_device:
            passes.append(np.asarray(cur))
            cur, load = [], [0] * n_dev
            d = 0
        cur += rows
        load[d] += len(rows)
    if cur:
        passes.append(np.asarray(cur))
    return passes


def _merge_passes(parts, R: int, coords) -> ReplicaResults:
    order = np.concatenate([rows for rows, _ in parts])
    inv = np.empty(R, np.int64)
    inv[order] = np.arange(R)
    res = [r for _, r in parts]

    def cat(arrs):
        return np.concatenate(arrs, axis=0)[inv]

    first = res[0]
    merged = ReplicaResults(
        steps=first.steps,
        records={k: cat([r.records[k] for r in res]) for k in first.records},
        final_state=cat([r.final_state for r in res]),
        diverged_step=cat([r.diverged_step for r in res]),
        coords=coords,
        layer_names=first.layer_names,
        attrs=first.attrs,
        dims=first.dims,
        axes=first.axes,
        final_carry=tuple(cat(list(c)) for c in zip(*[r.final_carry for r in res])),
        transient=first.transient,
    )
    merged.tracker_states = [
        jax.tree_util.tree_map(lambda *a: cat(list(a)) if np.ndim(a[0]) else a[0], *states)
        for states in zip(*[r.tracker_states for r in res])
    ]
    return merged


__all__ = [
    "DISTANCES",
    "DISTANCE_AXIS",
    "GENERIC_OBSERVABLES",
    "STRATEGY_RULE",
    "TRAINING_OBSERVABLES",
    "Checkpoint",
    "coords_of",
    "default_strategy",
    "device_layout",
    "pass_rows",
    "replica_memory",
    "run_replicas",
    "tracked_rows",
]
