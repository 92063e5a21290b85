"""Results: an in-memory pytree with a leading replica axis, xarray views and zarr stores.

Stores are written with xarray's zarr backend (no pickle anywhere). A running experiment
appends each chunk's records to its store (:class:`ZarrStream`); the finished result is then
rewritten atomically (temporary folder, then rename), so a store that says ``complete = 1``
is always whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import xarray as xr

from chaosjax._util import dumps

#: extra dimension names of the engine's own observables (trackers declare theirs: ``DIMS``).
OBSERVABLE_DIMS = {
    "layer_norm": ("layer",),
    "layer_distance": ("layer",),
    "layer_distance_l1": ("layer",),
}


@dataclasses.dataclass
class ReplicaResults:
    """Recorded observables of a replica run.

    Every record has a leading replica axis and a time axis: ``step`` (the record cadence,
    steps t0, t0 + record_every, …) unless its ``dims`` name another axis (an observer's own
    cadence, e.g. ``renorm`` for per-renormalisation log growth or ``distance_step`` for
    distances recorded every step), whose steps are in ``axes``.

    Attributes:
        steps: record times, shape (n_records,).
        records: {name: array (replicas, n_times, ...)} (NaN after a replica diverged, and for
            replicas an observer does not track).
        final_state: states after the last step, shape (replicas, dim) (the dynamical float
            coordinates).
        diverged_step: (replicas,) step at which a replica diverged, −1 if it never did.
        coords: {name: array (replicas,)} per-replica labels (seed, learning_rate, eps, member,
            reference, …).
        layer_names: names of the layers of ``layer_distance`` records.
        attrs: JSON-serialisable metadata (config, versions, device, dtype, runtime).
        dims: {name: (time axis, *extra dims)} for records not on ``("step", ...)``.
        axes: {time axis: steps} of every time axis other than ``step``.
        final_carry: the carried leaves of the final states (integer counters, keys, running
            statistics), each with a leading replica axis; empty when nothing is carried.
        transient: names of records kept in memory but not written to stores (e.g. the R
            factors of a CLV forward pass).
        tracker_states: the observers' final states (host arrays, replica rows; not stored).
    """

    steps: np.ndarray
    records: dict[str, np.ndarray]
    final_state: np.ndarray
    diverged_step: np.ndarray
    coords: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    layer_names: tuple[str, ...] = ()
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)
    dims: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    axes: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    final_carry: tuple = ()
    transient: tuple[str, ...] = ()
    tracker_states: list = dataclasses.field(default_factory=list, repr=False)

    @property
    def n_replicas(self) -> int:
        return int(self.final_state.shape[0])

    @property
    def diverged(self) -> np.ndarray:
        return self.diverged_step >= 0

    def dims_of(self, name: str) -> tuple[str, ...]:
        """(time axis, *extra dims) of a record."""
        if name in self.dims:
            return tuple(self.dims[name])
        arr = self.records[name]
        extra = OBSERVABLE_DIMS.get(name, ())
        extra = extra + tuple(f"{name}_{i}" for i in range(arr.ndim - 2 - len(extra)))
        return ("step", *extra)

    def steps_of(self, name: str) -> np.ndarray:
        """The steps of a record's time axis (``steps`` for records at the record cadence)."""
        if name not in self.records:
            raise ValueError(f"{name}: not recorded; recorded: {sorted(self.records)}")
        axis = self.dims_of(name)[0]
        return np.asarray(self.steps if axis == "step" else self.axes[axis])

    def at_records(self, name: str) -> np.ndarray:
        """A record at the record steps ``steps`` (a record on a finer axis, e.g. distances
        every step, is sampled there; NaN where its axis has no such step)."""
        t = self.steps_of(name)
        arr = np.asarray(self.records[name])
        if np.array_equal(t, self.steps):
            return arr
        pos = np.searchsorted(t, self.steps)
        hit = (pos < t.size) & (t[np.minimum(pos, t.size - 1)] == self.steps)
        out = np.full((arr.shape[0], self.steps.size, *arr.shape[2:]), np.nan)
        out[:, hit] = arr[:, pos[hit]]
        return out

    def to_xarray(self) -> xr.Dataset:
        """An ``xarray.Dataset`` with dims ``replica``, ``step`` (and every other time axis,
        ``layer``, ``dim``); transient records are left out."""
        data_vars = {}
        for name, arr in self.records.items():
            if name in self.transient:
                continue
            data_vars[name] = (("replica", *self.dims_of(name)), np.asarray(arr))
        data_vars["final_state"] = (("replica", "dim"), np.asarray(self.final_state))
        data_vars["diverged_step"] = (("replica",), np.asarray(self.diverged_step, np.int64))
        for i, leaf in enumerate(self.final_carry):
            leaf = np.asarray(leaf)
            dims = ("replica", *(f"final_carry_{i}_{j}" for j in range(leaf.ndim - 1)))
            data_vars[f"final_carry_{i}"] = (dims, leaf)
        coords = {"replica": np.arange(self.n_replicas), "step": np.asarray(self.steps, np.int64)}
        for axis, st in self.axes.items():
            coords[axis] = np.asarray(st, np.int64)
        for k, v in self.coords.items():
            coords[k] = ("replica", np.asarray(v))
        if "learning_rate" in self.coords and "eta" not in self.coords:
            coords["eta"] = ("replica", np.asarray(self.coords["learning_rate"]))  # alias η
        if self.layer_names:
            coords["layer"] = np.asarray(self.layer_names, dtype=str)
        attrs = {
            k: (v if isinstance(v, str | int | float) else dumps(v)) for k, v in self.attrs.items()
        }
        return xr.Dataset(data_vars, coords=coords, attrs=attrs)

    @classmethod
    def from_xarray(cls, ds: xr.Dataset) -> ReplicaResults:
        skip = {"final_state", "diverged_step"}
        carry_names = sorted(
            (k for k in ds.data_vars if str(k).startswith("final_carry_")),
            key=lambda k: int(str(k).rsplit("_", 1)[1]),
        )
        records, dims = {}, {}
        for k, v in ds.data_vars.items():
            if k in skip or k in carry_names:
                continue
            records[k] = np.asarray(v.values)
            if len(v.dims) >= 2 and v.dims[1] != "step":
                dims[k] = tuple(v.dims[1:])
        axes = {
            str(d): np.asarray(ds[d].values)
            for d in ds.dims
            if d not in ("replica", "step")
            and any(len(v.dims) >= 2 and v.dims[1] == d for v in ds.data_vars.values())
        }
        coords = {
            k: np.asarray(v.values)
            for k, v in ds.coords.items()
            if k not in ("replica", "step", "layer") and v.dims == ("replica",)
        }
        if "learning_rate" in coords:
            coords.pop("eta", None)
        attrs = {}
        for k, v in ds.attrs.items():
            if isinstance(v, str) and v[:1] in "[{":
                try:
                    v = json.loads(v)
                except json.JSONDecodeError:
                    pass
            attrs[k] = v
        layers = tuple(str(x) for x in ds["layer"].values) if "layer" in ds.coords else ()
        return cls(
            steps=np.asarray(ds["step"].values),
            records=records,
            final_state=np.asarray(ds["final_state"].values),
            diverged_step=np.asarray(ds["diverged_step"].values),
            coords=coords,
            layer_names=layers,
            attrs=attrs,
            dims=dims,
            axes=axes,
            final_carry=tuple(np.asarray(ds[k].values) for k in carry_names),
        )

    def save(self, path: str | os.PathLike, groups: dict[str, xr.Dataset] | None = None) -> Path:
        """Write atomically to a zarr store at ``path`` (replacing an existing store), with
        optional analysis datasets as named groups."""
        return write_zarr_atomic(self.to_xarray(), path, groups=groups)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReplicaResults:
        """Load a store written by :meth:`save` or by a run."""
        return cls.from_xarray(open_store(path))

    def select(self, **coords) -> np.ndarray:
        """Boolean mask (replicas,) of replicas whose coords equal the given values."""
        mask = np.ones(self.n_replicas, bool)
        for k, v in coords.items():
            if k not in self.coords:
                raise ValueError(
                    f"select: unknown coordinate {k!r}; allowed: {sorted(self.coords)}"
                )
            mask &= (
                np.isclose(self.coords[k], v)
                if np.issubdtype(np.asarray(self.coords[k]).dtype, np.floating)
                else self.coords[k] == v
            )
        return mask


def _reg_results():
    def flatten(r):
        children = (r.steps, r.records, r.final_state, r.diverged_step, r.coords, r.axes)
        children += (r.final_carry,)
        aux = (r.layer_names, dumps(r.attrs), tuple(sorted(r.dims.items())), r.transient)
        return children, aux

    def unflatten(aux, children):
        steps, records, final_state, diverged_step, coords, axes, final_carry = children
        return ReplicaResults(
            steps,
            records,
            final_state,
            diverged_step,
            coords,
            layer_names=aux[0],
            attrs=json.loads(aux[1]),
            dims=dict(aux[2]),
            axes=axes,
            final_carry=final_carry,
            transient=aux[3],
        )

    jax.tree_util.register_pytree_node(ReplicaResults, flatten, unflatten)


_reg_results()


def open_store(path: str | os.PathLike) -> xr.Dataset:
    """Open a zarr store written by chaosjax and load it into memory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"results store not found: {path}")
    with xr.open_zarr(path, consolidated=False) as ds:
        return ds.load()


def open_group(path: str | os.PathLike, group: str) -> xr.Dataset | None:
    """Load the analysis group ``group`` of a store, or None when the store has none."""
    path = Path(path)
    if not (path / group).is_dir():
        return None
    with xr.open_zarr(path, group=group, consolidated=False) as ds:
        return ds.load()


def write_zarr_atomic(
    ds: xr.Dataset, path: str | os.PathLike, groups: dict[str, xr.Dataset] | None = None
) -> Path:
    """Write ``ds`` (and named group datasets) to ``path`` through a temporary sibling
    folder and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    old = path.with_name(f".{path.name}.old")
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    ds = ds.assign_attrs(complete=1)
    ds.to_zarr(tmp, mode="w", consolidated=False, zarr_format=2)
    for name, g in (groups or {}).items():
        g.to_zarr(tmp, group=name, mode="w", consolidated=False, zarr_format=2)
    _consolidate(tmp)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)
    return path


def _consolidate(path: Path) -> None:
    """Consolidated metadata at the root (groups included): ``xarray.open_zarr(path)`` opens
    the store without falling back, and so without a warning."""
    import zarr

    zarr.consolidate_metadata(str(path))


def _time_axis(ds: xr.Dataset, name) -> str | None:
    """The time axis of a variable (its second dim when that is a coordinate of steps)."""
    dims = ds[name].dims
    if len(dims) > 1 and dims[0] == "replica" and dims[1] in ds.coords:
        return str(dims[1])
    return None


class ZarrStream:
    """Append each chunk of a running experiment to a zarr store: records along their time
    axes, and the latest final states and divergence flags in place.

    The store says ``complete = 0`` while chunks arrive; :meth:`finish` marks a finished run
    ``complete = 1`` (an interrupted run's store keeps 0)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.started = False

    def reset(self):
        if self.path.exists():
            shutil.rmtree(self.path)
        self.started = False

    def append(self, ds: xr.Dataset):
        ds = ds.assign_attrs(complete=0)
        if not self.started:
            self.reset()
            ds.to_zarr(self.path, mode="w", consolidated=False, zarr_format=2)
            _consolidate(self.path)
            self.started = True
            return
        by_axis: dict[str, list] = {}
        fixed = []
        for name in ds.data_vars:
            axis = _time_axis(ds, name)
            (by_axis.setdefault(axis, []) if axis else fixed).append(name)
        for axis, names in by_axis.items():
            if ds.sizes[axis] == 0:
                continue
            part = ds[names]
            part = part.drop_vars([c for c in part.coords if c != axis])
            part.to_zarr(self.path, append_dim=axis, consolidated=False)
        if fixed:  # the latest states and divergence flags replace the earlier ones
            part = ds[fixed]
            part.drop_vars(list(part.coords)).to_zarr(self.path, mode="a", consolidated=False)
        _consolidate(self.path)

    def finish(self, **attrs) -> None:
        """Mark the store's run finished: root attribute ``complete = 1`` (plus ``attrs``, JSON
        values), metadata consolidated again. Call it once the last chunk is appended."""
        import zarr

        if not self.started:
            raise RuntimeError(f"ZarrStream.finish: nothing was appended to {self.path}")
        root = zarr.open_group(str(self.path), mode="r+", zarr_format=2)
        root.attrs.update({**attrs, "complete": 1})
        _consolidate(self.path)


__all__ = ["ReplicaResults", "ZarrStream", "open_group", "open_store", "write_zarr_atomic"]
