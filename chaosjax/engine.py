"""The one engine: a batch of replicas advanced by one chunked driver, watched by observers.

Every analysis of a trajectory runs here. A chunk is one jitted ``lax.scan`` over records
(each a ``lax.scan`` over ``record_every`` steps) of the vmapped flow of a map
(:class:`chaosjax.Map`); observers (:class:`chaosjax.Observer`) advance inside the same chunk,
on the very states the run records: tangents and replica distances after every step,
expensive trackers (Lanczos) at every record. Between chunks the host gathers the records
(float64), updates the progress bar, appends to a zarr stream and writes a checkpoint, so an
interrupted run resumes to the same arrays. A replica whose state or loss stops being finite
(or whose loss exceeds ``loss_bound``) is flagged with its step and frozen; its later records
are NaN and the rest of the batch goes on. The replica axis can be sharded over devices
(each reference group whole on one device, no collective in a chunk) and a batch that does
not fit runs in passes of whole reference groups.

The pieces, each in its own module:

* the run plan (:mod:`chaosjax._engine_plan`): records, axes, cadences, strategy — host code,
  every refusal, nothing compiled;
* the compiled program (:mod:`chaosjax._engine_program`): the first record and a chunk;
* where rows live (:mod:`chaosjax._engine_rows`) and the memory plan
  (:mod:`chaosjax._engine_memory`);
* the record buffer, the pass loop and its sinks (:mod:`chaosjax._engine_pass`), the
  checkpoint (:mod:`chaosjax._engine_checkpoint`).

:func:`run_replicas` (exported as :func:`chaosjax.run_replicas`) composes them;
:func:`chaosjax.lyapunov_spectrum`, :func:`chaosjax.twin_lyapunov` and
:func:`chaosjax.covariant_lyapunov_vectors` are thin calls of it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from chaosjax._engine_checkpoint import Checkpoint
from chaosjax._engine_memory import replica_memory
from chaosjax._engine_pass import RunPass, Sinks, coords_of, run_pass
from chaosjax._engine_plan import STRATEGY_RULE, default_strategy, plan_run
from chaosjax._engine_program import (
    DISTANCE_AXIS,
    DISTANCES,
    GENERIC_OBSERVABLES,
    TRAINING_OBSERVABLES,
)
from chaosjax._engine_rows import _merge_passes, device_layout, pass_rows, tracked_rows
from chaosjax._util import environment_info
from chaosjax.results import ReplicaResults, ZarrStream
from chaosjax.sharding import is_main_process, is_sharded, pass_path, plan_batches, replica_mesh


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
    plan = plan_run(
        model,
        replicas,
        steps=steps,
        record_every=record_every,
        observables=observables,
        custom_observables=custom_observables,
        trackers=trackers,
        distance_every=distance_every,
        chunk_steps=chunk_steps,
        loss_bound=loss_bound,
        state_bound=state_bound,
        t0=t0,
        strategy=strategy,
    )
    mesh = replica_mesh(devices)
    sharded = is_sharded(mesh)
    estimate = replica_memory(plan.model, replicas, plan.trackers, info=plan.info)
    memory = plan_batches(len(replicas), estimate, mesh, memory_limit=memory_limit)
    meta = {
        "environment": environment_info(),
        "dtype": str(replicas.states.dtype),
        "devices": int(mesh.devices.size),
        "processes": jax.process_count(),
        "memory_plan": memory.describe(),
        "replica_strategy": str(plan.strategy),
        **({"tangent_reason": plan.tangent_reason} if plan.tangent_reason else {}),
        **dict(attrs or {}),
    }
    capacity = memory.limit_bytes // max(memory.bytes_per_replica, 1)  # rows a device holds
    passes = pass_rows(replicas.reference, capacity, memory.n_devices if sharded else 1)
    main = is_main_process()
    stream = ZarrStream(store) if store and main else None
    bar = tqdm(
        total=plan.steps * len(passes),
        disable=not (progress and main),
        unit="step",
        desc=desc,
        dynamic_ncols=True,
    )
    t_start = time.perf_counter()
    try:
        if len(passes) == 1:
            sinks = Sinks(bool(store), stream, bar, on_chunk)
            result = run_pass(RunPass(plan, replicas, mesh, meta), checkpoint, resume, sinks)
        else:
            parts = []
            for i, rows in enumerate(passes):
                ck = pass_path(checkpoint, i) if checkpoint else None
                p = RunPass(plan, replicas.subset(rows), mesh, meta)
                parts.append(
                    (rows, run_pass(p, ck, resume, Sinks(bool(store), None, bar, on_chunk)))
                )
            result = _merge_passes(parts, len(replicas), coords_of(replicas))
            if stream is not None:
                stream.append(result.to_xarray())
    finally:
        bar.close()
    meta["wall_time_s"] = time.perf_counter() - t_start
    meta["passes"] = len(passes)
    if stream is not None:
        stream.finish()
    return result


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
