"""Where rows live: reference groups kept whole on one device, the observers' row sets, and
passes of whole groups when a batch does not fit (host code, no compilation)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from chaosjax.observers import (
    ROWS,
)
from chaosjax.results import ReplicaResults


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
