"""Lyapunov exponents of any map ``step(x, t) -> x``, as observers of one trajectory.

* :func:`lyapunov_spectrum` / :func:`max_lyapunov`: Benettin's QR method. k tangent vectors
  are pushed through ``jax.linearize`` of the step (vmapped over the vectors: cost ∝ k, no
  dense Jacobian) and re-orthonormalised by a sign-fixed QR every ``renorm_every`` steps; the
  log R_ii are gathered on the host and summed in float64 whatever the state dtype.
* :func:`twin_lyapunov`: the finite-perturbation (two-trajectory) estimate.
* :func:`ensemble_log_distance`, :func:`best_window_fit`, :func:`local_growth_rates`:
  divergence of perturbed replicas, Danovski et al.'s best-window exponential fit, and the
  nonlinear growth of random perturbations over a fixed horizon.

The drivers are thin calls of the one engine (:func:`chaosjax.run_replicas` with a
:class:`chaosjax.LyapunovTracker` or :class:`chaosjax.observers.TwinTracker`): progress,
divergence flags, checkpoints and resume, sharding, passes and the memory plan come from it.
Inside a replica run the same observer measures the exponents of the very trajectory the run
records.

Exponents are per step (natural log). For a flow stepped by ``dt`` divide by ``dt``
(:meth:`LyapunovResult.per_time`); for training, :meth:`LyapunovResult.per_eta_t` gives
exponents per unit of ηt.

References:
    Benettin, Galgani, Giorgilli, Strelcyn (1980). Lyapunov characteristic exponents for
    smooth dynamical systems. Meccanica 15.
    Danovski, Soriano, Lacasa (2024). Dynamical stability and chaos in artificial neural
    network trajectories along training. arXiv:2404.05782.

The ensemble estimates live in :mod:`chaosjax._divergence` and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from chaosjax._divergence import (  # the ensemble estimates, documented with these
    ACCEPTANCE_RULE,
    WindowFit,
    best_window_fit,
    ensemble_log_distance,
    local_growth_rates,
)
from chaosjax._layout import layout_of
from chaosjax._util import (
    as_traceable,
    check_step_signature,
    warn_if_below_resolution,
)
from chaosjax.observers import LyapunovTracker, TwinTracker, key_data
from chaosjax.sharding import MemoryEstimate
from chaosjax.tangents import (
    log_det_jacobian,
    qr_renormalize,
    random_basis,
    tangent_step,
)

# ---------------------------------------------------------------------------------------------
# results


@dataclasses.dataclass
class LyapunovResult:
    """Exponents from accumulated log growth.

    Attributes:
        log_growth: raw log R_ii per renormalisation, float64, shape (n, k) (a leading batch
            axis with ``batched=True``).
        renorm_every: steps between renormalisations.
        t_start: time index of the first accumulated step.
        final_state: the state after the last step (flat float part).
        final_basis: the tangent basis after the last step, shape (dim, k).
        log_det: mean log|det J| per step along the trajectory (small systems; else None).
        method: ``"qr"`` (tangent space) or ``"twin"`` (finite perturbation).
        reasons: why an exponent is NaN, per batch element ('' when valid).
        reason: the first non-empty reason ('' when every exponent is valid), e.g. a step that
            is not smooth (:func:`chaosjax.smoothness.step_smoothness`).

    All exponents are per step, natural log.
    """

    log_growth: np.ndarray
    renorm_every: int
    t_start: int
    final_state: np.ndarray | None = None
    final_basis: np.ndarray | None = None
    log_det: np.ndarray | None = None
    method: str = "qr"
    reasons: Any = ""
    n_blocks: int = 10
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def steps(self) -> int:
        return int(self.log_growth.shape[-2]) * self.renorm_every

    @property
    def reason(self) -> str:
        reasons = [self.reasons] if isinstance(self.reasons, str) else list(self.reasons)
        return next((r for r in reasons if r), "")

    @property
    def exponents(self) -> np.ndarray:
        """Exponents per step, shape (k,) (or (batch, k)), largest first for QR."""
        return self.log_growth.mean(axis=-2) / self.renorm_every

    @property
    def exponent(self) -> np.ndarray | float:
        """The largest exponent (k = 1 and twin estimates)."""
        e = self.exponents[..., 0]
        return float(e) if np.ndim(e) == 0 else e

    @property
    def stderr(self) -> np.ndarray:
        """Standard error of the exponents by batch means over ``n_blocks`` blocks (NaN when
        fewer than 4 renormalisations per block)."""
        n = self.log_growth.shape[-2]
        nb = min(self.n_blocks, n // 4)
        if nb < 2:
            return np.full(self.exponents.shape, np.nan)
        m = (n // nb) * nb
        g = self.log_growth[..., n - m :, :]
        blocks = (
            g.reshape(*g.shape[:-2], nb, m // nb, g.shape[-1]).mean(axis=-2) / self.renorm_every
        )
        return blocks.std(axis=-2, ddof=1) / np.sqrt(nb)

    @property
    def running(self) -> np.ndarray:
        """Running estimate after each renormalisation (convergence history), shape (n, k)."""
        n = self.log_growth.shape[-2]
        csum = np.cumsum(self.log_growth, axis=-2)
        return csum / (self.renorm_every * np.arange(1, n + 1))[:, None]

    @property
    def times(self) -> np.ndarray:
        """Time index at the end of each renormalisation interval, shape (n,)."""
        n = self.log_growth.shape[-2]
        return self.t_start + self.renorm_every * np.arange(1, n + 1)

    def ftle(self, window: int) -> np.ndarray:
        """Finite-time exponents over consecutive non-overlapping windows of ``window`` steps.

        Returns:
            Array (n_windows, k) (or (batch, n_windows, k)), per step.
        """
        window = int(window)
        if window < self.renorm_every or window % self.renorm_every:
            raise ValueError(
                f"window: must be a positive multiple of renorm_every={self.renorm_every}, got {window}"
            )
        per = window // self.renorm_every
        n = self.log_growth.shape[-2] // per
        if n == 0:
            raise ValueError(f"window: {window} is longer than the run ({self.steps} steps)")
        g = self.log_growth[..., : n * per, :]
        return g.reshape(*g.shape[:-2], n, per, g.shape[-1]).sum(axis=-2) / window

    def ftle_times(self, window: int) -> np.ndarray:
        """Time index at the end of each FTLE window."""
        per = int(window) // self.renorm_every
        n = self.log_growth.shape[-2] // per
        return self.t_start + window * np.arange(1, n + 1)

    def per_time(self, dt: float) -> np.ndarray:
        """Exponents per unit time of a flow stepped by ``dt``."""
        return self.exponents / dt

    def per_eta_t(self, eta) -> np.ndarray:
        """Exponents per unit of ηt (training maps with learning rate η; broadcast over batch)."""
        eta = np.asarray(eta, np.float64)
        return self.exponents / (eta[..., None] if eta.ndim else eta)

    @property
    def sum_check(self) -> np.ndarray | None:
        """Σλ − ⟨log|det J|⟩ (≈ 0 for a full spectrum), or None where not computed."""
        if self.log_det is None:
            return None
        return self.exponents.sum(axis=-1) - self.log_det


# ---------------------------------------------------------------------------------------------
# drivers: one run of the engine with one observer


def _prepare(step, x0, batched, args):
    """A replica batch of the initial conditions, each its own reference (rows × dim), and the
    layout of the state."""
    from chaosjax.replicas import ReplicaBatch

    step = as_traceable(step)
    if args is None:
        check_step_signature(step)
    leaves = jax.tree_util.tree_leaves(x0)
    if batched:
        sizes = {int(jnp.shape(v)[0]) if jnp.ndim(v) else -1 for v in leaves}
        if len(sizes) != 1 or -1 in sizes:
            raise ValueError("x0: with batched=True every leaf needs the same leading batch axis")
        if len(leaves) == 1 and jnp.ndim(leaves[0]) == 1:
            raise ValueError(
                f"x0: with batched=True x0 needs shape (batch, dim); got {jnp.shape(leaves[0])}, "
                "a single state (use batched=False)"
            )
        n = next(iter(sizes))
    else:
        n = 1
    lay = layout_of(x0, batched=batched, what="x0")
    if lay.dim == 0:
        raise TypeError("x0: the state has no floating-point leaves to take tangents of")
    if batched:
        x, carry = jax.vmap(lay.split)(x0)
        if args is not None:
            for leaf in jax.tree_util.tree_leaves(args):
                if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != n:
                    raise ValueError(
                        "args: with batched=True every leaf needs the leading batch axis of x0"
                    )
    else:
        x, carry = lay.split(x0)
        x, carry = x[None], tuple(jnp.asarray(c)[None] for c in carry)
        if args is not None:
            args = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], args)
    batch = ReplicaBatch(
        states=jnp.asarray(x),
        hparams={} if args is None else args,
        reference=np.arange(n, dtype=np.int32),
        coords={"member": np.zeros(n, np.int64)},
        carry=tuple(carry),
        layout=None if lay.trivial else lay,
    )
    return step, batch, int(x.shape[-1])


def _check_run(steps, renorm_every, k=None, dim=None):
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps: must be a positive integer, got {steps!r}")
    if int(renorm_every) != renorm_every or renorm_every < 1:
        raise ValueError(f"renorm_every: must be a positive integer, got {renorm_every!r}")
    if steps % renorm_every:
        raise ValueError(f"steps: must be a multiple of renorm_every={renorm_every}, got {steps}")
    if k is not None and (int(k) != k or not 1 <= k <= dim):
        raise ValueError(f"k: must be an integer in [1, {dim}] (the state dimension), got {k!r}")


def _check_windows(**windows):
    for name, v in windows.items():
        if int(v) != v or v < 0:
            raise ValueError(f"{name}: must be a non-negative integer, got {v!r}")


#: XLA's CPU runtime runs the kernels of a loop body one after another, without its
#: concurrent scheduler, when every buffer they touch has at most this many bytes
#: (``ThunkExecutor::Options.execute_sequential_buffer_threshold``); for a small system the
#: scheduler costs more than the step (Hénon with k = 2: 0.094 s against 0.057 s for 10⁵ steps)
CPU_SEQUENTIAL_BYTES = 512
#: the fewest steps per record that :func:`_record_cadence` picks (the records' own loop)
MIN_RECORD_STEPS = 16


def _record_cadence(r: int, states, per_step: int) -> int:
    """The steps per record of a driver's run: ``r`` (the fewest records its windows allow)
    or, on the CPU for a small system, the largest divisor of ``r`` of at least
    :data:`MIN_RECORD_STEPS` steps whose per-step values (``per_step`` numbers a row, stacked
    over a record) fit :data:`CPU_SEQUENTIAL_BYTES` — when the state and its ``per_step``
    tangents fit it too. Records are bookkeeping here; the numbers do not depend on the
    cadence."""
    rows, dim = states.shape
    size = jnp.dtype(states.dtype).itemsize
    if jax.default_backend() != "cpu" or rows * dim * (per_step + 1) * size > CPU_SEQUENTIAL_BYTES:
        return r
    most = CPU_SEQUENTIAL_BYTES // (rows * per_step * size)
    fits = [d for d in range(MIN_RECORD_STEPS, min(most, r) + 1) if r % d == 0]
    return max(fits) if fits else r


def _engine(
    step, batch, trackers, *, batched, total, t0, chunk_steps, windows, desc, per_step=0, **kw
):
    """One run of the engine for a driver. Records are bookkeeping here, so as few as the
    run's windows allow: record_every divides the run, every window start and the chunk
    (``per_step``: numbers a row records every step, see :func:`_record_cadence`)."""
    from chaosjax import engine

    if not batched:
        kw["devices"] = 1  # one trajectory: nothing to share
    r = math.gcd(int(total), max(int(chunk_steps), 1), *[int(w) for w in windows if w])
    if per_step:
        r = _record_cadence(r, batch.states, per_step)
    return engine.run_replicas(
        step,
        batch,
        steps=total,
        record_every=r,
        observables=(),
        trackers=trackers,
        chunk_steps=max(r, (int(chunk_steps) // r) * r),
        t0=int(t0),
        desc=desc,
        **kw,
    )


def tangent_memory(step, x0, *, k: int, batched: bool = False, args=None) -> MemoryEstimate:
    """Device memory one replica of :func:`lyapunov_spectrum` needs: the state, the k tangent
    vectors and every intermediate of one tangent step (from its jaxpr)."""
    from chaosjax.engine import replica_memory

    step, batch, _ = _prepare(step, x0, batched, args)
    one = batch.subset([0])
    return replica_memory(step, one, [LyapunovTracker(k=int(k), rows="all")])


def lyapunov_spectrum(
    step: Callable,
    x0,
    *,
    k: int,
    steps: int,
    warmup: int = 0,
    align: int = 0,
    renorm_every: int = 1,
    key=None,
    batched: bool = False,
    args=None,
    t0: int = 0,
    log_det: bool | None = None,
    chunk_steps: int = 10_000,
    progress: bool = False,
    checkpoint=None,
    resume: bool = False,
    n_blocks: int = 10,
    devices=None,
    memory_limit=None,
    strategy: str | int | None = None,
    allow_nonsmooth: bool = False,
) -> LyapunovResult:
    """The top-k Lyapunov spectrum of ``step`` by Benettin's QR method.

    One run of the replica engine with a :class:`chaosjax.LyapunovTracker` tracking every
    initial condition: the tangents are linearised along the states that run computes.

    Args:
        step: ``step(x, t) -> x`` (``step(x, t, args)`` when ``args`` is given); any
            pytree state — float leaves are tangent, integer leaves and keys ride along —
            e.g. a :class:`chaosjax.TrainingMap` step on its flat state.
        x0: initial state (a leading batch axis on every leaf with ``batched=True``).
        k: number of exponents (1 ≤ k ≤ dim).
        steps: accumulated steps (a multiple of ``renorm_every``).
        warmup: steps that advance the state only, before anything else.
        align: steps that evolve and re-orthonormalise the tangents without accumulating.
        renorm_every: steps between QR renormalisations; keep (λ1 − λk)·renorm_every ≲ 8 in
            float32 and ≲ 18 in float64.
        key: PRNG key of the random initial basis (default ``PRNGKey(0)``).
        batched: run a leading axis of initial conditions / replicas as one vmapped batch.
        args: extra per-run argument passed to the step (batched like x0), e.g. the
            hyper-parameters of :meth:`TrainingMap.step_with` for a learning-rate grid.
        t0: time index of ``x0`` (training maps use it for batches and counters).
        log_det: accumulate log|det J| (dense Jacobian) to check Σλ; default on for a full
            spectrum (k = dim) of a state with dim ≤ 64.
        chunk_steps: steps per jitted chunk between host transfers.
        progress: show a progress bar.
        checkpoint: ``.npz`` path written after every chunk; ``resume=True`` continues it.
        n_blocks: blocks for the batch-means standard error.
        devices: with ``batched=True``, the devices sharing the batch axis
            (:func:`chaosjax.sharding.replica_mesh`; default every accelerator, one CPU device).
        memory_limit: bytes (or ``"8GiB"``) per device; a batch whose tangents do not fit
            runs in passes, and a run where one replica does not fit is refused.
        strategy: how a device runs the batch's rows (``"vmap"``, ``"map"`` or a block size;
            see :func:`chaosjax.engine.run_replicas`).
        allow_nonsmooth: compute tangent exponents even for a step that is not smooth (Lion,
            sign-SGD: :func:`chaosjax.smoothness.step_smoothness`); by default such a step gives
            NaN exponents, the reason in ``.reason`` and one
            :class:`~chaosjax.smoothness.NonSmoothWarning` — use :func:`twin_lyapunov` or
            replica distances instead.

    Returns:
        :class:`LyapunovResult`; ``.exponents`` has shape (k,) (or (batch, k)).
    """
    step, batch, dim = _prepare(step, x0, batched, args)
    _check_run(steps, renorm_every, k, dim)
    _check_windows(warmup=warmup, align=align)
    if log_det is None:
        log_det = k == dim and dim <= 64
    re = int(renorm_every)
    n_align = -(-int(align) // re) * re
    total = int(warmup) + n_align + int(steps)
    tracker = LyapunovTracker(
        k=int(k),
        renorm_every=re,
        warmup=int(warmup),
        align=int(align),
        rows="all",
        key=key_data(key),
        log_det=bool(log_det),
        allow_nonsmooth=bool(allow_nonsmooth),
    )
    res = _engine(
        step,
        batch,
        [tracker],
        batched=batched,
        total=total,
        t0=t0,
        chunk_steps=chunk_steps,
        windows=(int(warmup) + n_align,),
        per_step=int(k),
        progress=progress,
        desc="lyapunov",
        checkpoint=checkpoint,
        resume=resume,
        devices=devices,
        memory_limit=memory_limit,
        strategy=strategy,
    )
    lg = res.records["log_growth"]
    ld = res.records["log_det"].sum(axis=1) / steps if log_det else None
    out = LyapunovResult(
        log_growth=lg if batched else lg[0],
        renorm_every=re,
        t_start=int(t0) + int(warmup) + n_align,
        final_state=res.final_state if batched else res.final_state[0],
        final_basis=res.tracker_states[0] if batched else res.tracker_states[0][0],
        log_det=None if ld is None else (ld if batched else float(ld[0])),
        n_blocks=n_blocks,
        info={
            "dim": dim,
            "dtype": str(batch.states.dtype),
            "k": int(k),
            "passes": int(res.attrs.get("passes", 1)),
        },
    )
    void = res.attrs.get("tangent_reason", "")
    reasons = [void] * lg.shape[0] if void else _reasons(lg, res.axes["renorm"], res.diverged_step)
    out.reasons = reasons if batched else reasons[0]
    _warn_spread(lg, batch.states.dtype)
    return out


def _reasons(lg: np.ndarray, ends: np.ndarray, diverged_step: np.ndarray) -> list[str]:
    """Why the exponents of each row are not finite ('' when they are): the state diverged, a
    tangent overflowed or collapsed, or the step has no derivative there."""
    out = []
    finite = np.isfinite(lg).all(axis=(1, 2))
    for g, div, ok in zip(lg, diverged_step, finite):
        if ok:
            out.append("")
            continue
        bad = ~np.isfinite(g).all(axis=-1)
        i = int(np.argmax(bad))
        end = int(ends[i])
        if div >= 0 and div <= end:
            out.append(
                f"non-finite growth from renormalisation {i}: the state became non-finite or "
                f"left its bounds at step {int(div)}"
            )
        elif np.isposinf(g[i]).any():
            out.append(
                f"non-finite growth from renormalisation {i} (step {end}): a tangent overflowed; "
                "lower renorm_every"
            )
        elif np.isneginf(g[i]).any():
            out.append(
                f"non-finite growth from renormalisation {i} (step {end}): a tangent collapsed "
                "to zero (the step is not injective along it, e.g. k > the rank of the Jacobian)"
            )
        else:
            out.append(
                f"non-finite growth from renormalisation {i} (step {end}): the tangents became "
                "NaN while the state stayed finite — the step is not differentiable there (a "
                "square root, division or log at a point where its derivative is infinite)"
            )
    return out


def _warn_spread(lg: np.ndarray, dtype) -> None:
    with np.errstate(invalid="ignore"):
        spread = (
            np.nanmax(lg[..., 0] - lg[..., -1])
            if lg.shape[-1] > 1 and np.isfinite(lg).any()
            else 0.0
        )
    limit = 18.0 if jnp.dtype(dtype) == jnp.float64 else 8.0
    if np.isfinite(spread) and spread > limit:
        warnings.warn(
            f"renorm_every: the log-growth spread between the first and last exponent reached "
            f"{spread:.1f} within one renormalisation (limit ≈ {limit:g} for {jnp.dtype(dtype).name}); "
            "the smallest exponents may be inaccurate: lower renorm_every",
            stacklevel=3,
        )


def max_lyapunov(step: Callable, x0, *, steps: int, **kwargs) -> LyapunovResult:
    """The largest Lyapunov exponent (k = 1 of :func:`lyapunov_spectrum`); ``.exponent``."""
    return lyapunov_spectrum(step, x0, k=1, steps=steps, **kwargs)


def twin_lyapunov(
    step: Callable,
    x0,
    *,
    d0: float | None = None,
    steps: int,
    renorm_every: int = 1,
    key=None,
    batched: bool = False,
    warmup: int = 0,
    args=None,
    t0: int = 0,
    chunk_steps: int = 10_000,
    progress: bool = False,
    checkpoint=None,
    resume: bool = False,
    devices=None,
    memory_limit=None,
    strategy: str | int | None = None,
) -> LyapunovResult:
    """The largest exponent from two trajectories (Benettin's finite-perturbation method).

    A perturbed copy at distance ``d0`` (Euclidean, over the float state) is evolved with the
    reference as a second replica of the engine; every ``renorm_every`` steps log(d/d0) is
    recorded and the copy is pulled back to distance ``d0`` along the current difference
    (:class:`chaosjax.observers.TwinTracker`).

    Args:
        d0: separation; default √(machine ε)·max(rms(x0), 1) (1.5e-8 in float64). A warning
            is issued when ``d0`` is below the dtype's resolution.
        checkpoint, resume: as for :func:`lyapunov_spectrum`.
        devices, memory_limit: with ``batched=True``, the devices sharing the batch axis and
            the memory a device may use.
        strategy: how a device runs the rows (see :func:`chaosjax.engine.run_replicas`).
        Other arguments as for :func:`lyapunov_spectrum`.

    Returns:
        :class:`LyapunovResult` with ``method="twin"``; ``.exponent`` is the estimate.
    """
    from chaosjax.replicas import ReplicaBatch

    step, batch, dim = _prepare(step, x0, batched, args)
    _check_run(steps, renorm_every)
    _check_windows(warmup=warmup)
    vec = np.asarray(batch.states, np.float64)
    scale = float(np.sqrt(np.mean(vec**2)))
    eps = float(jnp.finfo(batch.states.dtype).eps)
    if d0 is None:
        d0 = math.sqrt(eps) * max(scale, 1.0)
    d0 = float(d0)
    if not d0 > 0:
        raise ValueError(f"d0: must be > 0, got {d0!r}")
    warn_if_below_resolution(d0, batch.states.dtype, max(scale, 1e-30), what="d0")
    twin = TwinTracker(d0=d0, renorm_every=int(renorm_every), warmup=int(warmup), key=key_data(key))
    n = len(batch)
    pairs = np.repeat(np.arange(n), 2)
    copy = jnp.asarray(batch.states)
    if int(warmup) == 0:  # the copy starts at d0; after a warmup the observer places it
        copy = copy + d0 * twin.direction(dim, copy.dtype)[None, :]
    states = jnp.stack([batch.states, copy], axis=1).reshape(2 * n, dim)
    pair_batch = ReplicaBatch(
        states=states,
        hparams=jax.tree_util.tree_map(lambda a: jnp.asarray(a)[pairs], batch.hparams),
        reference=(2 * np.arange(n)).repeat(2).astype(np.int32),
        coords={"member": np.tile([0, 1], n)},
        carry=tuple(jnp.asarray(c)[pairs] for c in batch.carry),
        layout=batch.layout,
    )
    total = int(warmup) + int(steps)
    res = _engine(
        step,
        pair_batch,
        [twin],
        batched=batched,
        total=total,
        t0=t0,
        chunk_steps=chunk_steps,
        windows=(int(warmup),),
        per_step=1,
        progress=progress,
        desc="twin",
        checkpoint=checkpoint,
        resume=resume,
        devices=devices,
        memory_limit=memory_limit,
        strategy=strategy,
    )
    lg = res.records["twin_log_growth"][1::2, :, None]
    out = LyapunovResult(
        log_growth=lg if batched else lg[0],
        renorm_every=int(renorm_every),
        t_start=int(t0) + int(warmup),
        final_state=res.final_state[0::2] if batched else res.final_state[0],
        method="twin",
        info={"d0": d0, "passes": int(res.attrs.get("passes", 1))},
    )
    div = np.maximum(res.diverged_step[0::2], res.diverged_step[1::2])
    div = np.where((res.diverged_step[0::2] < 0) & (res.diverged_step[1::2] < 0), -1, div)
    reasons = _reasons(lg, res.axes["twin_renorm"], div)
    out.reasons = reasons if batched else reasons[0]
    return out


__all__ = [
    "ACCEPTANCE_RULE",
    "LyapunovResult",
    "WindowFit",
    "best_window_fit",
    "ensemble_log_distance",
    "local_growth_rates",
    "log_det_jacobian",
    "lyapunov_spectrum",
    "max_lyapunov",
    "qr_renormalize",
    "random_basis",
    "tangent_memory",
    "tangent_step",
    "twin_lyapunov",
]
