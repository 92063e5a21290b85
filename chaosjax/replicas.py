"""Replica engine: batches of perturbed / independently initialised / hyper-parameter replicas,
run as one vmapped batch by a chunked driver.

A chunk is one jitted ``lax.scan`` over ``chunk_steps`` steps of the vmapped step; the host
loop between chunks updates the progress bar, appends the recorded observables to a zarr
stream and writes a checkpoint, so an interrupted run resumes to the same arrays. A replica
whose state or loss stops being finite (or whose loss exceeds ``loss_bound``) is flagged with
its step and frozen; its later records are NaN and the rest of the batch goes on.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from jax.tree_util import Partial
from tqdm.auto import tqdm

from chaosjax._smalllinalg import pure_linalg
from chaosjax._util import (
    as_traceable,
    atomic_write_bytes,
    check_step_signature,
    dumps,
    environment_info,
    warn_if_below_resolution,
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
from chaosjax.training import TrainingMap

DISTRIBUTIONS = ("uniform", "gaussian")
TARGETS = ("weights", "params", "all")
TRAINING_OBSERVABLES = (
    "loss",
    "accuracy",
    "test_loss",
    "test_accuracy",
    "param_norm",
    "distance_l1",
    "distance_l2",
    "layer_distance",
    "layer_distance_l1",
)
GENERIC_OBSERVABLES = ("norm", "distance_l1", "distance_l2")


# ---------------------------------------------------------------------------------------------
# building replica batches


@dataclasses.dataclass
class ReplicaBatch:
    """A batch of R replicas.

    Attributes:
        states: initial states, shape (R, dim).
        hparams: {name: (R,)} hyper-parameters per replica (training maps only).
        reference: (R,) index of each replica's unperturbed reference replica (itself for a
            reference); distances are measured to it.
        coords: {name: (R,)} labels: ``seed``, each grid hyper-parameter, ``eps``, ``member``
            (0 = the reference of its group).
    """

    states: jax.Array
    hparams: dict[str, jax.Array]
    reference: np.ndarray
    coords: dict[str, np.ndarray]

    def subset(self, rows) -> ReplicaBatch:
        """The replicas at ``rows`` (each with its reference among them), in that order."""
        rows = np.asarray(rows, np.int64)
        pos = {int(r): i for i, r in enumerate(rows)}
        try:
            ref = np.asarray([pos[int(self.reference[r])] for r in rows], np.int32)
        except KeyError:
            raise ValueError("rows: every replica's reference must be among the rows") from None
        return ReplicaBatch(
            states=self.states[rows],
            hparams={k: v[rows] for k, v in self.hparams.items()},
            reference=ref,
            coords={k: np.asarray(v)[rows] for k, v in self.coords.items()},
        )

    def __len__(self) -> int:
        return int(self.states.shape[0])


def perturbation(key, shape, eps: float, distribution: str = "uniform", dtype=None) -> jax.Array:
    """A random perturbation: U(−ε, ε) (``"uniform"``) or N(0, ε²) (``"gaussian"``) entries."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"distribution: unknown {distribution!r}; allowed: {', '.join(DISTRIBUTIONS)}"
        )
    dtype = dtype or jnp.asarray(0.0).dtype
    if distribution == "uniform":
        return jax.random.uniform(key, shape, dtype, minval=-eps, maxval=eps)
    return eps * jax.random.normal(key, shape, dtype)


def perturbation_mask(model, target: str, dim: int) -> np.ndarray:
    """Which state entries a perturbation touches: ``"weights"`` (kernels only),
    ``"params"`` (all parameters) or ``"all"`` (parameters and optimizer moments)."""
    if target not in TARGETS:
        raise ValueError(f"target: unknown {target!r}; allowed: {', '.join(TARGETS)}")
    mask = np.zeros(dim, bool)
    if not isinstance(model, TrainingMap):
        if target != "all":
            raise ValueError(f"target: {target!r} needs a TrainingMap; use 'all' for a plain state")
        mask[:] = True
    elif target == "weights":
        mask[: model.n_params] = model.weight_mask
    elif target == "params":
        mask[: model.n_params] = True
    else:
        mask[:] = True
    return mask


def _as_list(name, value, kind=float) -> list:
    if isinstance(value, str) or not isinstance(value, Sequence | np.ndarray):
        value = [value]
    out = list(value)
    if not out:
        raise ValueError(f"{name}: must not be empty")
    try:
        return [kind(v) for v in out]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {kind.__name__} values, got {value!r}") from None


def make_replicas(
    model,
    *,
    base=None,
    seeds: int | Sequence[int] | None = None,
    grid: Mapping[str, Sequence[float]] | None = None,
    n_perturbed: int = 0,
    eps: float | Sequence[float] = 1e-8,
    distribution: str = "uniform",
    target: str | None = None,
    perturb_seed: int = 0,
) -> ReplicaBatch:
    """Build replicas: independent seeds × hyper-parameter grid × (reference + perturbed).

    For every seed and every grid point there is one *reference* replica (member 0), followed
    by ``n_perturbed`` replicas per ε in ``eps`` (members 1, 2, …). Perturbations depend on
    (perturb_seed, seed, member) only, so the same perturbation is used at every grid point.

    Args:
        model: a :class:`TrainingMap`, or a ``step(x, t)`` callable for plain maps.
        base: base state (dim,); default ``model.init()`` (training maps).
        seeds: independent initialisations ``model.init_from_key(seed)`` (replaces ``base``).
        grid: {hyper-parameter: values}, e.g. ``{"learning_rate": [0.01, 1.0, 5.0]}``.
        n_perturbed: perturbed replicas per ε and group.
        eps: perturbation size(s) ε.
        distribution: ``"uniform"`` U(−ε, ε) or ``"gaussian"`` N(0, ε²).
        target: ``"weights"`` (default for training maps; kernels only, as Danovski et al.),
            ``"params"`` or ``"all"`` (default and only choice for plain states).
        perturb_seed: seed of the perturbations.

    Returns:
        A :class:`ReplicaBatch` with states (R, dim).
    """
    is_tm = isinstance(model, TrainingMap)
    target = target or ("weights" if is_tm else "all")
    if int(n_perturbed) != n_perturbed or n_perturbed < 0:
        raise ValueError(f"n_perturbed: must be a non-negative integer, got {n_perturbed!r}")
    eps_list = _as_list("eps", eps)
    if any(not e > 0 for e in eps_list):
        raise ValueError(f"eps: must be > 0, got {eps!r}")
    if seeds is not None and base is not None:
        raise ValueError("seeds: give either seeds (independent inits) or base, not both")
    grid = dict(grid or {})
    if grid and not is_tm:
        raise ValueError("grid: hyper-parameter grids need a TrainingMap")
    for k in grid:
        if k not in model.hparams:
            raise ValueError(
                f"grid: unknown hyper-parameter {k!r}; allowed: {sorted(model.hparams)}"
            )
    grid = {k: _as_list(f"grid.{k}", v) for k, v in grid.items()}

    if seeds is not None:
        seed_list = _as_list("seeds", seeds, int)
        if not is_tm:
            raise ValueError("seeds: independent initialisations need a TrainingMap with init_fn")
        bases = [model.init_from_key(s) for s in seed_list]
    else:
        if base is None:
            if not is_tm:
                raise ValueError("base: the initial state is required for a plain step function")
            base = model.init()
        base = jnp.asarray(base)
        if base.ndim != 1:
            raise ValueError(f"base: expected a flat state of shape (dim,), got shape {base.shape}")
        seed_list = [0]
        bases = [base]
    dim = int(bases[0].shape[0])
    dtype = bases[0].dtype
    mask = perturbation_mask(model, target, dim)
    if n_perturbed:
        scale = float(np.sqrt(np.mean(np.asarray(bases[0])[mask] ** 2))) if mask.any() else 1.0
        for e in eps_list:
            warn_if_below_resolution(e, dtype, max(scale, 1e-12), what="eps")

    members = [(0.0, 0)] + [(e, m) for e in eps_list for m in range(1, n_perturbed + 1)]
    combos = list(itertools.product(*grid.values())) if grid else [()]
    states, refs, coords = [], [], {"seed": [], "eps": [], "member": []}
    for k in grid:
        coords[k] = []
    hp_rows = []
    pkey = jax.random.PRNGKey(perturb_seed)
    mask_j = jnp.asarray(mask)
    for si, (seed, b) in enumerate(zip(seed_list, bases)):
        for combo in combos:
            ref_index = len(states)
            for j, (e, m) in enumerate(members):
                if m == 0:
                    s = b
                else:
                    key = jax.random.fold_in(jax.random.fold_in(pkey, si), j)
                    s = b + jnp.where(mask_j, perturbation(key, (dim,), e, distribution, dtype), 0)
                states.append(s)
                refs.append(ref_index)
                coords["seed"].append(seed)
                coords["eps"].append(e)
                coords["member"].append(m)
                for k, v in zip(grid, combo):
                    coords[k].append(v)
                hp_rows.append(dict(zip(grid, combo)))
    hparams = {}
    if is_tm:
        for k, v in model.hparams.items():
            hparams[k] = jnp.asarray([row.get(k, float(v)) for row in hp_rows], v.dtype)
    return ReplicaBatch(
        states=jnp.stack(states),
        hparams=hparams,
        reference=np.asarray(refs, np.int32),
        coords={k: np.asarray(v) for k, v in coords.items()},
    )


# ---------------------------------------------------------------------------------------------
# observables


class _Spec(NamedTuple):
    names: tuple[str, ...]
    custom: tuple[tuple[str, Callable], ...]
    n_records: int
    record_every: int
    loss_bound: float
    state_bound: float
    layers: tuple[tuple[int, int], ...]
    n_params: int
    trackers: tuple = ()


def _generic_step_and_loss(step, x, t, hparams):
    return step(x, t), jnp.zeros((), x.dtype)


def _observe(model, states, alive, ref, spec: _Spec):
    is_tm = isinstance(model, TrainingMap)
    out = {}
    p = states[:, : spec.n_params] if is_tm else states
    diff = p - p[ref]
    for name in spec.names:
        if name == "loss":
            v = jax.vmap(model.loss)(states)
        elif name == "accuracy":
            v = jax.vmap(model.accuracy)(states)
        elif name == "test_loss":
            v = jax.vmap(lambda s: model.loss(s, "test"))(states)
        elif name == "test_accuracy":
            v = jax.vmap(lambda s: model.accuracy(s, "test"))(states)
        elif name in ("param_norm", "norm"):
            v = jnp.linalg.norm(p, axis=-1)
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
    for name, fn in spec.custom:
        out[name] = jax.vmap(fn)(states)
    return _mask(out, alive, ref)


def _mask(out, alive, ref):
    """NaN for replicas that diverged (and distances to a reference that diverged)."""
    dead_ref = ~alive[ref]
    for name, v in out.items():
        bad = ~alive
        if name.startswith(("distance", "layer_distance")):
            bad = bad | dead_ref
        bad = bad.reshape(bad.shape + (1,) * (v.ndim - 1))
        out[name] = jnp.where(bad, jnp.nan, v.astype(jnp.result_type(float)))
    return out


def _observe_first(model, hparams, states, alive, ref, t, spec: _Spec):
    """Observables at the first record, with the trackers' cold starts."""
    out = _observe(model, states, alive, ref, spec)
    tstates = []
    for tr in spec.trackers:
        vals, ts = tr.init(model, states, hparams, t)
        out.update(_mask(dict(vals), alive, ref))
        tstates.append(ts)
    return out, tuple(tstates)


def _chunk(stepper, model, hparams, ref, states, alive, div_step, tstates, t0, spec: _Spec):
    step_b = jax.vmap(stepper, in_axes=(0, None, 0))

    def inner(carry, t):
        s, a, d = carry
        new, bloss = step_b(s, t, hparams)
        ok = jnp.all(jnp.isfinite(new), axis=-1) & jnp.isfinite(bloss) & (bloss <= spec.loss_bound)
        ok = ok & (jnp.max(jnp.abs(new), axis=-1) <= spec.state_bound)
        d = jnp.where(a & ~ok, t + 1, d)
        a = a & ok
        s = jnp.where(a[:, None], new, s)
        return (s, a, d), None

    def outer(carry, tr):
        (s, a, d), ts = carry
        (s, a, d), _ = jax.lax.scan(
            inner, (s, a, d), tr + jnp.arange(spec.record_every, dtype=tr.dtype)
        )
        obs = _observe(model, s, a, ref, spec)
        new_ts = []
        for tracker, st in zip(spec.trackers, ts):
            vals, st = tracker.update(model, s, hparams, st, tr + spec.record_every)
            obs.update(_mask(dict(vals), a, ref))
            new_ts.append(st)
        return ((s, a, d), tuple(new_ts)), obs

    times = t0 + spec.record_every * jnp.arange(spec.n_records, dtype=t0.dtype)
    return jax.lax.scan(outer, ((states, alive, div_step), tstates), times)


_chunk_jit = donating_jit(_chunk, ("spec",), (4, 7))  # states and tracker states
_observe_first_jit = jax.jit(_observe_first, static_argnames=("spec",))


@functools.lru_cache(maxsize=64)
def _sharded_fns(mesh, spec: _Spec):
    """The first record and the chunk as ``shard_map`` programs over the replica mesh.

    Every device runs its own rows with no communication: the layout of
    :func:`_device_layout` keeps each reference group on one device, so the distances to the
    reference are local. (A program mixing cross-device collectives with the LAPACK calls
    of a curvature tracker can deadlock on the XLA CPU runtime; there are none here, and on
    the CPU backend the trackers' small eigen and QR factorisations are traced without LAPACK
    custom calls, see :mod:`chaosjax._smalllinalg`, since those alone can deadlock too.)
    """
    rows, rep = P(AXIS), P()
    cpu = jax.default_backend() == "cpu"  # no donation; no LAPACK custom calls (see above)
    first = jax.shard_map(
        functools.partial(_observe_first, spec=spec),
        mesh=mesh,
        in_specs=(rep, rows, rows, rows, rows, rep),
        out_specs=(rows, rows),
        check_vma=False,
    )
    chunk = jax.shard_map(
        functools.partial(_chunk, spec=spec),
        mesh=mesh,
        in_specs=(rep, rep, rows, rows, rows, rows, rows, rows, rep),
        out_specs=(((rows, rows, rows), rows), P(None, AXIS)),
        check_vma=False,
    )
    first = jax.jit(first)
    chunk = jax.jit(chunk, donate_argnums=() if cpu else (4, 7))
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


def _coords_of(batch: ReplicaBatch) -> dict[str, np.ndarray]:
    """The stored coordinates of a batch: its labels, the reference index and every
    hyper-parameter per replica."""
    coords = dict(batch.coords)
    coords["reference"] = np.asarray(batch.reference)
    for k, v in batch.hparams.items():
        coords.setdefault(k, np.asarray(v))
    return coords


def _groups(reference: np.ndarray) -> list[list[int]]:
    """Rows of each reference group, groups in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(np.asarray(reference)):
        groups.setdefault(int(r), []).append(i)
    return list(groups.values())


def _assign(sizes: Sequence[int], n_dev: int) -> tuple[list[int], list[int]]:
    """Each group (of these sizes, in order) to the least-loaded device: (device per group,
    rows per device)."""
    load = [0] * n_dev
    device = []
    for n in sizes:
        d = load.index(min(load))
        device.append(d)
        load[d] += n
    return device, load


def _device_layout(reference: np.ndarray, n_dev: int):
    """Rows per device, each reference group whole on one device (balanced by row count).

    Returns ``(perm, local_ref, pos)``: ``perm`` (n_dev·B,) the original row at each layout
    position (padding repeats a row of the same device and is its own reference),
    ``local_ref`` the reference's index inside the device block, ``pos`` (R,) the layout
    position of each original row.
    """
    reference = np.asarray(reference)
    groups = _groups(reference)
    blocks: list[list[int]] = [[] for _ in range(n_dev)]
    for rows, d in zip(groups, _assign([len(g) for g in groups], n_dev)[0]):
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


# ---------------------------------------------------------------------------------------------
# checkpoints


class Checkpoint:
    """Atomic ``.npz`` checkpoint of a replica run (no pickle)."""

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
# driver


def run_replicas(
    model,
    replicas: ReplicaBatch,
    *,
    steps: int,
    record_every: int = 1,
    observables: Sequence[str] | None = None,
    custom_observables: Mapping[str, Callable] | None = None,
    trackers: Sequence = (),
    chunk_steps: int | None = None,
    loss_bound: float = 1e8,
    state_bound: float = np.inf,
    t0: int = 0,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    store: str | os.PathLike | None = None,
    resume: bool = False,
    attrs: Mapping[str, Any] | None = None,
    on_chunk: Callable[[int], None] | None = None,
    devices=None,
    memory_limit=None,
) -> ReplicaResults:
    """Run a replica batch for ``steps`` steps and record observables every ``record_every``.

    Args:
        model: a :class:`TrainingMap` or a plain ``step(x, t)`` callable.
        replicas: from :func:`make_replicas`.
        steps: number of steps (a multiple of ``record_every``).
        record_every: record cadence; records are at t0, t0 + r, …, t0 + steps.
        observables: names to record. Training maps: ``loss``, ``accuracy``, ``test_loss``,
            ``test_accuracy``, ``param_norm``, ``distance_l1``, ``distance_l2`` (parameters, to
            the reference replica), ``layer_distance`` / ``layer_distance_l1`` (per layer).
            Plain maps: ``norm``, ``distance_l1``, ``distance_l2``.
        custom_observables: {name: fn(state) -> scalar or vector}, vmapped over replicas.
        trackers: stateful observables with ``init(model, states, hparams, t)`` and
            ``update(model, states, hparams, tracker_state, t)`` returning (values, state),
            e.g. :class:`chaosjax.curvature.CurvatureTracker` (training maps only); their
            state (warm starts) is carried between records and checkpointed.
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
            ``None`` = every device (of every process after
            :func:`chaosjax.sharding.initialize_distributed`), an int = that many local
            devices, or a list of devices / a mesh. States, tracker states and
            hyper-parameters stay on the devices between chunks; only the records come back.
        memory_limit: bytes (or ``"8GiB"``) a device may use; default 80 % of the device's
            (or the host's share of) memory. A batch that does not fit runs in passes of
            whole reference groups; a run in which one replica does not fit is refused.

    Returns:
        :class:`ReplicaResults` with records (R, steps // record_every + 1, ...).
    """
    steps, record_every = int(steps), int(record_every)
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    if record_every < 1 or steps % record_every:
        raise ValueError(f"record_every: must be >= 1 and divide steps={steps}, got {record_every}")
    is_tm = isinstance(model, TrainingMap)
    allowed = TRAINING_OBSERVABLES if is_tm else GENERIC_OBSERVABLES
    if observables is None:
        observables = (
            ("loss", "param_norm", "distance_l1", "distance_l2")
            + (("accuracy",) if is_tm and model.task == "classification" else ())
            if is_tm
            else ("norm", "distance_l2")
        )
    observables = tuple(observables)
    for name in observables:
        if name not in allowed:
            raise ValueError(f"observables: unknown {name!r}; allowed: {', '.join(allowed)}")
        if is_tm and "accuracy" in name and model.task != "classification":
            raise ValueError(f"observables: {name!r} needs a classification dataset")
    custom = tuple(sorted((custom_observables or {}).items()))
    trackers = tuple(trackers)
    if trackers and not is_tm:
        raise ValueError("trackers: curvature trackers need a TrainingMap")
    taken = set(observables) | {c[0] for c in custom}
    for tr in trackers:
        tr.validate(model)
        clash = taken & set(tr.NAMES)
        if clash:
            raise ValueError(f"trackers: record names {sorted(clash)} are used twice")
        taken |= set(tr.NAMES)
    for name, fn in custom:
        if name in observables or not callable(fn):
            raise ValueError(f"custom_observables: {name!r} must be a new name with a callable")

    if is_tm:
        stepper = Partial(TrainingMap.step_and_loss, model)
        layers = tuple(model.layers.values())
        layer_names = tuple(model.layers)
        n_params = model.n_params
    else:
        step = as_traceable(model)
        check_step_signature(step)
        stepper = Partial(_generic_step_and_loss, step)
        layers, layer_names, n_params = (), (), int(replicas.states.shape[1])
    R = len(replicas)
    if chunk_steps is None:
        chunk_steps = max(record_every, (500 // record_every) * record_every)
    chunk_steps = int(chunk_steps)
    if chunk_steps < 1 or chunk_steps % record_every:
        raise ValueError(f"chunk_steps: must be a positive multiple of record_every={record_every}")
    chunk_steps = min(chunk_steps, steps)
    mesh = replica_mesh(devices)
    sharded = is_sharded(mesh)
    estimate = replica_memory(model, replicas, trackers)
    plan = plan_batches(R, estimate, mesh, memory_limit=memory_limit)
    meta = {
        "environment": environment_info(),
        "dtype": str(replicas.states.dtype),
        "devices": int(mesh.devices.size),
        "processes": jax.process_count(),
        "memory_plan": plan.describe(),
        **dict(attrs or {}),
    }
    coords = _coords_of(replicas)
    main = is_main_process()

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
        )

    def result_from(rec_steps, records, states, div_step, batch_coords=None):
        return ReplicaResults(
            steps=np.concatenate(rec_steps),
            records={k: np.concatenate(v, axis=1) for k, v in records.items()},
            final_state=np.asarray(states),
            diverged_step=np.asarray(div_step),
            coords=coords if batch_coords is None else batch_coords,
            layer_names=layer_names,
            attrs=meta,
        )

    def run(which: int, spec: _Spec, args):  # 0: first record, 1: a chunk
        if sharded:
            return _sharded_fns(mesh, spec)[which](*args)
        return (_observe_first_jit, _chunk_jit)[which](*args, spec=spec)

    def one_pass(batch: ReplicaBatch, checkpoint, stream, bar) -> ReplicaResults:
        R = len(batch)
        stream_any = bool(store)  # a store on process 0: the others join its gathers
        if sharded:  # reference groups kept whole on a device, blocks padded to equal size
            perm, local_ref, pos = _device_layout(batch.reference, mesh_size(mesh))
        else:
            perm, local_ref, pos = None, np.asarray(batch.reference, np.int32), np.arange(R)
        Rp = len(local_ref)

        def place(x):  # host rows (R, ...) → device rows (Rp, ...) in the device layout
            if not sharded:  # a fresh buffer: the states are donated on accelerators
                return jnp.array(x)
            return put_rows(np.asarray(x)[perm], mesh)

        def host(x):  # device rows → host rows (R, ...), original order, on every process
            return gather(x)[pos]

        ref = put_rows(local_ref, mesh) if sharded else jnp.asarray(local_ref)
        hp = {k: place(v) for k, v in batch.hparams.items()} if is_tm else {}
        fingerprint = dumps(
            {
                "steps": steps,
                "record_every": record_every,
                "chunk_steps": chunk_steps,
                "t0": int(t0),
                "observables": observables,
                "custom": [c[0] for c in custom],
                "trackers": [repr(tr) for tr in trackers],
                "R": R,
                "padded": Rp,
                "processes": jax.process_count(),
                "shape": list(batch.states.shape),
                "coords": {k: np.asarray(v).tolist() for k, v in batch.coords.items()},
                "state_sum": float(np.asarray(batch.states, np.float64).sum()),
            }
        )
        ckpt = Checkpoint(process_path(checkpoint)) if checkpoint else None
        batch_coords = _coords_of(batch)

        def pack(name, x):  # checkpoint arrays: all rows (one process) or this process's rows
            if jax.process_count() == 1:
                return {name: host(x)}
            rows, data = local_rows(x)
            return {name: data, f"{name}__rows": rows}

        def unpack(arrays, name):
            if f"{name}__rows" in arrays:
                data = arrays[name]
                return from_local_rows(arrays[f"{name}__rows"], data, (Rp, *data.shape[1:]), mesh)
            return place(arrays[name])

        t = int(t0)
        records: dict[str, list[np.ndarray]] = {}
        rec_steps: list[np.ndarray] = []
        resumed = False
        if resume and ckpt is not None and ckpt.exists():
            t, arrays = ckpt.load(fingerprint)
            states = unpack(arrays, "states")
            alive = unpack(arrays, "alive")
            div_step = unpack(arrays, "div_step")
            tstates = tuple(unpack(arrays, f"tracker__{i}") for i in range(len(trackers)))
            rec_steps = [arrays["rec_steps"]]
            records = {
                k[len("record__") :]: [arrays[k]] for k in arrays if k.startswith("record__")
            }
            resumed = True
            if stream_any:  # gathers are collectives: every process takes part
                st_host, div_host = host(states), host(div_step)
                if stream is not None:
                    stream.append(result_from(rec_steps, records, st_host, div_host).to_xarray())
        else:
            states = place(batch.states)
            alive = place(np.ones((R,), bool))
            div_step = place(np.full((R,), -1, np.int32))
            obs0, tstates = run(
                0,
                spec_for(record_every),
                (model if is_tm else None, hp, states, alive, ref, jnp.asarray(t, jnp.int32)),
            )
            records = {k: [v[pos, None]] for k, v in gather(obs0).items()}
            rec_steps = [np.asarray([t])]
            if stream is not None:  # the initial states and flags are on the host already
                stream.append(
                    result_from(
                        rec_steps, records, np.asarray(batch.states), np.full(R, -1, np.int32)
                    ).to_xarray()
                )
        if bar is not None:
            bar.update(t - int(t0))
        end = int(t0) + steps
        while t < end:
            n = min(chunk_steps, end - t)
            args = (
                stepper,
                model if is_tm else None,
                hp,
                ref,
                states,
                alive,
                div_step,
                tstates,
                jnp.asarray(t, jnp.int32),
            )
            ((states, alive, div_step), tstates), obs = run(1, spec_for(n), args)
            obs = gather(obs)  # the only device → host transfer of a chunk
            new_steps = t + record_every * (1 + np.arange(n // record_every))
            t += n
            chunk_rec = {k: np.swapaxes(v, 0, 1)[pos] for k, v in obs.items()}
            for k, v in chunk_rec.items():
                records[k].append(v)
            rec_steps.append(new_steps)
            if stream is not None:  # only the records are appended (states are not per step)
                chunk = {k: [v] for k, v in chunk_rec.items()}
                stream.append(
                    result_from(
                        [new_steps], chunk, np.asarray(batch.states), np.full(R, -1, np.int32)
                    ).to_xarray()
                )
            if ckpt is not None:
                arrays = {}
                for name, x in (("states", states), ("alive", alive), ("div_step", div_step)):
                    arrays.update(pack(name, x))
                for i, ts in enumerate(tstates):
                    arrays.update(pack(f"tracker__{i}", ts))
                arrays["rec_steps"] = np.concatenate(rec_steps)
                for k, v in records.items():
                    arrays[f"record__{k}"] = np.concatenate(v, axis=1)
                ckpt.save(fingerprint, t, arrays)
            if bar is not None:
                bar.update(n)
                bar.set_postfix(alive=f"{int(host(alive).sum())}/{R}")
            if on_chunk is not None:
                on_chunk(t)
        meta["resumed"] = max(int(resumed), int(meta.get("resumed", 0)))
        return result_from(rec_steps, records, host(states), host(div_step), batch_coords)

    capacity = plan.limit_bytes // max(plan.bytes_per_replica, 1)  # rows a device can hold
    passes = _pass_rows(replicas.reference, capacity, plan.n_devices if sharded else 1)
    stream = ZarrStream(store) if store and main else None
    bar = tqdm(
        total=steps * len(passes),
        disable=not (progress and main),
        unit="step",
        desc="replicas",
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


def replica_memory(model, replicas: ReplicaBatch, trackers: Sequence = ()) -> MemoryEstimate:
    """Device memory one replica of :func:`run_replicas` needs, by part.

    ``state``: the state and its copies inside a step (carry, update, frozen select);
    ``step``: every intermediate of one step (activations, gradients, optimizer update) from
    the step's jaxpr; one entry per tracker: its carried state (e.g. Krylov warm starts) and
    the intermediates of one update (e.g. the Lanczos basis). Arrays shared by all replicas
    (the dataset) are not counted.
    """
    dim = int(replicas.states.shape[1])
    dtype = replicas.states.dtype
    itemsize = np.dtype(dtype).itemsize
    parts = {"state": 4 * dim * itemsize}
    t = jnp.zeros((), jnp.int32)
    if isinstance(model, TrainingMap):
        hp1 = {k: jax.ShapeDtypeStruct((1,), v.dtype) for k, v in replicas.hparams.items()}
        x1 = jax.ShapeDtypeStruct((1, dim), dtype)
        step_b = jax.vmap(Partial(TrainingMap.step_and_loss, model), in_axes=(0, None, 0))
        parts["step"] = estimate_bytes(lambda x, hp: step_b(x, t, hp), x1, hp1)
        for tr in trackers:
            _, ts = jax.eval_shape(lambda x, hp, tr=tr: tr.init(model, x, hp, t), x1, hp1)
            parts[type(tr).__name__] = estimate_bytes(
                lambda x, hp, st, tr=tr: tr.update(model, x, hp, st, t), x1, hp1, ts
            )
    else:
        step = as_traceable(model)
        parts["step"] = estimate_bytes(lambda x: step(x, t), jax.ShapeDtypeStruct((dim,), dtype))
    return MemoryEstimate(parts)


def _pass_rows(reference: np.ndarray, per_device: int, n_dev: int) -> list[np.ndarray]:
    """Split rows into passes of at most ``per_device`` rows on each of ``n_dev`` devices,
    keeping every reference group whole on one device."""
    passes, cur, sizes = [], [], []
    for rows in _groups(reference):
        if len(rows) > per_device:
            raise ValueError(
                f"memory_limit: a reference group of {len(rows)} replicas does not fit on one "
                f"device ({per_device} per device); use fewer perturbed replicas per group or "
                "more memory"
            )
        if cur and max(_assign([*sizes, len(rows)], n_dev)[1]) > per_device:
            passes.append(np.asarray(cur))
            cur, sizes = [], []
        cur += rows
        sizes.append(len(rows))
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

    return ReplicaResults(
        steps=res[0].steps,
        records={k: cat([r.records[k] for r in res]) for k in res[0].records},
        final_state=cat([r.final_state for r in res]),
        diverged_step=cat([r.diverged_step for r in res]),
        coords=coords,
        layer_names=res[0].layer_names,
        attrs=res[0].attrs,
    )


def distances_to_reference(results: ReplicaResults, name: str = "distance_l1") -> np.ndarray:
    """The perturbed replicas' distance records (members > 0), shape (n_perturbed_total, n_records)."""
    if name not in results.records:
        raise ValueError(f"{name}: not recorded; recorded: {sorted(results.records)}")
    return results.records[name][results.coords["member"] > 0]


__all__ = [
    "DISTRIBUTIONS",
    "GENERIC_OBSERVABLES",
    "TARGETS",
    "TRAINING_OBSERVABLES",
    "Checkpoint",
    "ReplicaBatch",
    "distances_to_reference",
    "make_replicas",
    "perturbation",
    "perturbation_mask",
    "run_replicas",
]
