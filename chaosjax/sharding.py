"""Scale-out: the replica axis sharded over devices and processes, and memory planning.

Every batched driver (:func:`chaosjax.run_replicas`, the batched Lyapunov, twin and CLV
drivers and the curvature tracker inside a replica run) takes ``devices=`` and shards its
leading replica axis over a one-axis :func:`jax.make_mesh` mesh named ``"replica"`` with a
:class:`jax.sharding.NamedSharding`. The batch is padded to a multiple of the device count
with copies of its last row (the padding is computed and dropped); the chunks run on
device-resident arrays and only the recorded observables come back to the host.

Several processes (hosts) run the same program after :func:`initialize_distributed`
(JAX's multi-controller runtime, ``jax.distributed``): the mesh then spans every process's
devices, each process owns the rows on its devices, observables are gathered to every
process, process 0 alone writes stores and shows progress, and each process checkpoints
its own rows (``NAME.p{i}of{n}.npz``) so a run resumes process by process.

Memory planning (:func:`estimate_bytes`, :func:`plan_batches`) estimates the device memory
one replica needs (state, tangents or Krylov vectors, and the intermediates of one step,
from the step's jaxpr) and splits a batch that does not fit into passes run one after
another, or refuses a run in which a single replica per device does not fit.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "replica"


# ---------------------------------------------------------------------------------------------
# meshes and placement


def replica_mesh(devices: int | Sequence | Mesh | None = None) -> Mesh:
    """A one-axis mesh ``("replica",)`` over the devices that share a replica batch.

    Args:
        devices: ``None`` (the default: every local device of every process on an
            accelerator; one device on the CPU backend, where forced devices share the cores
            and multi-device programs are opt-in), an int ``n`` (the first ``n`` local devices
            of each process), a sequence of :class:`jax.Device`, or a ready
            :class:`~jax.sharding.Mesh` (returned as is; its first axis is used).

    Returns:
        A :class:`jax.sharding.Mesh` with one axis named ``"replica"`` (automatic axis type,
        so vmapped code is partitioned by the compiler).
    """
    if isinstance(devices, Mesh):
        return devices
    everything = jax.devices()
    cores = os.cpu_count() or 1
    on_cpu = everything[0].platform == "cpu"
    n_local = jax.local_device_count()
    if devices is None:
        # forced CPU devices share the cores (no speed-up over one device's threads), and
        # XLA's CPU runtime has aborted intermittently on multi-device programs under load:
        # sharding on the CPU backend is asked for with an explicit count
        devices = 1 if on_cpu else n_local
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if not 1 <= int(devices) <= n_local:
            raise ValueError(
                f"devices: must be between 1 and {n_local} (the local devices of this "
                f"process), got {devices}"
            )
        if on_cpu and int(devices) > cores:
            warnings.warn(
                f"devices: {devices} CPU devices on {cores} cores; XLA's CPU runtime can hang "
                "when more device programs than cores run LAPACK calls (curvature tracking, "
                "QR), and forced CPU devices share the cores anyway",
                stacklevel=2,
            )
        devs = []
        for p in range(jax.process_count()):
            devs += [d for d in everything if d.process_index == p][: int(devices)]
    elif (
        isinstance(devices, Sequence)
        and devices
        and all(isinstance(d, jax.Device) for d in devices)
    ):
        devs = list(devices)
    else:
        raise TypeError(
            f"devices: expected None, a device count, a list of jax devices or a Mesh, got {devices!r}"
        )
    return jax.make_mesh(
        (len(devs),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devs
    )


def mesh_size(mesh: Mesh) -> int:
    """Number of devices along the replica axis."""
    return int(mesh.devices.shape[0])


def is_sharded(mesh: Mesh | None) -> bool:
    """True when the mesh spreads work over more than one device (or several processes)."""
    return mesh is not None and (mesh_size(mesh) > 1 or jax.process_count() > 1)


def row_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (replica) axis split over the mesh, other axes whole."""
    return NamedSharding(mesh, P(AXIS))


def padded_size(n: int, mesh: Mesh) -> int:
    """The smallest multiple of the mesh size that holds ``n`` rows."""
    m = mesh_size(mesh)
    return -(-int(n) // m) * m


def pad_rows(tree, n_total: int):
    """Pad every leaf's leading axis to ``n_total`` with copies of its last row (host numpy)."""

    def pad(x):
        x = np.asarray(x)
        extra = n_total - x.shape[0]
        if extra <= 0:
            return x
        return np.concatenate([x, np.repeat(x[-1:], extra, axis=0)], axis=0)

    return jax.tree_util.tree_map(pad, tree)


def put_rows(tree, mesh: Mesh):
    """Place host arrays (identical on every process) with their leading axis sharded.

    The leading axis must already be a multiple of the mesh size (see :func:`pad_rows`).
    Works across processes: each process fills only the shards of its own devices.
    """
    sharding = row_sharding(mesh)
    m = mesh_size(mesh)

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % m:
            raise ValueError(
                f"put_rows: leading axis {x.shape[:1]} is not a multiple of the {m} devices"
            )
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree_util.tree_map(put, tree)


def gather(tree):
    """Bring a pytree of (possibly sharded, possibly multi-process) arrays to host numpy.

    Every process receives the full arrays (an all-gather across processes when needed).
    """

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(get, tree)


def local_rows(x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a row-sharded array held by this process: (global row indices, data)."""
    n = x.shape[0]
    seen: dict[int, np.ndarray] = {}
    for shard in x.addressable_shards:
        rows = np.arange(n)[shard.index[0]]
        data = np.asarray(shard.data)
        for i, r in enumerate(rows):
            seen.setdefault(int(r), data[i])
    rows = np.asarray(sorted(seen), np.int64)
    return rows, np.stack([seen[int(r)] for r in rows]) if len(rows) else np.zeros((0,))


def from_local_rows(rows: np.ndarray, data: np.ndarray, shape: tuple, mesh: Mesh) -> jax.Array:
    """Rebuild a row-sharded global array from this process's rows (see :func:`local_rows`)."""
    rows = np.asarray(rows)
    data = np.asarray(data)

    def cb(idx):
        want = np.arange(shape[0])[idx[0]]
        pos = np.searchsorted(rows, want)
        if np.any(pos >= len(rows)) or np.any(rows[np.minimum(pos, len(rows) - 1)] != want):
            raise ValueError("resume: this process's checkpoint lacks rows it now owns")
        return data[pos][(slice(None), *tuple(idx[1:]))]

    return jax.make_array_from_callback(tuple(shape), row_sharding(mesh), cb)


def is_main_process() -> bool:
    """True on process 0 (the one that writes stores and shows progress)."""
    return jax.process_index() == 0


def process_path(path: str | os.PathLike) -> Path:
    """A per-process file name (``NAME.p{i}of{n}.npz``) when several processes run."""
    path = Path(path)
    if jax.process_count() == 1:
        return path
    return path.with_name(f"{path.stem}.p{jax.process_index()}of{jax.process_count()}{path.suffix}")


def pass_path(path: str | os.PathLike, i: int) -> Path:
    """The checkpoint of pass ``i`` of a batch run in passes (``NAME.pass{i}.npz``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.pass{i}{path.suffix}")


def donating_jit(fn: Callable, static_argnames=(), donate_argnums=()) -> Callable:
    """``jax.jit`` that donates ``donate_argnums`` (the big (batch, dim) / (batch, dim, k)
    carries) on accelerators; the CPU backend does not support donation and gets the plain
    jit. Callers must not reuse the donated arguments."""
    plain = jax.jit(fn, static_argnames=static_argnames)
    donating = jax.jit(fn, static_argnames=static_argnames, donate_argnums=donate_argnums)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return (plain if jax.default_backend() == "cpu" else donating)(*args, **kwargs)

    return call


def initialize_distributed(
    coordinator_address: str,
    num_processes: int,
    process_id: int,
    *,
    local_device_ids: Sequence[int] | None = None,
    cpu_collectives: str = "gloo",
) -> None:
    """Join a multi-process run (``jax.distributed.initialize``), before any other JAX call.

    Args:
        coordinator_address: ``host:port`` of process 0.
        num_processes: number of processes.
        process_id: this process's index in ``[0, num_processes)``.
        local_device_ids: the accelerators this process uses (default: all visible).
        cpu_collectives: CPU cross-process collectives (``"gloo"``); GPUs use NCCL.
    """
    if int(num_processes) < 1:
        raise ValueError(f"num_processes: must be >= 1, got {num_processes}")
    if not 0 <= int(process_id) < int(num_processes):
        raise ValueError(
            f"process_id: must be in [0, {num_processes}) for num_processes={num_processes}, "
            f"got {process_id}"
        )
    if cpu_collectives not in ("gloo", "mpi"):
        raise ValueError(f"cpu_collectives: unknown {cpu_collectives!r}; allowed: gloo, mpi")
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=int(num_processes),
        process_id=int(process_id),
        local_device_ids=local_device_ids,
    )


# ---------------------------------------------------------------------------------------------
# memory planning


def _aval_bytes(aval) -> int:
    shape = getattr(aval, "shape", None)
    dtype = getattr(aval, "dtype", None)
    if shape is None or dtype is None:
        return 0
    try:
        itemsize = np.dtype(dtype).itemsize
    except TypeError:  # PRNG key types and other extended dtypes
        itemsize = 8
    return int(math.prod(shape)) * itemsize


def _sub_jaxprs(params):
    for v in params.values():
        items = v if isinstance(v, (tuple, list)) else (v,)
        for it in items:
            if isinstance(it, jax.extend.core.ClosedJaxpr):
                yield it.jaxpr
            elif isinstance(it, jax.extend.core.Jaxpr):
                yield it


def jaxpr_primitives(jaxpr) -> set[str]:
    """Names of every primitive in ``jaxpr`` and its sub-jaxprs (scans, conds, pjit calls)."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in _sub_jaxprs(eqn.params):
            names |= jaxpr_primitives(sub)
    return names


def _jaxpr_bytes(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += sum(_aval_bytes(v.aval) for v in eqn.outvars)
        for sub in _sub_jaxprs(eqn.params):
            total += _jaxpr_bytes(sub)
    return total


def estimate_bytes(fn: Callable, *args) -> int:
    """Device memory of one call of ``fn(*args)``: its arguments plus every intermediate.

    Every value the traced program creates is counted once (a loop body once), so this is
    an upper estimate of the peak that does not depend on the backend (XLA reuses buffers,
    so the measured peak is usually lower). ``args`` may be arrays or
    :class:`jax.ShapeDtypeStruct` placeholders.
    """
    closed = jax.make_jaxpr(fn)(*args)
    arg_bytes = sum(_aval_bytes(v.aval) for v in closed.jaxpr.invars)
    return int(arg_bytes + _jaxpr_bytes(closed.jaxpr))


def device_memory_limit(device=None, fraction: float = 0.8) -> int:
    """Bytes a run may use on one device: ``fraction`` of the accelerator's limit, or of the
    host's physical memory shared by the local CPU devices."""
    device = device or jax.local_devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(fraction * stats["bytes_limit"])
    try:
        host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX hosts
        host = 8 * 2**30
    n_cpu_devices = max(1, sum(1 for d in jax.local_devices() if d.platform == "cpu"))
    return int(fraction * host / n_cpu_devices)


def parse_bytes(value) -> int | None:
    """``None``, an int of bytes, or a string such as ``"512MiB"`` / ``"2 GB"`` → bytes."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"memory_limit: must be > 0 bytes, got {value}")
        return int(value)
    if isinstance(value, str):
        s = value.strip().replace(" ", "")
        if s.isdigit() and int(s) > 0:
            return int(s)
        units = {
            "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
            "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1,
        }  # fmt: skip
        for u, mult in units.items():
            if s.endswith(u):
                try:
                    v = float(s[: -len(u)])
                except ValueError:
                    break
                if v > 0:
                    return int(v * mult)
                break
    raise ValueError(
        f"memory_limit: expected a positive number of bytes or a size like '2GiB', got {value!r}"
    )


class MemoryEstimate(NamedTuple):
    """Device memory of one replica, by part (bytes)."""

    parts: dict

    @property
    def per_replica(self) -> int:
        return int(sum(self.parts.values()))

    def describe(self) -> str:
        inner = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.parts.items())
        return f"{fmt_bytes(self.per_replica)} per replica ({inner})"


class BatchPlan(NamedTuple):
    """How a replica batch runs: ``per_device`` rows per device in each of ``n_passes``."""

    n_replicas: int
    n_devices: int
    per_device: int
    n_passes: int
    bytes_per_replica: int
    limit_bytes: int

    @property
    def batch(self) -> int:
        return self.per_device * self.n_devices

    def describe(self) -> str:
        return (
            f"{self.n_replicas} replicas on {self.n_devices} device(s): {self.per_device} per "
            f"device per pass, {self.n_passes} pass(es); estimate "
            f"{fmt_bytes(self.bytes_per_replica)} per replica, "
            f"{fmt_bytes(self.bytes_per_replica * self.per_device)} of "
            f"{fmt_bytes(self.limit_bytes)} per device"
        )


def fmt_bytes(n: float) -> str:
    """Human-readable bytes (binary units)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


def plan_batches(
    n_replicas: int,
    estimate: MemoryEstimate | int,
    mesh: Mesh,
    *,
    memory_limit=None,
    what: str = "replica",
) -> BatchPlan:
    """Choose the rows per device so a batch fits; split into passes or refuse.

    Args:
        n_replicas: rows in the whole batch.
        estimate: a :class:`MemoryEstimate` or bytes per replica.
        mesh: the replica mesh.
        memory_limit: bytes (or ``"8GiB"``) usable per device; default
            :func:`device_memory_limit`.
        what: the name used in the refusal message.

    Raises:
        ValueError: when a single replica per device does not fit (the message names the
            estimate and the limit).
    """
    per = estimate.per_replica if isinstance(estimate, MemoryEstimate) else int(estimate)
    limit = parse_bytes(memory_limit) or device_memory_limit(mesh.devices.flat[0])
    n_dev = mesh_size(mesh)
    fits = limit // max(per, 1)
    if fits < 1:
        detail = estimate.describe() if isinstance(estimate, MemoryEstimate) else fmt_bytes(per)
        raise ValueError(
            f"memory: one {what} needs about {detail}, more than the "
            f"{fmt_bytes(limit)} available per device; use fewer tangent or Krylov vectors, a "
            "smaller model or float32, or raise memory_limit"
        )
    need = -(-int(n_replicas) // n_dev)
    per_device = int(min(need, fits))
    n_passes = -(-need // per_device)
    return BatchPlan(int(n_replicas), n_dev, per_device, int(n_passes), per, int(limit))


__all__ = [
    "AXIS",
    "BatchPlan",
    "MemoryEstimate",
    "device_memory_limit",
    "estimate_bytes",
    "fmt_bytes",
    "from_local_rows",
    "gather",
    "initialize_distributed",
    "is_main_process",
    "is_sharded",
    "local_rows",
    "mesh_size",
    "padded_size",
    "parse_bytes",
    "plan_batches",
    "process_path",
    "put_rows",
    "replica_mesh",
    "row_sharding",
]
