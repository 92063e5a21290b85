"""The chunked host loop shared by the analyses: jitted chunks, progress, checkpoints, resume.

``run_chunks`` calls ``chunk(carry, n) -> (carry, outputs)`` (a jitted function doing ``n``
units of work, outputs with a leading axis of length ``n``) until ``n_total`` units are
done, gathers the outputs on the host in float64, shows a tqdm bar and, with a checkpoint
path, saves the carry and the outputs so far after every chunk (atomically, no pickle).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from chaosjax._util import atomic_write_bytes
from chaosjax.sharding import gather, is_main_process, process_path


def _to_host(tree):
    def conv(a):
        return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a

    return jax.tree_util.tree_map(conv, gather(tree))


def run_chunks(
    chunk: Callable,
    carry,
    n_total: int,
    chunk_units: int,
    *,
    progress: bool = False,
    desc: str = "",
    steps_per_unit: int = 1,
    checkpoint: str | os.PathLike | None = None,
    fingerprint: str = "",
    resume: bool = False,
    out_axis: int = 0,
    place: Callable | None = None,
):
    """Run ``n_total`` units in chunks; returns ``(carry, outputs)`` with outputs concatenated
    along ``out_axis`` as float64 numpy arrays (``None`` when the chunk returns none).

    ``place`` puts a carry loaded from a checkpoint back on the devices (e.g. sharded); with
    several processes each one keeps its own checkpoint file."""
    n_total, chunk_units = int(n_total), max(1, int(chunk_units))
    done = 0
    pieces: list = []
    path = process_path(checkpoint) if checkpoint else None
    treedef = jax.tree_util.tree_structure(carry)
    if resume and path is not None and path.exists():
        with np.load(path, allow_pickle=False) as z:
            if str(z["__fingerprint__"]) != fingerprint:
                raise ValueError(
                    f"resume: checkpoint {path} belongs to a different computation; start afresh"
                )
            done = int(z["__done__"])
            n_leaves = treedef.num_leaves
            leaves = [z[f"carry_{i}"] for i in range(n_leaves)]
            carry = jax.tree_util.tree_unflatten(
                treedef,
                [
                    jax.numpy.asarray(v, dtype=np.asarray(o).dtype)
                    for v, o in zip(leaves, jax.tree_util.tree_leaves(carry))
                ],
            )
            if place is not None:
                carry = place(carry)
            out_keys = sorted(k for k in z.files if k.startswith("out_"))
            if out_keys:
                pieces.append([z[k] for k in out_keys])
    bar = tqdm(
        total=n_total * steps_per_unit,
        initial=done * steps_per_unit,
        disable=not progress or not is_main_process(),
        desc=desc,
        unit="step",
        dynamic_ncols=True,
    )
    out_treedef = None
    try:
        while done < n_total:
            n = min(chunk_units, n_total - done)
            carry, out = chunk(carry, n)
            if out is not None:
                leaves, out_treedef = jax.tree_util.tree_flatten(_to_host(out))
                pieces.append(leaves)
            done += n
            if path is not None:
                _save(path, fingerprint, done, carry, pieces, out_axis)
            bar.update(n * steps_per_unit)
    finally:
        bar.close()
    if not pieces:
        return carry, None
    n_out = len(pieces[0])
    cat = [np.concatenate([p[i] for p in pieces], axis=out_axis) for i in range(n_out)]
    if out_treedef is None:  # everything came from the checkpoint
        return carry, cat[0] if n_out == 1 else tuple(cat)
    return carry, jax.tree_util.tree_unflatten(out_treedef, cat)


def _save(path: Path, fingerprint: str, done: int, carry, pieces, out_axis: int) -> None:
    arrays = {f"carry_{i}": v for i, v in enumerate(gather(jax.tree_util.tree_leaves(carry)))}
    if pieces:
        for i in range(len(pieces[0])):
            arrays[f"out_{i:04d}"] = np.concatenate([p[i] for p in pieces], axis=out_axis)
    buf = io.BytesIO()
    np.savez(buf, __fingerprint__=np.asarray(fingerprint), __done__=np.asarray(done), **arrays)
    atomic_write_bytes(path, buf.getvalue())
