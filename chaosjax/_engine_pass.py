"""One pass of a run through a batch of replicas: rows placed on the devices, the first record
(or a checkpoint restored), chunk after chunk of the compiled program, the records gathered to
the host in float64, and what each chunk hands its sinks (zarr stream, progress bar,
``on_chunk``) and the checkpoint.

:class:`RecordBuffer` holds the records of a pass; :class:`RunPass` places rows and turns
device values into host records; :func:`run_pass` is the loop; :class:`Sinks` receives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from chaosjax._engine_checkpoint import Checkpoint, pack_tree, unpack_tree
from chaosjax._engine_plan import RunPlan
from chaosjax._engine_program import _chunk_jit, _first_jit, _sharded_fns
from chaosjax._engine_rows import _RowLayout
from chaosjax._util import dumps
from chaosjax.results import ReplicaResults, ZarrStream
from chaosjax.sharding import gather, is_sharded, mesh_size, process_path, put_rows


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


class RecordBuffer:
    """The records of a pass so far, on the host: per record a list of (R, n, ...) float64
    blocks, per observer axis its steps, and the record steps."""

    def __init__(self):
        self.records: dict[str, list[np.ndarray]] = {}
        self.axes: dict[str, list[np.ndarray]] = {}
        self.steps: list[np.ndarray] = []

    def merge(self, records: dict[str, np.ndarray], axes: dict[str, Any]) -> None:
        for name, v in records.items():
            self.records.setdefault(name, []).append(v)
        for axis, st in axes.items():
            self.axes.setdefault(axis, []).append(np.asarray(st, np.int64))

    def arrays(self) -> dict[str, np.ndarray]:
        """The buffer as checkpoint arrays."""
        out = {"rec_steps": np.concatenate(self.steps)}
        for k, v in self.records.items():
            out[f"record__{k}"] = np.concatenate(v, axis=1)
        for k, v in self.axes.items():
            out[f"axis__{k}"] = np.concatenate(v)
        return out

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.steps = [arrays["rec_steps"]]
        for k in arrays:
            if k.startswith("record__"):
                self.records[k[len("record__") :]] = [arrays[k]]
            elif k.startswith("axis__"):
                self.axes[k[len("axis__") :]] = [arrays[k]]


def stored(records: dict, transient) -> dict:
    """The records written to a store (transient ones stay in memory and checkpoints)."""
    return {k: v for k, v in records.items() if k not in transient}


@dataclasses.dataclass
class Sinks:
    """Where a pass's chunks go: a zarr stream (main process), a progress bar, ``on_chunk``.
    ``store``: a store was asked for (host gathers are collectives: every process takes part,
    whether or not it writes)."""

    store: bool
    stream: ZarrStream | None
    bar: Any
    on_chunk: Callable[[int], None] | None

    def write(self, make_result: Callable[[], ReplicaResults]) -> None:
        if self.stream is not None:
            self.stream.append(make_result().to_xarray())


class RunPass:
    """The rows of one pass placed on the run's devices, and the host side of its records."""

    def __init__(self, plan: RunPlan, batch, mesh, meta: dict):
        self.plan, self.batch, self.mesh, self.meta = plan, batch, mesh, meta
        self.sharded = is_sharded(mesh)
        self.n_dev = mesh_size(mesh) if self.sharded else 1
        self.R = len(batch)
        self.dim = int(batch.states.shape[1])
        self.row_sets = plan.row_sets(batch.reference)
        self.lay = _RowLayout(batch.reference, self.n_dev, self.row_sets)
        self.which_of = {  # the row space of every record: None = every row
            name: (None if self.row_sets[i] is None else i)
            for name, (i, _) in plan.rec_specs.items()
        }
        lay = self.lay
        self.ref = put_rows(lay.local_ref, mesh) if self.sharded else jnp.asarray(lay.local_ref)
        self.hp = jax.tree_util.tree_map(self.place, batch.hparams)
        self.track = tuple(self._place_track(i) for i in range(len(plan.trackers)))
        self.coords = coords_of(batch)
        self.buf = RecordBuffer()

    # -- devices ----------------------------------------------------------------------------

    def place(self, x):
        """Host rows (R, ...) → device rows (Rp, ...) in the device layout."""
        x = np.asarray(x)[self.lay.perm]
        return put_rows(x, self.mesh) if self.sharded else jnp.asarray(x)

    def _place_track(self, i):
        idx, valid, _, _ = self.lay.tracks[i]
        if self.sharded:
            return put_rows(idx, self.mesh), put_rows(valid, self.mesh)
        return jnp.asarray(idx), jnp.asarray(valid)

    def host(self, x) -> np.ndarray:
        """Device rows → host rows (R, ...), original order, on every process."""
        return gather(x)[self.lay.pos]

    def carried(self, state) -> list[np.ndarray]:
        return [self.host(c) for c in jax.tree_util.tree_leaves(state[1])]

    def call(self, which: int, n: int, args):
        """The compiled first record (0) or a chunk of ``n`` steps (1)."""
        spec = self.plan.spec(n, self.dim)
        if self.sharded:
            return _sharded_fns(self.mesh, spec)[which](*args)
        return (_first_jit, _chunk_jit)[which](*args, spec=spec)

    def fingerprint(self) -> str:
        """What a checkpoint must have been written for."""
        p, b = self.plan, self.batch
        return dumps(
            {
                "steps": p.steps,
                "record_every": p.record_every,
                "distance_every": p.distance_every,
                "chunk_steps": p.chunk_steps,
                "strategy": str(p.strategy),
                "t0": int(p.t0),
                "observables": p.observables,
                "custom": [c[0] for c in p.custom],
                "trackers": [repr(tr) for tr in p.trackers],
                "R": self.R,
                "padded": self.lay.Rp,
                "processes": jax.process_count(),
                "shape": list(b.states.shape),
                "coords": {k: np.asarray(v).tolist() for k, v in b.coords.items()},
                "state_sum": float(np.asarray(b.states, np.float64).sum()),
            }
        )

    # -- host records -----------------------------------------------------------------------

    def to_host(self, vals, steps_here=None, rec_at=None):
        """Device values → host rows: record-cadence values (at the record steps ``rec_at``)
        or the per-step values of a chunk (at ``steps_here``), kept at the steps of their
        axes. Returns ``({name: (R, n, ...)}, {axis: steps})``."""
        out, axes = {}, {}
        lay, plan = self.lay, self.plan
        for name, v in vals.items():
            v = np.asarray(v, np.float64)
            which = self.which_of.get(name)
            axis = plan.axis_of(name)
            if steps_here is None:  # (n_records, rows, ...)
                out[name] = lay.to_rows(np.moveaxis(v, 1, 0), which)
                if axis != "step":  # a record-cadence value kept at its own axis' steps
                    sel = np.isin(rec_at, plan.axes[axis])
                    out[name] = out[name][:, sel]
                    axes[axis] = rec_at[sel]
                continue
            v = v.reshape(-1, *v.shape[2:])  # (n_rec·record_every, rows, ...)
            v = lay.to_rows(np.moveaxis(v, 1, 0), which)
            sel = np.isin(steps_here, plan.axes[axis])
            out[name] = v if sel.all() else v[:, sel]
            axes[axis] = steps_here[sel]
        return out, axes

    def snapshots(self, t, state, tstates):
        """Records of the observers that read their state at step t (CLV bases, states kept
        for later analyses): ``({name: (R, 1, ...)}, {axis: [t]})``."""
        out, axes = {}, {}
        xs = None
        lay, plan = self.lay, self.plan
        for i, tr in enumerate(plan.trackers):
            if t not in tr.snapshot_steps(plan.info):
                continue
            if xs is None:
                xs = gather(state[0])
            idx = np.minimum(np.asarray(lay.tracks[i][0]), lay.B - 1)
            blocks = np.repeat(np.arange(self.n_dev), len(idx) // self.n_dev) * lay.B
            which = None if self.row_sets[i] is None else i
            vals = tr.snapshot(plan.info, t, gather(tstates[i]), xs[blocks + idx])
            for name, v in vals.items():
                out[name] = lay.to_rows(np.asarray(v, np.float64), which)[:, None]
                axes[plan.rec_specs[name][1].axis] = [t]
        return out, axes

    def result(self, rec_steps, records, axes, states, div_step, carry) -> ReplicaResults:
        return ReplicaResults(
            steps=np.concatenate(rec_steps),
            records={k: np.concatenate(v, axis=1) for k, v in records.items()},
            final_state=np.asarray(states),
            diverged_step=np.asarray(div_step),
            coords=self.coords,
            layer_names=self.plan.layer_names,
            attrs=self.meta,
            dims=self.plan.dims,
            axes={k: np.concatenate(v) for k, v in axes.items()},
            final_carry=tuple(np.asarray(c) for c in carry),
            transient=self.plan.transient,
        )

    def buffered(self, states, div_step, carry) -> ReplicaResults:
        """Everything buffered so far (stored records only) with these final states."""
        b = self.buf
        return self.result(
            b.steps, stored(b.records, self.plan.transient), b.axes, states, div_step, carry
        )

    # -- the run ----------------------------------------------------------------------------

    def _t32(self, t):
        return jnp.asarray(t, jnp.int32)

    def start(self):
        """The first record: ``(t0, state, observer states)``; the buffer holds record 0."""
        plan, R = self.plan, self.R
        t = int(plan.t0)
        state = (
            self.place(self.batch.states),
            jax.tree_util.tree_map(self.place, self.batch.carry),
            self.place(np.ones((R,), bool)),
            self.place(np.full((R,), -1, np.int32)),
        )
        args = (plan.model, self.hp, self.ref, state, self._t32(t), self.track)
        obs0, tstates = self.call(0, plan.record_every, args)
        first = {name: np.asarray(v)[None] for name, v in gather(obs0).items()}
        first, first_axes = self.to_host(first, rec_at=np.asarray([t]))
        first_axes = {**{axis: np.zeros(0, np.int64) for axis in plan.axes}, **first_axes}
        for tr in plan.trackers:
            first.update(tr.empty_host_records(R, 1))
        snap, snap_axes = self.snapshots(t, state, tstates)
        first.update(snap)
        first_axes.update(snap_axes)
        self.buf.steps = [np.asarray([t])]
        self.buf.merge(first, first_axes)
        return t, state, tstates

    def restore(self, ckpt: Checkpoint):
        """``(t, state, observer states)`` of a checkpoint; the buffer holds its records."""
        plan, lay = self.plan, self.lay
        t, arrays = ckpt.load(self.fingerprint())
        like_state = (
            jax.ShapeDtypeStruct((lay.Rp, self.dim), self.batch.states.dtype),
            jax.tree_util.tree_map(
                lambda c: jax.ShapeDtypeStruct((lay.Rp, *np.shape(c)[1:]), np.asarray(c).dtype),
                self.batch.carry,
            ),
            jax.ShapeDtypeStruct((lay.Rp,), bool),
            jax.ShapeDtypeStruct((lay.Rp,), np.int32),
        )
        state = unpack_tree(arrays, "state", like_state, self.mesh, self.sharded)
        args = (plan.model, self.hp, self.ref, state, self._t32(t), self.track)
        like_ts = jax.eval_shape(lambda: self.call(0, plan.record_every, args))[1]
        tstates = unpack_tree(arrays, "tracker", like_ts, self.mesh, self.sharded)
        self.buf.restore(arrays)
        return t, state, tstates

    def advance(self, t, state, tstates):
        """One chunk from step t: ``(t′, n, state, observer states, new record steps, chunk
        records, their axes)``; the buffer holds them too."""
        plan = self.plan
        n = plan.next_chunk(t)
        args = (plan.model, self.hp, self.ref, state, tstates, self._t32(t), self.track)
        (state, tstates), (obs, fine) = self.call(1, n, args)
        obs, fine = gather(obs), gather(fine)  # the only device → host transfer
        new_steps = t + plan.record_every * (1 + np.arange(n // plan.record_every))
        chunk, chunk_axes = self.to_host(obs, rec_at=new_steps)
        fine_vals, fine_axes = self.to_host(fine, t + 1 + np.arange(n))
        for tr in plan.trackers:
            chunk.update(tr.host_records(plan.info, fine_vals, fine_axes, new_steps))
        chunk.update(fine_vals)
        chunk_axes.update(fine_axes)
        t += n
        snap, snap_axes = self.snapshots(t, state, tstates)
        chunk.update(snap)
        chunk_axes.update(snap_axes)
        self.buf.merge(chunk, chunk_axes)
        self.buf.steps.append(new_steps)
        return t, n, state, tstates, new_steps, chunk, chunk_axes

    def final(self, state, tstates) -> ReplicaResults:
        """The pass's results (every record) with the observers' final states per row."""
        b = self.buf
        host = self.host
        res = self.result(
            b.steps, b.records, b.axes, host(state[0]), host(state[3]), self.carried(state)
        )
        ts_host = gather(tstates)
        res.tracker_states = [
            jax.tree_util.tree_map(
                lambda a, i=i: (
                    self.lay.to_rows(np.asarray(a), None if self.row_sets[i] is None else i)
                    if np.ndim(a)
                    else a
                ),
                ts_host[i],
            )
            for i in range(len(self.plan.trackers))
        ]
        return res


def run_pass(p: RunPass, checkpoint, resume: bool, sinks: Sinks) -> ReplicaResults:
    """Run one pass to its end: start (or resume from ``checkpoint``), then chunk after chunk,
    each handed to the sinks and saved in the checkpoint before the next."""
    ckpt = Checkpoint(process_path(checkpoint)) if checkpoint else None
    plan = p.plan
    resumed = bool(resume and ckpt is not None and ckpt.exists())
    if resumed:
        t, state, tstates = p.restore(ckpt)
        if sinks.store:  # gathers are collectives: every process takes part
            now = (p.host(state[0]), p.host(state[3]), p.carried(state))
            sinks.write(lambda: p.buffered(*now))
    else:
        t, state, tstates = p.start()
        carry0 = [np.asarray(c) for c in jax.tree_util.tree_leaves(p.batch.carry)]
        sinks.write(
            lambda: p.buffered(np.asarray(p.batch.states), np.full(p.R, -1, np.int32), carry0)
        )
    if sinks.bar is not None:
        sinks.bar.update(t - int(plan.t0))
    fingerprint = p.fingerprint() if ckpt is not None else ""
    while t < plan.t0 + plan.steps:
        t, n, state, tstates, new_steps, chunk, chunk_axes = p.advance(t, state, tstates)
        if sinks.store:
            now = (p.host(state[0]), p.host(state[3]), p.carried(state))
            sinks.write(
                lambda now=now, s=new_steps, c=chunk, ca=chunk_axes: p.result(
                    [s],
                    {k: [v] for k, v in stored(c, plan.transient).items()},
                    {k: [v] for k, v in ca.items()},
                    *now,
                )
            )
        if ckpt is not None:
            arrays = {**pack_tree("state", state), **pack_tree("tracker", tstates)}
            ckpt.save(fingerprint, t, {**arrays, **p.buf.arrays()})
        if sinks.bar is not None:
            sinks.bar.update(n)
            sinks.bar.set_postfix(alive=f"{int(p.host(state[2]).sum())}/{p.R}")
        if sinks.on_chunk is not None:
            sinks.on_chunk(t)
    p.meta["resumed"] = max(int(resumed), int(p.meta.get("resumed", 0)))
    return p.final(state, tstates)


__all__ = ["RecordBuffer", "RunPass", "Sinks", "coords_of", "run_pass", "stored"]
