"""The plan of a run, decided on the host before anything compiles: the named observables
and the observers' records (names, time axes, dims, which are stored), the record and chunk
cadences, the replica strategy, the observer that takes the step, the snapshot stops, and the
static :class:`~chaosjax._engine_program._Spec` of each chunk. Every refusal of
:func:`chaosjax.run_replicas` happens here, in one line naming the argument.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from chaosjax._engine_program import (
    DISTANCE_AXIS,
    DISTANCES,
    GENERIC_OBSERVABLES,
    TRAINING_OBSERVABLES,
    _Spec,
)
from chaosjax._engine_rows import tracked_rows
from chaosjax._map import Map, as_map, require
from chaosjax._observer import Observer, Record, RunInfo, check_observer, records_of
from chaosjax._util import warn_at_caller
from chaosjax.observers import check_strategy

#: the capability of the map each named observable needs
_OBSERVABLE_NEEDS = {
    "loss": "loss",
    "test_loss": "loss",
    "accuracy": "accuracy",
    "test_accuracy": "accuracy",
}
_LOSS_HINT = (
    "; from_step: pass loss_fn(params, batch), or record the step's metrics "
    "(custom_observables=tmap.metric_observables())"
)


def _check_observables(model: Map, observables) -> tuple[str, ...]:
    """The named observables of a run on ``model`` (its defaults when None), or one line
    naming the one the map cannot give."""
    caps = model.capabilities
    params = "parameters" in caps
    if observables is None:
        observables = (
            (("loss",) if "loss" in caps else ())
            + ("param_norm", "distance_l1", "distance_l2")
            + (("accuracy",) if "accuracy" in caps else ())
            if params
            else ("norm", "distance_l2")
        )
    observables = tuple(observables)
    allowed = TRAINING_OBSERVABLES if params else GENERIC_OBSERVABLES
    for name in observables:
        if name not in allowed:
            raise ValueError(f"observables: unknown {name!r}; allowed: {', '.join(allowed)}")
        need = _OBSERVABLE_NEEDS.get(name)
        if need is not None:
            require(model, need, f"observables: {name!r}", _LOSS_HINT if need == "loss" else "")
    return observables


def _chunk_plan(t: int, end: int, chunk_steps: int, stops: Sequence[int]) -> int:
    """Steps of the next chunk: at most chunk_steps, ending at the next snapshot step."""
    n = min(chunk_steps, end - t)
    for s in stops:
        if t < s < t + n:
            n = s - t
    return n


#: the default replica strategy per model kind and backend, from measurements recorded in
#: benchmarks/RESULTS.md ("Replica strategies"): on the CPU, vmapping a convolution over
#: per-replica weights turns it into a grouped convolution that XLA runs ~3x slower than a
#: loop over replicas; dense layers and plain maps batch well everywhere; GPUs batch both.
STRATEGY_RULE = (
    "vmap everywhere, except on the CPU backend for a training map whose step contains a "
    "convolution (conv_general_dilated in its jaxpr): lax.map over replicas. Measured: "
    "vmapping a convolution over per-replica weights makes it a grouped convolution that XLA's "
    "CPU backend runs about three times slower than a loop; on a GPU vmap is the fast path"
)


#: convolution verdicts by map structure (treedef and leaf shapes): module-level, never on a map
_CONVOLUTION: dict = {}


def _has_convolution(treedef, shapes, model) -> bool:
    """Whether the map's step contains a convolution: traced once per map structure
    (abstractly: nothing is compiled), never cached on the map itself."""
    from chaosjax.sharding import jaxpr_primitives

    key = (treedef, shapes)
    if key not in _CONVOLUTION:
        jaxpr = jax.make_jaxpr(lambda s: model.step(s, 0))(model.init()).jaxpr
        _CONVOLUTION[key] = "conv_general_dilated" in jaxpr_primitives(jaxpr)
    return _CONVOLUTION[key]


def default_strategy(model, backend: str | None = None) -> str:
    """The replica strategy of :data:`STRATEGY_RULE` for ``model`` on ``backend`` (default:
    JAX's default backend). Decided from the step's program, never from timing, so a rerun or
    a resume compiles the same program."""
    backend = backend or jax.default_backend()
    model = getattr(model, "__self__", model)  # a map's bound step: the map
    if backend != "cpu" or not isinstance(model, Map) or "parameters" not in model.capabilities:
        return "vmap"
    leaves, treedef = jax.tree_util.tree_flatten(model)
    shapes = tuple((jnp.shape(v), jnp.result_type(v)) for v in leaves)
    has_conv = _has_convolution(treedef, shapes, model)
    return "map" if has_conv else "vmap"


def _void_nonsmooth(trackers, flow, replicas, t0) -> tuple[tuple, str]:
    """The trackers, with every tangent observer voided (NaN records) when the step is not
    smooth (:func:`chaosjax.smoothness.flow_smoothness`) unless it allows it; and the reason.
    Decided from the step's program at the first row, once per run, with one warning."""
    from chaosjax.smoothness import NonSmoothWarning, flow_smoothness

    need = [i for i, tr in enumerate(trackers) if tr.uses_tangents and not tr.allow_nonsmooth]
    if not need:
        return trackers, ""

    def row0(tree):
        return jax.tree_util.tree_map(lambda a: jnp.asarray(a)[0], tree)

    verdict = flow_smoothness(
        flow,
        jnp.asarray(replicas.states[0]),
        row0(replicas.carry),
        jnp.asarray(t0, jnp.int32),
        row0(replicas.hparams),
    )
    if verdict.smooth:
        return trackers, ""
    warn_at_caller(verdict.reason, NonSmoothWarning)
    voided = tuple(
        dataclasses.replace(tr, void=verdict.reason) if i in need else tr
        for i, tr in enumerate(trackers)
    )
    return voided, verdict.reason


def _owner(trackers, reference) -> int:
    """The observer that takes the step itself: a tangent observer that tracks every row
    (its linearisation computes the step anyway). -1 when there is none."""
    for i, tr in enumerate(trackers):
        if tr.takes_step and tracked_rows(tr.rows, reference) is None:
            return i
    return -1


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What a run records and how (host values; see the module doc).

    Attributes:
        model: the map (:class:`chaosjax.Map`).
        info: the run's first step, length and record cadence.
        observables: named observables; custom: ``((name, fn), …)`` sorted.
        trackers: the observers (tangent observers voided when the step is not smooth).
        tangent_reason: why tangent observers were voided ('' when they measure).
        rec_specs: ``{record name: (observer index, Record)}``.
        distance_every, fine_distances: the distance cadence and whether it is finer than
            the records (its own axis ``distance_step``).
        chunk_steps: steps per compiled chunk; stops: snapshot steps a chunk ends at.
        strategy: how the rows run (vmap, map, or blocks).
        owner: the observer that takes the step itself (-1: none).
        axes: every observer time axis ``{name: steps}``; dims: ``{record: (axis, *dims)}``
            of the records not on the plain record axis; transient: records not stored.
        loss_bound, state_bound: divergence bounds.
    """

    model: Map
    info: RunInfo
    observables: tuple[str, ...]
    custom: tuple[tuple[str, Callable], ...]
    trackers: tuple[Observer, ...]
    tangent_reason: str
    rec_specs: dict[str, tuple[int, Record]]
    distance_every: int
    fine_distances: bool
    chunk_steps: int
    stops: tuple[int, ...]
    strategy: str | int
    owner: int
    axes: dict[str, np.ndarray]
    dims: dict[str, tuple[str, ...]]
    transient: tuple[str, ...]
    loss_bound: float
    state_bound: float

    @property
    def steps(self) -> int:
        return self.info.steps

    @property
    def record_every(self) -> int:
        return self.info.record_every

    @property
    def t0(self) -> int:
        return self.info.t0

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(self.model.layers)

    def spec(self, n: int, dim: int) -> _Spec:
        """The static description of a chunk of ``n`` steps (rows of ``dim`` coordinates)."""
        return _Spec(
            self.observables,
            self.custom,
            n // self.record_every,
            self.record_every,
            float(self.loss_bound),
            float(self.state_bound),
            tuple(self.model.layers.values()),
            self.model.n_params_of(dim),
            self.trackers,
            self.info,
            self.model.has_loss,
            self.fine_distances,
            self.owner,
            self.strategy,
        )

    def axis_of(self, name: str) -> str:
        """The time axis of a record."""
        if name in self.rec_specs:
            return self.rec_specs[name][1].axis
        return DISTANCE_AXIS if self.fine_distances and name in DISTANCES else "step"

    def row_sets(self, reference: np.ndarray) -> list[np.ndarray | None]:
        """The rows each observer tracks (None: every row; the step's owner tracks all)."""
        return [
            None if i == self.owner else tracked_rows(tr.rows, reference)
            for i, tr in enumerate(self.trackers)
        ]

    def next_chunk(self, t: int) -> int:
        """Steps of the chunk that starts at ``t``."""
        return _chunk_plan(t, self.t0 + self.steps, self.chunk_steps, self.stops)


def _cadences(steps, record_every, distance_every, chunk_steps) -> tuple[int, int, int]:
    steps, record_every = int(steps), int(record_every)
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    if record_every < 1 or steps % record_every:
        raise ValueError(f"record_every: must be >= 1 and divide steps={steps}, got {record_every}")
    distance_every = record_every if distance_every is None else int(distance_every)
    if distance_every < 1 or record_every % distance_every:
        raise ValueError(
            f"distance_every: must be a positive divisor of record_every={record_every}, "
            f"got {distance_every}"
        )
    if chunk_steps is None:
        chunk_steps = max(record_every, (500 // record_every) * record_every)
    chunk_steps = int(chunk_steps)
    if chunk_steps < 1 or chunk_steps % record_every:
        raise ValueError(f"chunk_steps: must be a positive multiple of record_every={record_every}")
    return distance_every, min(chunk_steps, steps), steps


def _record_specs(model, trackers, taken, dim, info) -> dict[str, tuple[int, Record]]:
    """Every observer checked against the protocol, the map's capabilities and its own rules;
    ``{record name: (observer index, Record)}`` with no name used twice."""
    taken = set(taken)
    rec_specs: dict[str, tuple[int, Record]] = {}
    for i, tr in enumerate(trackers):
        check_observer(tr)
        for need in tr.requires:
            require(model, need, f"trackers: {type(tr).__name__}")
        tr.validate(model, dim=dim, info=info)
        recs = records_of(tr, model)
        clash = taken & set(recs)
        if clash:
            raise ValueError(f"trackers: record names {sorted(clash)} are used twice")
        taken |= set(recs)
        for name, r in recs.items():
            rec_specs[name] = (i, r)
    return rec_specs


def plan_run(
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
    strategy: str | int | None = None,
) -> RunPlan:
    """The :class:`RunPlan` of :func:`chaosjax.run_replicas` (same arguments), or a one-line
    ValueError/TypeError naming the argument that cannot work. Traces the step once (the
    smoothness verdict of tangent observers); compiles nothing."""
    distance_every, chunk_steps, steps = _cadences(steps, record_every, distance_every, chunk_steps)
    record_every = int(record_every)
    model = as_map(model, replicas)
    observables = _check_observables(model, observables)
    custom = tuple(sorted((custom_observables or {}).items()))
    for name, fn in custom:
        if name in observables or not callable(fn):
            raise ValueError(f"custom_observables: {name!r} must be a new name with a callable")
    fine = distance_every < record_every and any(n in DISTANCES for n in observables)
    strategy = default_strategy(model) if strategy is None else check_strategy(strategy)
    info = RunInfo(int(t0), steps, record_every)
    trackers = tuple(trackers)
    dim = int(replicas.states.shape[1])
    taken = set(observables) | {c[0] for c in custom}
    rec_specs = _record_specs(model, trackers, taken, dim, info)
    trackers, tangent_reason = _void_nonsmooth(trackers, model.flow, replicas, t0)
    axes: dict[str, np.ndarray] = {}
    for tr in trackers:
        axes.update({k: np.asarray(v) for k, v in tr.axes(info).items()})
    dims = {
        name: (r.axis, *r.dims) for name, (_, r) in rec_specs.items() if r.axis != "step" or r.dims
    }
    if fine:
        axes[DISTANCE_AXIS] = np.arange(t0, t0 + steps + 1, distance_every, dtype=np.int64)
        for name in observables:
            if name in DISTANCES:
                dims[name] = (DISTANCE_AXIS, *(("layer",) if "layer" in name else ()))
    return RunPlan(
        model=model,
        info=info,
        observables=observables,
        custom=custom,
        trackers=trackers,
        tangent_reason=tangent_reason,
        rec_specs=rec_specs,
        distance_every=distance_every,
        fine_distances=fine,
        chunk_steps=chunk_steps,
        stops=tuple(sorted({int(s) for tr in trackers for s in tr.snapshot_steps(info)})),
        strategy=strategy,
        owner=_owner(trackers, replicas.reference),
        axes=axes,
        dims=dims,
        transient=tuple(name for name, (_, r) in rec_specs.items() if not r.stored),
        loss_bound=float(loss_bound),
        state_bound=float(state_bound),
    )


__all__ = ["STRATEGY_RULE", "RunPlan", "default_strategy", "plan_run"]
