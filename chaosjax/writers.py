"""Where :class:`chaosjax.Monitor` writes: any ``write_scalars(step, mapping)`` object or callable.

A writer is anything with a method ``write_scalars(step: int, mapping: dict[str, float])`` —
the signature of CLU's ``MetricWriter``, so every CLU writer works — or a callable
``f(step, mapping)`` (``lambda s, m: wandb.log(m, step=s)``). ``Monitor(writer=...)`` takes
one or a list. Built in:

* :class:`CSV` — one row per write, appended and flushed (a killed run keeps its rows);
* :class:`JSONL` — one JSON object per line, appended and flushed;
* :class:`Zarr` — an xarray/zarr store in chaosjax's results format (one replica, a ``step``
  axis; :func:`chaosjax.open_store` reads it), rewritten atomically every ``flush_every``
  writes;
* :class:`TensorBoard` — event files through ``tensorboardX`` (the optional extra
  ``chaosjax[tensorboard]``).

Values are Python floats; NaN marks a value that was not measured at that step or is undefined.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np


class Writer:
    """The writer protocol: ``write_scalars(step, mapping)``; ``close()`` (default: nothing)."""

    def write_scalars(self, step: int, mapping: Mapping[str, float]) -> None:
        raise NotImplementedError(f"{type(self).__name__}.write_scalars")

    def close(self) -> None:
        """Flush and release the writer's resources."""


class Callback(Writer):
    """A callable ``f(step, mapping)`` as a writer."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def write_scalars(self, step, mapping):
        self.fn(step, dict(mapping))


def as_writers(writer) -> tuple:
    """The writers of ``Monitor(writer=...)``: None, one writer or a list of them (TypeError
    naming ``writer`` for anything else)."""
    if writer is None:
        return ()
    items = list(writer) if isinstance(writer, list | tuple) else [writer]
    out = []
    for w in items:
        if callable(getattr(w, "write_scalars", None)):
            out.append(w)
        elif callable(w):
            out.append(Callback(w))
        else:
            raise TypeError(
                "writer: expected an object with write_scalars(step, mapping), a callable "
                f"f(step, mapping) or a list of them, got {type(w).__name__}"
            )
    return tuple(out)


class CSV(Writer):
    """A CSV file: a header ``step,name,…`` and one row per write, flushed at once.

    The columns are the names of the first write; a later write with new names rewrites the
    file once with the wider header (earlier rows get empty cells there). Missing values are
    empty cells; NaN is written ``nan``.

    Args:
        path: the file (its folder is created).
        append: continue an existing file with the same columns (default: start afresh).
    """

    def __init__(self, path: str | os.PathLike, *, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns: list[str] = []
        if append and self.path.exists():
            with self.path.open(newline="") as fh:
                head = next(csv.reader(fh), [])
            self.columns = head[1:]
        elif self.path.exists():
            self.path.unlink()

    def write_scalars(self, step, mapping):
        new = [k for k in mapping if k not in self.columns]
        if new:
            self._widen(self.columns + new)
        row = [str(int(step))] + [_cell(mapping.get(k)) for k in self.columns]
        with self.path.open("a", newline="") as fh:
            csv.writer(fh).writerow(row)
            fh.flush()

    def _widen(self, columns):
        rows = read_csv(self.path) if self.path.exists() and self.columns else []
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["step", *columns])
            for r in rows:
                w.writerow([str(r["step"])] + [_cell(r.get(k)) for k in columns])
        os.replace(tmp, self.path)
        self.columns = list(columns)


def _cell(v) -> str:
    return "" if v is None else repr(float(v))


def read_csv(path: str | os.PathLike) -> list[dict]:
    """The rows of a :class:`CSV` file: ``{"step": int, name: float}`` (empty cells left out)."""
    with Path(path).open(newline="") as fh:
        out = []
        for r in csv.DictReader(fh):
            row = {"step": int(r.pop("step"))}
            row.update({k: float(v) for k, v in r.items() if v != ""})
            out.append(row)
    return out


class JSONL(Writer):
    """JSON lines: ``{"step": t, name: value, …}`` per write, appended and flushed. Non-finite
    values are written as ``null`` (strict JSON has no NaN); :func:`read_jsonl` reads them as
    NaN.

    Args:
        path: the file (its folder is created).
        append: continue an existing file (default: start afresh).
    """

    def __init__(self, path: str | os.PathLike, *, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not append and self.path.exists():
            self.path.unlink()

    def write_scalars(self, step, mapping):
        row = {"step": int(step)}
        row.update({k: (float(v) if math.isfinite(float(v)) else None) for k, v in mapping.items()})
        with self.path.open("a") as fh:
            fh.write(json.dumps(row, allow_nan=False) + "\n")
            fh.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a :class:`JSONL` file (``null`` read as NaN)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows.append({k: (math.nan if v is None else v) for k, v in r.items()})
    return rows


#: a monitor name ``a/b`` is stored as the variable ``a.b`` (zarr reads ``/`` as a group)
_SEP = "."


class Zarr(Writer):
    """An xarray/zarr store in the results format of :class:`chaosjax.ReplicaResults`.

    One replica; each name a record (replica, step) (``sharpness/1`` stored as
    ``sharpness.1``; ``attrs["monitor_names"]`` lists the names), NaN where a name was not
    written at a step; ``attrs["kind"] = "monitor"``. The rows are kept in memory and the store
    is rewritten atomically (temporary folder, then rename) every ``flush_every`` writes and at
    :meth:`close`, so the store on disk is always whole. :func:`read_zarr` reads it back.

    Args:
        path: the store folder.
        flush_every: writes between rewrites (1: every write).
        attrs: JSON-serialisable metadata stored with it.
    """

    def __init__(self, path: str | os.PathLike, *, flush_every: int = 1, attrs=None):
        if isinstance(flush_every, bool) or int(flush_every) != flush_every or flush_every < 1:
            raise ValueError(f"flush_every: must be an integer >= 1, got {flush_every!r}")
        self.path = Path(path)
        self.flush_every = int(flush_every)
        self.attrs = dict(attrs or {})
        self.steps: list[int] = []
        self.rows: list[dict] = []
        self._pending = 0

    def write_scalars(self, step, mapping):
        self.steps.append(int(step))
        self.rows.append({k: float(v) for k, v in mapping.items()})
        self._pending += 1
        if self._pending >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Rewrite the store with every row so far."""
        from chaosjax.results import ReplicaResults

        names = list(dict.fromkeys(k for r in self.rows for k in r))
        records = {
            n.replace("/", _SEP): np.array([[r.get(n, np.nan) for r in self.rows]]) for n in names
        }
        res = ReplicaResults(
            steps=np.asarray(self.steps, np.int64),
            records=records,
            final_state=np.zeros((1, 0)),
            diverged_step=np.full((1,), -1),
            attrs={**self.attrs, "kind": "monitor", "monitor_names": names},
        )
        res.save(self.path)
        self._pending = 0

    def close(self):
        if self._pending or not self.path.exists():
            self.flush()


def read_zarr(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (steps, values)}`` of a :class:`Zarr` store (the monitor's names)."""
    from chaosjax.results import ReplicaResults

    res = ReplicaResults.load(path)
    names = res.attrs.get("monitor_names", [])
    return {n: (res.steps, res.records[n.replace("/", _SEP)][0]) for n in names}


class TensorBoard(Writer):
    """TensorBoard event files in ``logdir`` through ``tensorboardX.SummaryWriter`` (install
    ``chaosjax[tensorboard]``); one scalar per name and step, flushed per write."""

    def __init__(self, logdir: str | os.PathLike):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ImportError(
                "TensorBoard: needs tensorboardX; pip install 'chaosjax[tensorboard]'"
            ) from None
        self.logdir = Path(logdir)
        self._w = SummaryWriter(str(self.logdir))

    def write_scalars(self, step, mapping):
        for k, v in mapping.items():
            self._w.add_scalar(k, float(v), int(step))
        self._w.flush()

    def close(self):
        self._w.close()


def write_all(writers: Sequence, step: int, mapping: Mapping[str, float]) -> None:
    """Write ``mapping`` at ``step`` to every writer."""
    for w in writers:
        w.write_scalars(int(step), dict(mapping))


__all__ = [
    "CSV",
    "JSONL",
    "Callback",
    "TensorBoard",
    "Writer",
    "Zarr",
    "as_writers",
    "read_csv",
    "read_jsonl",
    "read_zarr",
    "write_all",
]
