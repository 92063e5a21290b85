"""Observers of one run: analyses advanced inside the replica engine's chunks.

A chaotic trajectory cannot be integrated twice (two XLA programs of "the same" run part
within a few hundred steps), so every analysis that follows a trajectory observes the run
that :func:`chaosjax.run_replicas` records, inside the same jitted chunk:

* :class:`LyapunovTracker` — k tangent vectors along the recorded trajectory of each tracked
  replica, re-orthonormalised by the sign-fixed QR of :func:`chaosjax.qr_renormalize` every
  ``renorm_every`` steps: finite-time exponents ``ftle`` at every record, the raw
  per-renormalisation ``log_growth`` (summed on the host in float64), and — with a
  :class:`CLVWindow` — the R factors and bases of Ginelli's forward pass;
* :class:`TwinTracker` — Benettin's finite-perturbation estimate: a perturbed replica pulled
  back to distance ``d0`` from its reference every ``renorm_every`` steps;
* :class:`StateSnapshots` — the tracked replicas' states at chosen steps (e.g. the state a
  marginal-stability test perturbs), taken from the run rather than re-integrated.

The curvature and response trackers (:class:`chaosjax.CurvatureTracker`,
:class:`chaosjax.ResponseTracker`) follow the same protocol at the record cadence.

Every observer implements the one protocol of :class:`chaosjax.Observer` (declared with its
defaults in :mod:`chaosjax._observer`: ``records``, ``validate``, ``init``, ``update``, and the
hooks ``advance``/``step``/``evaluate``/``axes``/``host_records``/``snapshot``/``memory`` that
its class flags ``advances``, ``takes_step``, ``evaluates_all_rows`` declare); the engine
probes nothing.

Windows keep their meaning inside the one run: ``warmup`` delays an observer's start,
``align`` runs its tangents before accumulation, and a CLV window plus its backward
transient lies inside the run. Nothing re-integrates a trajectory.

"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from chaosjax._layout import MapState
from chaosjax._observer import ROWS, Observer, Record, RunInfo, records_of
from chaosjax._smalllinalg import log_abs_det
from chaosjax.sharding import estimate_bytes
from chaosjax.tangents import qr_renormalize, random_basis, tangent_step


class StepContext(NamedTuple):
    """What an observer sees after one step (rows: the rows it tracks).

    Attributes:
        flow: ``flow(x, carry, t, args) -> (x_next, carry_next, loss)`` of one replica: the
            engine's step.
        x, carry: the tracked rows' states before the step, (T, dim) and carried leaves.
        x_next: their states after the step (a diverged replica stays frozen), (T, dim).
        ref_next: the states of their references after the step, (T, dim).
        alive: (T,) the row has not diverged; ref_alive: its reference has not.
        args: (T, ...) per-row step arguments (hyper-parameters).
        t: the step index: ``x_next = F_t(x)``.
        strategy: how per-row work runs over the rows (see :func:`map_rows`): the run's
            replica strategy, so an observer's step follows the engine's.
    """

    flow: Callable
    x: Any
    carry: Any
    x_next: Any
    ref_next: Any
    alive: Any
    ref_alive: Any
    args: Any
    t: Any
    strategy: str | int = "vmap"

    def map(self, fn: Callable, *rows):
        """``fn`` of one row mapped over the leading axis of every argument in ``rows``."""
        return map_rows(fn, *rows, strategy=self.strategy)


STRATEGIES = ("vmap", "map")


def map_rows(fn: Callable, *rows, strategy: str | int = "vmap"):
    """``fn`` (of one row) over the leading axis of every argument: ``"vmap"`` (one batched
    program), ``"map"`` (``lax.map``: one row at a time, a loop inside the program), or an int
    B (``lax.map`` over vmapped blocks of B rows). Results are equal to round-off; only speed
    and memory differ (vmapping a convolution over per-replica weights makes it a grouped
    convolution, which XLA's CPU backend runs slower than a loop)."""
    if strategy == "vmap":
        return jax.vmap(fn)(*rows)
    if strategy == "map":
        return jax.lax.map(lambda a: fn(*a), rows)
    return jax.lax.map(lambda a: fn(*a), rows, batch_size=int(strategy))


def check_strategy(strategy) -> str | int:
    """A valid replica strategy (``"vmap"``, ``"map"`` or a block size ≥ 1) or ValueError."""
    if isinstance(strategy, str) and strategy in STRATEGIES:
        return strategy
    if isinstance(strategy, int | np.integer) and not isinstance(strategy, bool) and strategy >= 1:
        return "map" if int(strategy) == 1 else int(strategy)
    raise ValueError(
        f"strategy: must be 'vmap', 'map' or a block size (an integer >= 1), got {strategy!r}"
    )


def key_data(key) -> tuple[int, ...]:
    """A PRNG key (raw or typed, or an int seed) as a hashable tuple of its raw words."""
    if key is None:
        key = 0
    if isinstance(key, int | np.integer):
        key = jax.random.PRNGKey(int(key))
    key = jnp.asarray(key) if not hasattr(key, "dtype") else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return tuple(int(v) for v in np.asarray(key).ravel())


def _key(words: tuple[int, ...]):
    return jnp.asarray(np.asarray(words, np.uint32))


def _nan(shape, dtype):
    return jnp.full(shape, jnp.nan, dtype)


# ---------------------------------------------------------------------------------------------
# tangents: Lyapunov spectra, FTLEs and the CLV forward pass


class CLVWindow(NamedTuple):
    """The covariant-vector window of a :class:`LyapunovTracker`, in steps after the run's t0.

    The kept range is ``[start, start + steps)``; the R factors of every renormalisation in
    ``[start, start + steps + transient)`` are kept for the backward pass, and the basis and
    state every ``keep_every`` steps of the kept range. With ``by_records`` (``keep_every``
    equal to the run's ``record_every``) the bases are emitted with every record, which costs
    nothing extra when most records are kept; otherwise the engine ends a chunk at every kept
    step and reads them there.
    """

    start: int
    steps: int
    transient: int
    keep_every: int
    by_records: bool = False


@dataclasses.dataclass(frozen=True)
class LyapunovTracker(Observer):
    """k tangent vectors along the recorded trajectory of every tracked replica.

    From ``warmup`` steps after the run's first step the tangents are pushed through the
    linearisation of the very step the engine takes (``jax.linearize``, vmapped over the k
    vectors: cost ∝ k) and re-orthonormalised by the sign-fixed QR every ``renorm_every``
    steps; after ``align`` further steps (rounded up to whole renormalisations) the log R_ii
    are accumulated. Records (with a ``prefix``):

    * ``ftle`` (replica, step, exponent): at record step s, the mean log growth per step of
      the renormalisations that ended in (s − record_every, s] (NaN before accumulation, at
      the first record and for rows it does not track);
    * ``log_growth`` (replica, renorm, exponent): the raw log R_ii of every accumulated
      renormalisation (axis ``renorm``: its end step), float64 on the host;
    * ``tangent_loss`` (replica, step): the training loss of the state the tangents were
      linearised at (training maps) — the same trajectory as the ``loss`` record;
    * ``log_det`` (replica, tangent_step): log|det J| of every accumulated step (dense
      Jacobian; small systems, ``log_det=True``);
    * with ``clv``: ``clv_r`` (the k×k R factors), ``clv_basis`` and ``clv_state`` (the
      orthonormal basis and the state at the kept steps), kept in memory for the backward
      pass of :func:`chaosjax.covariant_lyapunov_vectors`.

    Args:
        k: number of tangent vectors (exponents).
        renorm_every: steps between QR renormalisations; keep (λ1 − λk)·renorm_every ≲ 8 in
            float32 and ≲ 18 in float64.
        warmup: steps after the run's first step before the tangents start.
        align: steps of tangent evolution (with renormalisation) before accumulation.
        rows: the rows tracked: ``"references"`` (default) or ``"all"``.
        key: raw words of the PRNG key of the random initial basis (see :func:`key_data`).
        log_det: record log|det J| per step (dense Jacobian) to check Σλ.
        clv: a :class:`CLVWindow` for covariant Lyapunov vectors.
        prefix: prefix of the record names and axes (two trackers in one run).
        allow_nonsmooth: take tangents even of a step that
            :func:`chaosjax.smoothness.step_smoothness` flags (Lion, sign-SGD): by default the
            engine voids this tracker for such a step (NaN records, the reason in the run's
            ``attrs["tangent_reason"]``, one :class:`~chaosjax.smoothness.NonSmoothWarning`).
        void: set by the engine: the reason this tracker records NaN ('' = it measures).
    """

    #: the engine decides from the step's program whether tangents mean something
    uses_tangents = True
    advances = True
    takes_step = True
    evaluates_all_rows = True

    k: int = 1
    renorm_every: int = 1
    warmup: int = 0
    align: int = 0
    rows: str = "references"
    key: tuple[int, ...] = (0, 0)
    log_det: bool = False
    clv: CLVWindow | None = None
    prefix: str = ""
    allow_nonsmooth: bool = False
    void: str = ""

    # -- geometry of the run ---------------------------------------------------------------

    def start(self, info: RunInfo) -> int:
        """The step at which the tangents start."""
        return info.t0 + self.warmup

    def accumulation_start(self, info: RunInfo) -> int:
        """The step from which log growth is accumulated (after warmup and align)."""
        n_align = -(-self.align // self.renorm_every) * self.renorm_every
        return self.start(info) + n_align

    def axes(self, info: RunInfo) -> dict[str, np.ndarray]:
        p, re = self.prefix, self.renorm_every
        end = info.t0 + info.steps
        acc = self.accumulation_start(info)
        out = {f"{p}renorm": np.arange(acc + re, end + 1, re, dtype=np.int64)}
        if self.log_det:
            out[f"{p}tangent_step"] = np.arange(acc + 1, end + 1, dtype=np.int64)
        if self.clv is not None:
            c = self.clv
            a = info.t0 + c.start
            out[f"{p}clv_renorm"] = np.arange(
                a + re, a + c.steps + c.transient + 1, re, dtype=np.int64
            )
            out[f"{p}kept"] = np.arange(a, a + c.steps, c.keep_every, dtype=np.int64)
        return out

    def snapshot_steps(self, info: RunInfo) -> tuple[int, ...]:
        if self.clv is None or self.clv.by_records:
            return ()
        return tuple(int(s) for s in self.axes(info)[f"{self.prefix}kept"])

    def records(self, model) -> dict[str, Record]:
        p = self.prefix
        out = {
            f"{p}ftle": Record("step", ("exponent",), "host"),
            f"{p}log_growth": Record(f"{p}renorm", ("exponent",), "step"),
        }
        if "loss" in model.capabilities:
            out[f"{p}tangent_loss"] = Record("step", (), "record")
        if self.log_det:
            out[f"{p}log_det"] = Record(f"{p}tangent_step", (), "step")
        if self.clv is not None:
            out[f"{p}clv_r"] = Record(f"{p}clv_renorm", ("exponent", "exponent2"), "step", False)
            how = "record" if self.clv.by_records else "snapshot"
            out[f"{p}clv_basis"] = Record(f"{p}kept", ("dim", "exponent"), how, False)
            out[f"{p}clv_state"] = Record(f"{p}kept", ("dim",), how, False)
        return out

    def validate(self, model, dim: int | None = None, info: RunInfo | None = None) -> None:
        if self.rows not in ("all", "references"):
            raise ValueError(f"rows: unknown {self.rows!r}; allowed: all, references")
        for name in ("renorm_every",):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ValueError(f"{name}: must be a positive integer, got {v!r}")
        for name in ("warmup", "align"):
            v = getattr(self, name)
            if int(v) != v or v < 0:
                raise ValueError(f"{name}: must be a non-negative integer, got {v!r}")
        if dim is not None and (int(self.k) != self.k or not 1 <= self.k <= dim):
            raise ValueError(
                f"k: must be an integer in [1, {dim}] (the state dimension), got {self.k!r}"
            )
        if info is None:
            return
        end = info.t0 + info.steps
        if self.accumulation_start(info) + self.renorm_every > end:
            raise ValueError(
                f"warmup: warmup {self.warmup} + align {self.align} leave no complete "
                f"renormalisation of {self.renorm_every} step(s) in the run of {info.steps} steps"
            )
        c = self.clv
        if c is None:
            return
        re = self.renorm_every
        if c.start < self.warmup or (c.start - self.warmup) % re:
            raise ValueError(
                f"clv: the window must start at warmup + a multiple of renorm_every={re} "
                f"(warmup {self.warmup}), got {c.start}"
            )
        if c.steps < re or c.steps % re or c.transient < 0 or c.transient % re:
            raise ValueError(
                f"clv: steps and backward_transient must be multiples of renorm_every={re}, "
                f"got {c.steps} and {c.transient}"
            )
        if c.keep_every < re or c.keep_every % re:
            raise ValueError(
                f"keep_every: must be a positive multiple of renorm_every={re}, got {c.keep_every}"
            )
        if c.start + c.steps + c.transient > info.steps:
            raise ValueError(
                f"clv: the window ({c.start} + {c.steps} steps) and its backward transient "
                f"({c.transient}) end after the run ({info.steps} steps)"
            )
        if c.by_records and c.keep_every != info.record_every:
            raise ValueError(
                f"clv: by_records needs keep_every = record_every={info.record_every}, got "
                f"{c.keep_every}"
            )
        bad = [
            s for s in self.axes(info)[f"{self.prefix}kept"] if (s - info.t0) % info.record_every
        ]
        if bad:
            raise ValueError(
                f"keep_every: kept steps must fall on records (every {info.record_every} steps); "
                f"step {bad[0]} does not"
            )

    # -- device side -----------------------------------------------------------------------

    def init(self, model, states, hparams, t):
        x = dynamic_rows(states)
        n, dim = x.shape
        q = random_basis(_key(self.key), dim, self.k, x.dtype)
        q = jnp.broadcast_to(q, (n, dim, self.k))
        return self._kept(x, q), q

    def update(self, model, states, hparams, q, t):
        return self._kept(dynamic_rows(states), q), q

    def _kept(self, x, q):
        """The basis and state at a record, when the CLV window keeps them by records."""
        if self.clv is None or not self.clv.by_records:
            return {}
        q = jnp.full_like(q, jnp.nan) if self.void else q
        return {f"{self.prefix}clv_basis": q, f"{self.prefix}clv_state": x}

    def evaluate(self, model, x, rows, t=None):
        """``tangent_loss``: the training loss of the states the tangents see (training maps),
        evaluated like the run's ``loss`` record (at record step t), on every row, and kept
        for ``rows``."""
        if "loss" not in model.capabilities:
            return {}
        loss = jax.vmap(lambda r: model.loss(r, "train", t))(x)
        return {f"{self.prefix}tangent_loss": jnp.take(loss, rows, mode="clip")}

    def _propagate(self, flow, x, carry, args, t, q):
        """One row: the step's primal outputs and J q (n, k) from one linearisation."""

        def f(v, t):
            x2, c2, loss = flow(v, carry, t, args)
            return x2, (c2, loss)

        x2, y, (c2, loss) = tangent_step(f, x, q, t, has_aux=True)
        return x2, c2, loss, y

    def _finish(self, info, ctx, y, alive):
        """Renormalise when due; the step's values (NaN where nothing was measured)."""
        n_rows, _, k = y.shape
        dt = y.dtype
        n = ctx.t + 1 - self.start(info)
        due = (n % self.renorm_every) == 0

        def qr(y):
            q, r = jax.vmap(qr_renormalize)(y)
            return q, r

        def keep(y):
            return y, _nan((n_rows, k, k), dt)

        q, r = jax.lax.cond(due, qr, keep, y) if self.renorm_every > 1 else qr(y)
        lg = jnp.log(jnp.abs(jnp.diagonal(r, axis1=-2, axis2=-1)))
        lg = jnp.where(alive[:, None], lg, jnp.nan)
        p = self.prefix
        out = {f"{p}log_growth": lg}
        if self.clv is not None:
            out[f"{p}clv_r"] = jnp.where(alive[:, None, None], r, jnp.nan)
        if self.log_det:

            def one(x, c, a):
                return log_abs_det(jax.jacfwd(lambda v: ctx.flow(v, c, ctx.t, a)[0])(x))

            ld = ctx.map(one, ctx.x, ctx.carry, ctx.args)
            out[f"{p}log_det"] = jnp.where(alive, ld, jnp.nan)
        return q, out

    def _idle_values(self, n_rows, dtype):
        p, k = self.prefix, self.k
        out = {f"{p}log_growth": _nan((n_rows, k), dtype)}
        if self.clv is not None:
            out[f"{p}clv_r"] = _nan((n_rows, k, k), dtype)
        if self.log_det:
            out[f"{p}log_det"] = _nan((n_rows,), dtype)
        return out

    def advance(self, info, ctx: StepContext, q):
        """Tangents along the rows' recorded step (the primal output is not used)."""

        def active(q):
            _, _, _, y = ctx.map(
                lambda x, c, a, qi: self._propagate(ctx.flow, x, c, a, ctx.t, qi),
                ctx.x, ctx.carry, ctx.args, q,
            )  # fmt: skip
            return self._finish(info, ctx, y, ctx.alive)

        def idle(q):
            return q, self._idle_values(q.shape[0], q.dtype)

        if self.void:  # a non-smooth step: nothing to measure
            q, out = idle(q)
        elif self.warmup == 0:
            q, out = active(q)
        else:
            q, out = jax.lax.cond(ctx.t >= self.start(info), active, idle, q)
        return q, out, None

    def step(self, info, ctx: StepContext, q):
        """The step of every row, taken by its linearisation, and the tangents."""

        def active(q):
            x2, c2, loss, y = ctx.map(
                lambda x, c, a, qi: self._propagate(ctx.flow, x, c, a, ctx.t, qi),
                ctx.x, ctx.carry, ctx.args, q,
            )  # fmt: skip
            ok = jnp.all(jnp.isfinite(x2), axis=-1) & ctx.alive
            q, out = self._finish(info, ctx, y, ok)
            return x2, c2, loss, q, out

        def idle(q):
            x2, c2, loss = ctx.map(
                lambda x, c, a: ctx.flow(x, c, ctx.t, a), ctx.x, ctx.carry, ctx.args
            )
            return x2, c2, loss, q, self._idle_values(q.shape[0], q.dtype)

        if self.void:  # a non-smooth step: the step alone
            return idle(q)
        if self.warmup == 0:
            return active(q)
        return jax.lax.cond(ctx.t >= self.start(info), active, idle, q)

    # -- host side -------------------------------------------------------------------------

    def host_records(self, info, values, steps, rec_steps) -> dict[str, np.ndarray]:
        """``ftle`` at the records ``rec_steps`` from this chunk's ``log_growth``."""
        p = self.prefix
        lg = values.get(f"{p}log_growth")
        t = steps.get(f"{p}renorm", np.zeros(0, np.int64))
        rec_steps = np.asarray(rec_steps)
        n_rows = lg.shape[0] if lg is not None else 0
        out = np.full((n_rows, rec_steps.size, self.k), np.nan)
        if lg is None or n_rows == 0 or t.size == 0:
            return {f"{p}ftle": out}
        # the renormalisations ending in (s − record_every, s]: consecutive segments of t
        lo = np.searchsorted(t, rec_steps - info.record_every, side="right")
        hi = np.searchsorted(t, rec_steps, side="right")
        count = hi - lo
        has = count > 0
        if has.any():
            sums = np.add.reduceat(lg, np.minimum(lo[has], t.size - 1), axis=1)
            out[:, has] = sums / (count[has] * self.renorm_every)[None, :, None]
        return {f"{p}ftle": out}

    def empty_host_records(self, n_rows: int, n: int) -> dict[str, np.ndarray]:
        return {f"{self.prefix}ftle": np.full((n_rows, n, self.k), np.nan)}

    def snapshot(self, info, t, q, x) -> dict[str, np.ndarray]:
        p = self.prefix
        q = np.full(np.shape(q), np.nan) if self.void else np.asarray(q)
        return {f"{p}clv_basis": q, f"{p}clv_state": np.asarray(x)}

    def memory(self, info, flow, x1, carry1, args1) -> dict[str, int]:
        """Bytes per tracked row: ``tangents`` (the basis and its image) and ``tangent step``
        (every intermediate of one tangent step, from its jaxpr)."""
        dim = int(x1.shape[-1])
        q1 = jax.ShapeDtypeStruct((dim, int(self.k)), x1.dtype)
        t = jnp.zeros((), jnp.int32)

        def one(x, c, a, q):
            return self._propagate(flow, x, c, a, t, q)

        return {
            "tangents": (int(self.k) + 1) * dim * np.dtype(x1.dtype).itemsize,
            "tangent step": int(estimate_bytes(one, x1, carry1, args1, q1)),
        }


# ---------------------------------------------------------------------------------------------
# finite perturbations: Benettin's two-trajectory estimate


@dataclasses.dataclass(frozen=True)
class TwinTracker(Observer):
    """Pull every perturbed replica back to distance ``d0`` from its reference every
    ``renorm_every`` steps and record log(d/d0) (axis ``twin_renorm``): Benettin's
    finite-perturbation estimate of the largest exponent. At ``warmup`` steps after the run's
    first step the perturbed replica is placed at ``d0`` along a random unit direction
    (drawn from ``key``); with ``warmup = 0`` the batch must start that way."""

    d0: float
    renorm_every: int = 1
    warmup: int = 0
    key: tuple[int, ...] = (0, 0)
    rows: str = "perturbed"

    advances = True

    def axes(self, info):
        start = info.t0 + self.warmup
        return {
            "twin_renorm": np.arange(
                start + self.renorm_every, info.t0 + info.steps + 1, self.renorm_every
            )
        }

    def records(self, model):
        return {"twin_log_growth": Record("twin_renorm", (), "step")}

    def validate(self, model, dim=None, info=None):
        if not self.d0 > 0:
            raise ValueError(f"d0: must be > 0, got {self.d0!r}")
        if int(self.renorm_every) != self.renorm_every or self.renorm_every < 1:
            raise ValueError(f"renorm_every: must be a positive integer, got {self.renorm_every!r}")

    def init(self, model, states, hparams, t):
        return {}, ()

    def update(self, model, states, hparams, state, t):
        return {}, state

    def direction(self, dim: int, dtype):
        u = jax.random.normal(_key(self.key), (dim,), dtype)
        return u / jnp.linalg.norm(u)

    def advance(self, info, ctx: StepContext, state):
        xp, xr = ctx.x_next, ctx.ref_next
        n = ctx.t + 1 - (info.t0 + self.warmup)
        d0 = jnp.asarray(self.d0, xp.dtype)
        delta = xp - xr
        d = jnp.linalg.norm(delta, axis=-1)
        due = (n > 0) & (n % self.renorm_every == 0)
        pulled = xr + delta * (d0 / jnp.where(d > 0, d, 1.0))[:, None]
        placed = xr + d0 * self.direction(xp.shape[-1], xp.dtype)[None, :]
        new = jnp.where(due, pulled, jnp.where(n == 0, placed, xp))
        ok = ctx.alive & ctx.ref_alive
        lg = jnp.where(due & ok, jnp.log(d / d0), jnp.nan)
        return state, {"twin_log_growth": lg}, jnp.where(ok[:, None], new, xp)


# ---------------------------------------------------------------------------------------------
# states at chosen steps


@dataclasses.dataclass(frozen=True)
class StateSnapshots(Observer):
    """The tracked replicas' states at ``at`` steps after the run's first step (record
    ``name``, axis ``name + "_step"``): states taken from the recorded run."""

    at: tuple[int, ...]
    rows: str = "references"
    name: str = "state"

    def axes(self, info):
        return {f"{self.name}_step": np.asarray([info.t0 + a for a in self.at], np.int64)}

    def snapshot_steps(self, info):
        return tuple(info.t0 + int(a) for a in self.at)

    def records(self, model):
        return {self.name: Record(f"{self.name}_step", ("dim",), "snapshot")}

    def validate(self, model, dim=None, info=None):
        if self.rows not in ROWS:
            raise ValueError(f"rows: unknown {self.rows!r}; allowed: {', '.join(ROWS)}")
        if info is not None:
            for a in self.at:
                if not 0 <= a <= info.steps or a % info.record_every:
                    raise ValueError(
                        f"at: snapshot steps must be records within the run (multiples of "
                        f"{info.record_every} in [0, {info.steps}]), got {a}"
                    )

    def init(self, model, states, hparams, t):
        return {}, ()

    def update(self, model, states, hparams, state, t):
        return {}, state

    def snapshot(self, info, t, state, x):
        return {self.name: np.asarray(x)}


def dynamic_rows(states):
    """The dynamical coordinates (R, dim) of the rows an observer is handed (a training map
    that carries state hands ``MapState(x, carry)`` rows)."""
    return states.x if isinstance(states, MapState) else states


__all__ = [
    "ROWS",
    "CLVWindow",
    "LyapunovTracker",
    "Record",
    "RunInfo",
    "StateSnapshots",
    "StepContext",
    "TwinTracker",
    "key_data",
    "records_of",
]
