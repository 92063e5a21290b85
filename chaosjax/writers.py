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

Texts: the monitor also writes why a value is NaN (``reason/<probe>``, the first time a probe
does not apply) to the writers that take texts. A writer takes texts when it follows the
:class:`TextWriter` protocol, ``write_texts(step, mapping: dict[str, str])`` (CLU's
``MetricWriter.write_texts``, so CLU writers get them); :func:`takes_texts` is the one test of
it. The built-in writers follow it: CSV and JSONL write a row/line holding the step and the
texts, Zarr keeps them in the store's attribute ``texts``, TensorBoard a text summary
(``add_text``). A ``write_scalars``-only object or a plain callable gets scalars only.
:func:`read_texts` reads the texts of a CSV, JSONL or Zarr log.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


class Writer:
    """The writer protocol: ``write_scalars(step, mapping)``; ``close()`` (default: nothing)."""

    def write_scalars(self, step: int, mapping: Mapping[str, float]) -> None:
        raise NotImplementedError(f"{type(self).__name__}.write_scalars")

    def close(self) -> None:
        """Flush and release the writer's resources."""


@runtime_checkable
class TextWriter(Protocol):
    """A writer that also takes texts: ``write_texts(step, mapping: dict[str, str])`` (the
    signature of CLU's ``MetricWriter.write_texts``). The monitor writes each probe's reason
    for a NaN (``reason/<probe>``) through it; see :func:`takes_texts`."""

    def write_texts(self, step: int, mapping: Mapping[str, str]) -> None: ...


def takes_texts(writer) -> bool:
    """Whether ``writer`` takes texts: it follows :class:`TextWriter` (a callable
    ``write_texts`` method). The one place that decides it; others get scalars only."""
    return isinstance(writer, TextWriter) and callable(writer.write_texts)


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
    empty cells; NaN is written ``nan``. :meth:`write_texts` writes a row of its own holding
    the step and the texts (e.g. ``reason/critical_sharpness``) in their columns; :func:`read_csv`
    reads a cell that is not a number as text.

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
        self._append(step, {k: _cell(v) for k, v in mapping.items()})

    def write_texts(self, step, mapping):
        """A row holding ``step`` and each text in its column."""
        self._append(step, {k: str(v) for k, v in mapping.items()})

    def _append(self, step, cells: dict) -> None:
        new = [k for k in cells if k not in self.columns]
        if new:
            self._widen(self.columns + new)
        row = [str(int(step))] + [cells.get(k, "") for k in self.columns]
        with self.path.open("a", newline="") as fh:
            csv.writer(fh).writerow(row)
            fh.flush()

    def _widen(self, columns):
        rows = _raw_csv(self.path) if self.path.exists() and self.columns else []
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["step", *columns])
            for r in rows:
                w.writerow([r["step"]] + [r.get(k, "") for k in columns])
        os.replace(tmp, self.path)
        self.columns = list(columns)


def _cell(v) -> str:
    return "" if v is None else repr(float(v))


def _raw_csv(path) -> list[dict]:
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))


def _parse(v: str):
    try:
        return float(v)
    except ValueError:
        return v


def read_csv(path: str | os.PathLike) -> list[dict]:
    """The rows of a :class:`CSV` file: ``{"step": int, name: float}`` (empty cells left out;
    a cell that is not a number, a text of :meth:`CSV.write_texts`, read as ``str``)."""
    out = []
    for r in _raw_csv(path):
        row = {"step": int(r.pop("step"))}
        row.update({k: _parse(v) for k, v in r.items() if v != ""})
        out.append(row)
    return out


class JSONL(Writer):
    """JSON lines: ``{"step": t, name: value, …}`` per write, appended and flushed. Non-finite
    values are written as ``null`` (strict JSON has no NaN); :func:`read_jsonl` reads them as
    NaN. :meth:`write_texts` writes a line ``{"step": t, name: "text", …}``.

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
        self._append(row)

    def write_texts(self, step, mapping):
        """A line holding ``step`` and the texts."""
        self._append({"step": int(step), **{k: str(v) for k, v in mapping.items()}})

    def _append(self, row: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(row, allow_nan=False) + "\n")
            fh.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a :class:`JSONL` file (``null`` read as NaN; texts as ``str``)."""
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
    written at a step; ``attrs["kind"] = "monitor"``; the texts of :meth:`write_texts` in
    ``attrs["texts"]`` as ``[[step, name, text], …]``. The rows are kept in memory and the store
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
        self.texts: list[list] = []
        self._pending = 0
        self._texts_unsaved = False

    def write_scalars(self, step, mapping):
        self.steps.append(int(step))
        self.rows.append({k: float(v) for k, v in mapping.items()})
        self._pending += 1
        if self._pending >= self.flush_every:
            self.flush()

    def write_texts(self, step, mapping):
        """Keep the texts for ``attrs["texts"]`` (stored at the next rewrite: the next
        ``write_scalars`` due a flush, :meth:`flush` or :meth:`close`)."""
        self.texts.extend([int(step), str(k), str(v)] for k, v in mapping.items())
        self._texts_unsaved = True

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
            attrs={**self.attrs, "kind": "monitor", "monitor_names": names, "texts": self.texts},
        )
        res.save(self.path)
        self._pending = 0
        self._texts_unsaved = False

    def close(self):
        if self._pending or self._texts_unsaved or not self.path.exists():
            self.flush()


def read_zarr(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (steps, values)}`` of a :class:`Zarr` store (the monitor's names)."""
    from chaosjax.results import ReplicaResults

    res = ReplicaResults.load(path)
    names = res.attrs.get("monitor_names", [])
    return {n: (res.steps, res.records[n.replace("/", _SEP)][0]) for n in names}


class TensorBoard(Writer):
    """TensorBoard event files in ``logdir`` through ``tensorboardX.SummaryWriter`` (install
    ``chaosjax[tensorboard]``); one scalar per name and step, flushed per write; texts as text
    summaries (``add_text``)."""

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

    def write_texts(self, step, mapping):
        for k, v in mapping.items():
            self._w.add_text(k, str(v), int(step))
        self._w.flush()

    def close(self):
        self._w.close()


def read_texts(path: str | os.PathLike) -> dict[str, list[tuple[int, str]]]:
    """``{name: [(step, text), …]}`` of a CSV file, JSONL file or Zarr store (folder): the
    texts of ``write_texts`` (e.g. ``reason/<probe>``), in the order written."""
    path = Path(path)
    if path.is_dir():
        from chaosjax.results import ReplicaResults

        items = ReplicaResults.load(path).attrs.get("texts", [])
    else:
        rows = read_csv(path) if path.suffix == ".csv" else read_jsonl(path)
        items = [(r["step"], k, v) for r in rows for k, v in r.items() if isinstance(v, str)]
    out: dict[str, list[tuple[int, str]]] = {}
    for step, name, text in items:
        out.setdefault(str(name), []).append((int(step), str(text)))
    return out


def write_all(
    writers: Sequence,
    step: int,
    mapping: Mapping[str, float],
    texts: Mapping[str, str] | None = None,
) -> None:
    """Write ``texts`` (when any) at ``step`` to the writers that take texts
    (:func:`takes_texts`), then ``mapping`` to every writer."""
    for w in writers:
        if texts and takes_texts(w):
            w.write_texts(int(step), dict(texts))
        w.write_scalars(int(step), dict(mapping))


__all__ = [
    "CSV",
    "JSONL",
    "Callback",
    "TensorBoard",
    "TextWriter",
    "Writer",
    "Zarr",
    "as_writers",
    "read_csv",
    "read_jsonl",
    "read_texts",
    "read_zarr",
    "takes_texts",
    "write_all",
]
