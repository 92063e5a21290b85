"""Checkpoints of a run: an atomic ``.npz`` of the carry, the observers' states and every
record so far (no pickle), and the packing of device trees into it (one process: every row;
several: each process's rows)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from chaosjax._util import atomic_write_bytes
from chaosjax.sharding import from_local_rows, gather, local_rows, put_rows


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


def pack_tree(name: str, tree) -> dict[str, np.ndarray]:
    """Device rows of every leaf of ``tree`` as checkpoint arrays ``{name__j: rows}``: all rows
    (one process) or this process's rows with their indices (``name__j__rows``)."""
    out = {}
    for j, x in enumerate(jax.tree_util.tree_leaves(tree)):
        if jax.process_count() == 1:
            out[f"{name}__{j}"] = gather(x)
        else:
            rows, data = local_rows(x)
            out[f"{name}__{j}"], out[f"{name}__{j}__rows"] = data, rows
    return out


def unpack_tree(arrays: dict[str, np.ndarray], name: str, like, mesh, sharded: bool):
    """The tree :func:`pack_tree` wrote, placed as ``like`` (shapes) on the run's devices."""
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


__all__ = ["Checkpoint", "pack_tree", "unpack_tree"]
