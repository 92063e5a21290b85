"""The observer protocol, declared once with its defaults.

An observer is a frozen dataclass that subclasses :class:`Observer` (hashable: it is a static
part of the compiled chunk). The engine calls the protocol's methods and reads its class
flags; it probes nothing. What an observer must define: :meth:`Observer.records`,
:meth:`Observer.init` and :meth:`Observer.update`. Everything else has a default that does
nothing, and the flags say which optional hooks a class implements:

* ``advances``: :meth:`advance` runs after every step on the tracked rows;
* ``takes_step``: :meth:`step` can take the step itself for every row (a tangent observer
  linearises the step anyway: its primal output *is* the step);
* ``evaluates_all_rows``: :meth:`evaluate` runs on every row with the engine's batched
  program at each record (its numbers then equal the records bit for bit);
* ``uses_tangents``: its records are exponents of the step's derivative (voided with a reason
  when the step is not smooth, :mod:`chaosjax.smoothness`);
* ``requires``: the capabilities of the map it needs (:class:`chaosjax.Map`), refused in one
  line when the map lacks one.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import numpy as np

ROWS = ("all", "references", "perturbed")


class Record(NamedTuple):
    """How an observer's record is laid out.

    Attributes:
        axis: its time axis: ``"step"`` (the run's record cadence) or an axis of its own.
        dims: names of its extra dimensions after (replica, time).
        source: ``"record"`` (computed on the device at every record), ``"step"`` (computed
            after every step, kept at the steps of its axis), ``"host"`` (derived on the host
            from the step records) or ``"snapshot"`` (read at the steps of its axis).
        stored: written to ``results.zarr`` (False: kept in memory and in checkpoints only).
    """

    axis: str = "step"
    dims: tuple[str, ...] = ()
    source: str = "record"
    stored: bool = True


class RunInfo(NamedTuple):
    """Static facts of a run an observer needs: its first step, length and record cadence."""

    t0: int
    steps: int
    record_every: int


class Observer(abc.ABC):
    """Base of every observer of :func:`chaosjax.run_replicas` (see the module doc).

    Subclasses are ``@dataclasses.dataclass(frozen=True)`` with a ``rows`` field
    (``"all"``, ``"references"`` or ``"perturbed"``: the replicas it tracks).
    """

    rows: str = "all"
    advances: ClassVar[bool] = False
    takes_step: ClassVar[bool] = False
    evaluates_all_rows: ClassVar[bool] = False
    uses_tangents: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def records(self, model) -> dict[str, Record]:
        """What it records: ``{name: Record}``."""

    def validate(self, model, dim: int | None = None, info: RunInfo | None = None) -> None:
        """Refuse settings that cannot work, with one line naming the field."""
        if self.rows not in ROWS:
            raise ValueError(f"rows: unknown {self.rows!r}; allowed: {', '.join(ROWS)}")

    @abc.abstractmethod
    def init(self, model, states, hparams, t) -> tuple[Mapping[str, Any], Any]:
        """``(values, state)`` at the first record, on the tracked rows (``states`` (T, …))."""

    @abc.abstractmethod
    def update(self, model, states, hparams, state, t) -> tuple[Mapping[str, Any], Any]:
        """``(values, state)`` at every later record."""

    def advance(self, info: RunInfo, ctx, state):
        """After every step (``advances``): ``(state, values, new_rows or None)``."""
        raise NotImplementedError(f"{type(self).__name__} does not advance after every step")

    def step(self, info: RunInfo, ctx, state):
        """Take the step for every row (``takes_step``):
        ``(x_next, carry_next, loss, state, values)``."""
        raise NotImplementedError(f"{type(self).__name__} does not take the step")

    def evaluate(self, model, x, rows, t=None) -> dict[str, Any]:
        """Values of every row (``evaluates_all_rows``), kept for ``rows``."""
        return {}

    def axes(self, info: RunInfo) -> dict[str, np.ndarray]:
        """Time axes of its own: ``{axis name: steps}``."""
        return {}

    def host_records(self, info: RunInfo, values, steps, rec_steps) -> dict[str, np.ndarray]:
        """Records derived on the host from the step records (``source="host"``)."""
        return {}

    def empty_host_records(self, n_rows: int, n: int) -> dict[str, np.ndarray]:
        """The host records of a run with no records yet."""
        return {}

    def snapshot_steps(self, info: RunInfo) -> tuple[int, ...]:
        """Steps at which the engine ends a chunk and calls :meth:`snapshot`."""
        return ()

    def snapshot(self, info: RunInfo, t, state, x) -> dict[str, np.ndarray]:
        """Records read at a snapshot step."""
        return {}

    def memory(self, info: RunInfo, flow: Callable, x1, carry1, args1) -> dict[str, int] | None:
        """Bytes per tracked row by part, or None: the engine estimates them from one
        :meth:`update`."""
        return None


def records_of(observer: Observer, model) -> dict[str, Record]:
    """The records of an observer."""
    return dict(observer.records(model))


def check_observer(observer) -> Observer:
    """``observer`` if it implements the protocol, else a one-line TypeError."""
    if not isinstance(observer, Observer):
        raise TypeError(
            f"trackers: {type(observer).__name__} is not a chaosjax.Observer; an observer "
            "subclasses chaosjax.Observer as a frozen dataclass and defines records, init and "
            "update"
        )
    return observer


__all__ = ["ROWS", "Observer", "Record", "RunInfo", "check_observer", "records_of"]
