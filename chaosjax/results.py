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

#: extra dimension names of known records (beyond replica, step).
RECORD_DIMS = {
    "layer_distance": ("layer",),
    "layer_distance_l1": ("layer",),
    "top_layer_mass": ("layer",),
    "ntk_layer_amplitude": ("layer",),
    "sharpness": ("eig",),
    "subspace_angle": ("eig",),
    "grad_overlap": ("eig",),
    "update_overlap": ("eig",),
    "eig_residual": ("eig",),
}


@dataclasses.dataclass
class ReplicaResults:
    """Recorded observables of a replica run.

    Attributes:
        steps: record times, shape (n_records,).
        records: {name: array (replicas, n_records, ...)} (NaN after a replica diverged).
        final_state: states after the last step, shape (replicas, dim).
        diverged_step: (replicas,) step at which a replica diverged, −1 if it never did.
        coords: {name: array (replicas,)} per-replica labels (seed, learning_rate, eps, member,
            reference, …).
        layer_names: names of the layers of ``layer_distance`` records.
        attrs: JSON-serialisable metadata (config, versions, device, dtype, runtime).
    """

    steps: np.ndarray
    records: dict[str, np.ndarray]
    final_state: np.ndarray
    diverged_step: np.ndarray
    coords: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    layer_names: tuple[str, ...] = ()
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def n_replicas(self) -> int:
        return int(self.final_state.shape[0])

    @property
    def diverged(self) -> np.ndarray:
        return self.diverged_step >= 0

    def to_xarray(self) -> xr.Dataset:
        """An ``xarray.Dataset`` with dims ``replica``, ``step`` (and ``layer``, ``dim``)."""
        data_vars = {}
        for name, arr in self.records.items():
            dims = ("replica", "step", *RECORD_DIMS.get(name, ()))
            dims = dims + tuple(f"{name}_{i}" for i in range(arr.ndim - len(dims)))
            data_vars[name] = (dims, np.asarray(arr))
        data_vars["final_state"] = (("replica", "dim"), np.asarray(self.final_state))
        data_vars["diverged_step"] = (("replica",), np.asarray(self.diverged_step, np.int64))
        coords = {"replica": np.arange(self.n_replicas), "step": np.asarray(self.steps, np.int64)}
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
        records = {k: np.asarray(v.values) for k, v in ds.data_vars.items() if k not in skip}
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
        return (r.steps, r.records, r.final_state, r.diverged_step, r.coords), (
            r.layer_names,
            dumps(r.attrs),
        )

    def unflatten(aux, children):
        return ReplicaResults(*children, layer_names=aux[0], attrs=json.loads(aux[1]))

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
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)
    return path


class ZarrStream:
    """Append each chunk's records along ``step`` to a zarr store while a run goes on."""

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
            self.started = True
        else:
            step_vars = [k for k, v in ds.data_vars.items() if "step" in v.dims]
            ds[step_vars].drop_vars(
                [c for c in ds.coords if c != "step" and "step" not in ds[c].dims],
                errors="ignore",  # coordinates of variables without a step axis are absent
            ).to_zarr(self.path, append_dim="step", consolidated=False)


__all__ = ["ReplicaResults", "ZarrStream", "open_group", "open_store", "write_zarr_atomic"]
