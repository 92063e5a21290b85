"""Lyapunov exponents of any map ``step(x, t) -> x``.

Small pure pieces (``tangent_step``, ``qr_renormalize``) and one-call drivers built on them:

* :func:`lyapunov_spectrum` / :func:`max_lyapunov`: Benettin's QR method. k tangent vectors
  are pushed through ``jax.linearize`` of the step (vmapped over the vectors: cost ∝ k, no
  dense Jacobian) and re-orthonormalised by a sign-fixed QR every ``renorm_every`` steps; the
  log R_ii are gathered on the host and summed in float64 whatever the state dtype.
* :func:`twin_lyapunov`: the finite-perturbation (two-trajectory) estimate.
* :func:`ensemble_log_distance`, :func:`best_window_fit`, :func:`local_growth_rates`:
  divergence of perturbed replicas, Danovski et al.'s best-window exponential fit, and the
  nonlinear growth of random perturbations over a fixed horizon.

Exponents are per step (natural log). For a flow stepped by ``dt`` divide by ``dt``
(:meth:`LyapunovResult.per_time`); for training, :meth:`LyapunovResult.per_eta_t` gives
exponents per unit of ηt.

References:
    Benettin, Galgani, Giorgilli, Strelcyn (1980). Lyapunov characteristic exponents for
    smooth dynamical systems. Meccanica 15.
    Danovski, Soriano, Lacasa (2024). Dynamical stability and chaos in artificial neural
    network trajectories along training. arXiv:2404.05782.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from chaosjax._driver import run_chunks
from chaosjax._util import as_traceable, check_step_signature, dumps, warn_if_below_resolution
from chaosjax.sharding import (
    MemoryEstimate,
    donating_jit,
    estimate_bytes,
    gather,
    is_sharded,
    pad_rows,
    padded_size,
    pass_path,
    plan_batches,
    put_rows,
    replica_mesh,
)

# ---------------------------------------------------------------------------------------------
# flat views of pytree states


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How a pytree state maps to (float vector, non-float leaves)."""

    treedef: Any
    is_float: tuple[bool, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    dtype: str

    @property
    def trivial(self) -> bool:
        return self.treedef.num_leaves == 1 and self.is_float[0] and len(self.shapes[0]) == 1


def _layout(x, batched: bool) -> _Layout:
    leaves, treedef = jax.tree_util.tree_flatten(x)
    if not leaves:
        raise ValueError("x0: the state has no array leaves")
    leaves = [jnp.asarray(v) for v in leaves]
    is_float = tuple(bool(jnp.issubdtype(v.dtype, jnp.inexact)) for v in leaves)
    if not any(is_float):
        raise TypeError("x0: the state has no floating-point leaves to take tangents of")
    shapes = tuple(tuple(v.shape[1:] if batched else v.shape) for v in leaves)
    dtypes = tuple(v.dtype.name for v in leaves)
    fdt = jnp.result_type(*[v.dtype for v, f in zip(leaves, is_float) if f]).name
    return _Layout(treedef, is_float, shapes, dtypes, fdt)


def _to_flat(lay: _Layout, x):
    """Unbatched pytree → (float vector, tuple of non-float leaves)."""
    leaves = jax.tree_util.tree_leaves(x)
    vec = [jnp.ravel(v).astype(lay.dtype) for v, f in zip(leaves, lay.is_float) if f]
    aux = tuple(v for v, f in zip(leaves, lay.is_float) if not f)
    return jnp.concatenate(vec) if len(vec) > 1 else vec[0], aux


def _from_flat(lay: _Layout, vec, aux):
    out, off, ai = [], 0, 0
    for f, shape, dt in zip(lay.is_float, lay.shapes, lay.dtypes):
        if f:
            size = math.prod(shape)
            out.append(vec[off : off + size].reshape(shape).astype(dt))
            off += size
        else:
            out.append(aux[ai])
            ai += 1
    return jax.tree_util.tree_unflatten(lay.treedef, out)


def _flat_step(step, lay: _Layout, vec, aux, t, args):
    if lay.trivial:
        y = step(vec, t) if args is None else step(vec, t, args)
        return y.astype(vec.dtype), aux
    x = _from_flat(lay, vec, aux)
    y = step(x, t) if args is None else step(x, t, args)
    return _to_flat(lay, y)


# ---------------------------------------------------------------------------------------------
# pure pieces


def tangent_step(step: Callable, x, basis, t, args=None):
    """Advance a state and k tangent vectors by one step.

    Args:
        step: ``step(x, t) -> x`` (or ``step(x, t, args)``) on a flat array state.
        x: state, shape (n,).
        basis: tangent vectors as columns, shape (n, k).
        t: time index.
        args: optional extra argument of the step (e.g. hyper-parameters).

    Returns:
        ``(x_next, J basis)`` with shapes (n,) and (n, k); one linearisation of the step,
        reused for the k vectors (cost ∝ k, no dense Jacobian).
    """
    f = (lambda v: step(v, t)) if args is None else (lambda v: step(v, t, args))
    y, lin = jax.linearize(f, x)
    return y, jax.vmap(lin, in_axes=1, out_axes=1)(basis)


def qr_renormalize(y):
    """Sign-fixed QR of tangent columns: ``y = Q R`` with diag(R) ≥ 0.

    Args:
        y: tangent vectors as columns, shape (n, k).

    Returns:
        ``(Q, R)``: orthonormal columns (n, k) and upper-triangular R (k, k) with a
        non-negative diagonal; log R_ii are the local growth rates.
    """
    q, r = jnp.linalg.qr(y)
    s = jnp.sign(jnp.diagonal(r))
    s = jnp.where(s == 0, 1, s).astype(y.dtype)
    return q * s[None, :], r * s[:, None]


def random_basis(key, n: int, k: int, dtype=None):
    """A seeded random orthonormal basis, shape (n, k)."""
    dtype = dtype or jnp.asarray(0.0).dtype
    q, _ = qr_renormalize(jax.random.normal(key, (n, k), dtype))
    return q


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
# chunk functions (module level so jit caches them across calls)


def _qr_unit(step, lay, args, carry, *, renorm_every, with_det, full_r=False):
    vec, aux, q, t = carry

    def one(c, _):
        v, a, y, t, ld = c

        def f(vv):
            return _flat_step(step, lay, vv, a, t, args)

        (v2, a2), lin = jax.linearize(f, v)
        y2 = jax.vmap(lambda col: lin(col)[0], in_axes=1, out_axes=1)(y)
        if with_det:
            jac = jax.jacfwd(lambda vv: f(vv)[0])(v)
            ld = ld + jnp.linalg.slogdet(jac)[1]
        return (v2, a2, y2, t + 1, ld), None

    ld0 = jnp.zeros((), jnp.result_type(float))
    (vec, aux, y, t, ld), _ = jax.lax.scan(one, (vec, aux, q, t, ld0), None, length=renorm_every)
    q, r = qr_renormalize(y)
    lg = r if full_r else jnp.log(jnp.abs(jnp.diagonal(r)))
    lg = jnp.where(jnp.all(jnp.isfinite(vec)), lg, jnp.nan)  # a non-finite state invalidates it
    return (vec, aux, q, t), (lg, ld)


def _qr_chunk(step, lay, args, carry, n, renorm_every, with_det, batched, full_r=False):
    unit = functools.partial(_qr_unit, renorm_every=renorm_every, with_det=with_det, full_r=full_r)

    def body(c, _):
        if batched:
            vec, aux, q, t = c
            (vec, aux, q, _), out = jax.vmap(
                lambda v, a, qq, ar: unit(step, lay, ar, (v, a, qq, t))
            )(vec, aux, q, args)
            # the clock advances outside the vmap: reading it from a (sharded) batch row would
            # make every device wait for the first one
            return (vec, aux, q, t + renorm_every), out
        return unit(step, lay, args, c)

    return jax.lax.scan(body, carry, None, length=n)


_qr_chunk_jit = donating_jit(
    _qr_chunk, ("lay", "n", "renorm_every", "with_det", "batched", "full_r"), (3,)
)


def _state_chunk(step, lay, args, carry, n, batched):
    def body(c, _):
        vec, aux, t = c
        if batched:
            vec, aux = jax.vmap(lambda v, a, ar: _flat_step(step, lay, v, a, t, ar))(vec, aux, args)
        else:
            vec, aux = _flat_step(step, lay, vec, aux, t, args)
        return (vec, aux, t + 1), None

    return jax.lax.scan(body, carry, None, length=n)[0], None


_state_chunk_jit = donating_jit(_state_chunk, ("lay", "n", "batched"), (3,))


def _twin_unit(step, lay, args, carry, *, renorm_every, d0):
    vec, aux, vp, auxp, t = carry

    def one(c, _):
        v, a, w, b, t = c
        v, a = _flat_step(step, lay, v, a, t, args)
        w, b = _flat_step(step, lay, w, b, t, args)
        return (v, a, w, b, t + 1), None

    (vec, aux, vp, auxp, t), _ = jax.lax.scan(
        one, (vec, aux, vp, auxp, t), None, length=renorm_every
    )
    delta = vp - vec
    d = jnp.linalg.norm(delta)
    vp = vec + delta * (d0 / d)
    lg = jnp.where(jnp.all(jnp.isfinite(vec)), jnp.log(d / d0), jnp.nan)
    return (vec, aux, vp, auxp, t), lg[None]


def _twin_chunk(step, lay, args, carry, n, renorm_every, d0, batched):
    def body(c, _):
        if batched:
            vec, aux, vp, auxp, t = c
            (vec, aux, vp, auxp, _), out = jax.vmap(
                lambda v, a, w, b, ar: _twin_unit(
                    step, lay, ar, (v, a, w, b, t), renorm_every=renorm_every, d0=d0
                )
            )(vec, aux, vp, auxp, args)
            return (vec, aux, vp, auxp, t + renorm_every), out
        return _twin_unit(step, lay, args, c, renorm_every=renorm_every, d0=d0)

    return jax.lax.scan(body, carry, None, length=n)


_twin_chunk_jit = donating_jit(_twin_chunk, ("lay", "n", "renorm_every", "d0", "batched"), (3,))


# ---------------------------------------------------------------------------------------------
# drivers


def _prepare(step, x0, batched, args):
    step = as_traceable(step)
    if args is None:
        check_step_signature(step)
    lay = _layout(x0, batched)
    if batched:
        leaves = jax.tree_util.tree_leaves(x0)
        sizes = {int(jnp.shape(v)[0]) if jnp.ndim(v) else -1 for v in leaves}
        if len(sizes) != 1 or -1 in sizes:
            raise ValueError("x0: with batched=True every leaf needs the same leading batch axis")
        if lay.treedef.num_leaves == 1 and len(lay.shapes[0]) == 0:
            raise ValueError(
                f"x0: with batched=True x0 needs shape (batch, dim); got {jnp.shape(leaves[0])}, "
                "a single state (use batched=False)"
            )
        vec, aux = jax.vmap(lambda x: _to_flat(lay, x))(x0)
        if args is not None:
            for leaf in jax.tree_util.tree_leaves(args):
                if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != next(iter(sizes)):
                    raise ValueError(
                        "args: with batched=True every leaf needs the leading batch axis of x0"
                    )
    else:
        vec, aux = _to_flat(lay, x0)
    if not jnp.issubdtype(vec.dtype, jnp.floating):
        raise TypeError(f"x0: floating state required, got {vec.dtype}")
    return step, lay, vec, aux


class _Rows:
    """Placement of a batched run's replica axis: padded and sharded over a device mesh, or
    left as is (unbatched, or a single device)."""

    def __init__(self, devices, batched: bool, n: int):
        self.n = int(n)
        self.mesh = replica_mesh(devices) if batched else None
        self.on = bool(batched) and is_sharded(self.mesh)
        self.n_padded = padded_size(n, self.mesh) if self.on else self.n

    def put(self, tree):
        """Host or device rows (n, ...) → padded rows sharded over the mesh."""
        if not self.on or tree is None:
            return tree
        return put_rows(pad_rows(gather(tree), self.n_padded), self.mesh)

    def own(self, tree):
        """Like :meth:`put`, but always fresh buffers: the carry is donated on accelerators,
        and the caller's arrays must survive."""
        return self.put(tree) if self.on else jax.tree_util.tree_map(jnp.array, tree)

    def place(self, carry):
        """A carry loaded from a checkpoint: batched leaves sharded, scalars as they are."""
        if not self.on:
            return carry
        return jax.tree_util.tree_map(
            lambda x: (
                put_rows(gather(x), self.mesh)
                if jnp.ndim(x) and jnp.shape(x)[0] == self.n_padded
                else x
            ),
            carry,
        )

    def trim(self, x, axis: int = 0):
        """Drop the padding rows (host array, batch along ``axis``)."""
        if not self.on or x is None:
            return x
        return np.take(np.asarray(x), np.arange(self.n), axis=axis)


def _row_struct(tree):
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)), tree
    )


def tangent_memory(step, x0, *, k: int, batched: bool = False, args=None) -> MemoryEstimate:
    """Device memory one replica of :func:`lyapunov_spectrum` needs: the state, the k
    tangent vectors and every intermediate of one tangent step (from its jaxpr)."""
    step, lay, vec, aux = _prepare(step, x0, batched, args)
    dim = int(vec.shape[-1])
    v1 = _row_struct(vec) if batched else jax.ShapeDtypeStruct(vec.shape, vec.dtype)
    a1 = _row_struct(aux) if batched else aux
    r1 = _row_struct(args) if (batched and args is not None) else args
    q1 = jax.ShapeDtypeStruct((dim, int(k)), vec.dtype)
    t = jnp.zeros((), jnp.int32)
    total = estimate_bytes(
        lambda v, a, q, ar: _qr_unit(step, lay, ar, (v, a, q, t), renorm_every=1, with_det=False),
        v1,
        a1,
        q1,
        r1,
    )
    tangents = (int(k) + 1) * dim * np.dtype(vec.dtype).itemsize
    return MemoryEstimate({"tangents": tangents, "tangent step": total})


def _check_run(steps, renorm_every, k=None, dim=None):
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps: must be a positive integer, got {steps!r}")
    if int(renorm_every) != renorm_every or renorm_every < 1:
        raise ValueError(f"renorm_every: must be a positive integer, got {renorm_every!r}")
    if steps % renorm_every:
        raise ValueError(f"steps: must be a multiple of renorm_every={renorm_every}, got {steps}")
    if k is not None and (int(k) != k or not 1 <= k <= dim):
        raise ValueError(f"k: must be an integer in [1, {dim}] (the state dimension), got {k!r}")


def _advance(step, lay, args, vec, aux, t, n, batched, chunk_steps, progress, desc):
    if n <= 0:
        return vec, aux, t

    def chunk(c, m):
        return _state_chunk_jit(step, lay, args, c, n=m, batched=batched)

    (vec, aux, t), _ = run_chunks(
        chunk, (vec, aux, t), n, chunk_steps, progress=progress, desc=desc
    )
    return vec, aux, t


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
) -> LyapunovResult:
    """The top-k Lyapunov spectrum of ``step`` by Benettin's QR method.

    Args:
        step: ``step(x, t) -> x`` (``step(x, t, args)`` when ``args`` is given); any
            pytree state, e.g. a :class:`chaosjax.TrainingMap` step on its flat state.
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
            (:func:`chaosjax.sharding.replica_mesh`; default every device).
        memory_limit: bytes (or ``"8GiB"``) per device; a batch whose tangents do not fit
            runs in passes, and a run where one replica does not fit is refused.

    Returns:
        :class:`LyapunovResult`; ``.exponents`` has shape (k,) (or (batch, k)).
    """
    user_step = step
    step, lay, vec, aux = _prepare(step, x0, batched, args)
    dim = int(vec.shape[-1])
    _check_run(steps, renorm_every, k, dim)
    if batched:
        plan = plan_batches(
            int(vec.shape[0]),
            tangent_memory(user_step, x0, k=k, batched=True, args=args),
            replica_mesh(devices),
            memory_limit=memory_limit,
        )
        if plan.n_passes > 1:
            kwargs = dict(
                k=k, steps=steps, warmup=warmup, align=align, renorm_every=renorm_every,
                key=key, batched=True, t0=t0, log_det=log_det, chunk_steps=chunk_steps,
                progress=progress, resume=resume, n_blocks=n_blocks, devices=devices,
                memory_limit=memory_limit,
            )  # fmt: skip
            return _in_passes(
                lyapunov_spectrum, user_step, x0, args, plan.batch, checkpoint, kwargs
            )
    rows = _Rows(devices, batched, int(vec.shape[0]) if batched else 1)
    vec, aux, args = rows.own(vec), rows.own(aux), rows.put(args)
    for name, v in (("warmup", warmup), ("align", align)):
        if int(v) != v or v < 0:
            raise ValueError(f"{name}: must be a non-negative integer, got {v!r}")
    if log_det is None:
        log_det = k == dim and dim <= 64
    key = jax.random.PRNGKey(0) if key is None else key
    t = jnp.asarray(t0, jnp.int32)
    vec, aux, t = _advance(
        step, lay, args, vec, aux, t, int(warmup), batched, chunk_steps, progress, "warmup"
    )
    q = random_basis(key, dim, k, vec.dtype)
    if batched:
        q = rows.put(jnp.broadcast_to(q, (rows.n, dim, k)))
    units_per_chunk = max(1, chunk_steps // renorm_every)

    def chunk_fn(det):
        def chunk(c, m):
            return _qr_chunk_jit(
                step, lay, args, c, n=m, renorm_every=renorm_every, with_det=det, batched=batched
            )

        return chunk

    carry = (vec, aux, q, t)
    if align:
        n_align = -(-int(align) // renorm_every)
        carry, _ = run_chunks(
            chunk_fn(False),
            carry,
            n_align,
            units_per_chunk,
            progress=progress,
            desc="align",
            steps_per_unit=renorm_every,
        )
    t_start = int(carry[3])
    fingerprint = dumps(
        {
            "k": k,
            "steps": steps,
            "renorm_every": renorm_every,
            "t_start": t_start,
            "dim": dim,
            "batched": batched,
            "rows": rows.n_padded,
            "x0": float(gather(vec).astype(np.float64).sum()),
        }
    )
    carry, (lg, ld) = run_chunks(
        chunk_fn(log_det),
        carry,
        steps // renorm_every,
        units_per_chunk,
        progress=progress,
        desc="lyapunov",
        steps_per_unit=renorm_every,
        checkpoint=checkpoint,
        fingerprint=fingerprint,
        resume=resume,
        out_axis=0,
        place=rows.place,
    )
    if batched:
        lg = np.moveaxis(rows.trim(lg, 1), 0, 1)
        ld = np.moveaxis(rows.trim(ld, 1), 0, 1)
    res = LyapunovResult(
        log_growth=lg,
        renorm_every=int(renorm_every),
        t_start=t_start,
        final_state=rows.trim(gather(carry[0])),
        final_basis=rows.trim(gather(carry[2])),
        log_det=(ld.sum(axis=-1) / steps) if log_det else None,
        n_blocks=n_blocks,
        info={"dim": dim, "dtype": str(vec.dtype), "k": int(k)},
    )
    res.reasons = _reasons(lg)
    _warn_spread(lg, vec.dtype)
    return res


def _in_passes(driver, step, x0, args, batch: int, checkpoint, kwargs) -> LyapunovResult:
    """Run a batched driver on consecutive slices of ``batch`` rows and join the results."""
    n = int(jax.tree_util.tree_leaves(x0)[0].shape[0])
    parts = []
    for i, a in enumerate(range(0, n, batch)):
        sl = slice(a, min(a + batch, n))
        parts.append(
            driver(
                step,
                jax.tree_util.tree_map(lambda v, sl=sl: v[sl], x0),
                args=None if args is None else jax.tree_util.tree_map(lambda v, sl=sl: v[sl], args),
                checkpoint=pass_path(checkpoint, i) if checkpoint else None,
                **kwargs,
            )
        )
    first = parts[0]

    def cat(name):
        vals = [getattr(p, name) for p in parts]
        return None if vals[0] is None else np.concatenate(vals, axis=0)

    return dataclasses.replace(
        first,
        log_growth=cat("log_growth"),
        final_state=cat("final_state"),
        final_basis=cat("final_basis"),
        log_det=cat("log_det"),
        reasons=[r for p in parts for r in p.reasons],
        info={**first.info, "passes": len(parts)},
    )


def _reasons(lg: np.ndarray):
    def one(g):
        bad = ~np.isfinite(g).all(axis=-1)
        if not bad.any():
            return ""
        i = int(np.argmax(bad))
        return (
            f"non-finite growth from renormalisation {i}: the state became non-finite, the "
            "tangents overflowed or a tangent collapsed, or the step is not differentiable "
            "there (e.g. Adam with eps_root = 0 at an exactly zero gradient entry)"
        )

    if lg.ndim == 2:
        return one(lg)
    return [one(g) for g in lg]


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
    devices=None,
) -> LyapunovResult:
    """The largest exponent from two trajectories (Benettin's finite-perturbation method).

    A perturbed copy at distance ``d0`` (Euclidean, over the float state) is evolved with the
    reference; every ``renorm_every`` steps log(d/d0) is recorded and the copy is pulled
    back to distance ``d0`` along the current difference.

    Args:
        d0: separation; default √(machine ε)·max(rms(x0), 1) (1.5e-8 in float64). A warning
            is issued when ``d0`` is below the dtype's resolution.
        devices: with ``batched=True``, the devices sharing the batch axis.
        Other arguments as for :func:`lyapunov_spectrum`.

    Returns:
        :class:`LyapunovResult` with ``method="twin"``; ``.exponent`` is the estimate.
    """
    step, lay, vec, aux = _prepare(step, x0, batched, args)
    _check_run(steps, renorm_every)
    scale = float(np.sqrt(np.mean(np.asarray(vec, np.float64) ** 2)))
    eps = float(jnp.finfo(vec.dtype).eps)
    if d0 is None:
        d0 = math.sqrt(eps) * max(scale, 1.0)
    d0 = float(d0)
    if not d0 > 0:
        raise ValueError(f"d0: must be > 0, got {d0!r}")
    warn_if_below_resolution(d0, vec.dtype, max(scale, 1e-30), what="d0")
    rows = _Rows(devices, batched, int(vec.shape[0]) if batched else 1)
    vec, aux, args = rows.own(vec), rows.own(aux), rows.put(args)
    key = jax.random.PRNGKey(0) if key is None else key
    t = jnp.asarray(t0, jnp.int32)
    vec, aux, t = _advance(
        step, lay, args, vec, aux, t, int(warmup), batched, chunk_steps, progress, "warmup"
    )
    u = jax.random.normal(key, vec.shape[-1:], vec.dtype)
    u = u / jnp.linalg.norm(u)
    vp = vec + d0 * u
    carry = (vec, aux, vp, jax.tree_util.tree_map(jnp.array, aux), t)  # distinct buffers
    t_start = int(t)

    def chunk(c, m):
        return _twin_chunk_jit(
            step, lay, args, c, n=m, renorm_every=renorm_every, d0=d0, batched=batched
        )

    carry, lg = run_chunks(
        chunk,
        carry,
        steps // renorm_every,
        max(1, chunk_steps // renorm_every),
        progress=progress,
        desc="twin",
        steps_per_unit=renorm_every,
    )
    if batched:
        lg = np.moveaxis(rows.trim(lg, 1), 0, 1)
    res = LyapunovResult(
        log_growth=lg,
        renorm_every=int(renorm_every),
        t_start=t_start,
        final_state=rows.trim(gather(carry[0])),
        method="twin",
        info={"d0": d0},
    )
    res.reasons = _reasons(lg)
    return res


# ---------------------------------------------------------------------------------------------
# ensembles of replicas


def ensemble_log_distance(distances, times=None) -> tuple[np.ndarray, np.ndarray]:
    """Ensemble average of ln d(t) over replicas and its instantaneous slope.

    Args:
        distances: (replicas, n) distances of perturbed replicas to their references.
        times: (n,) step of each column (default 0, 1, …).

    Returns:
        ``(mean_log_d, slope)``, both (n,); the slope is d⟨ln d⟩/dt per step (central
        differences), the ensemble-averaged expansion rate of a non-autonomous system.
        Replicas with d ≤ 0 or non-finite d at a time are left out of that time's mean.
    """
    d = np.atleast_2d(np.asarray(distances, np.float64))
    t = np.arange(d.shape[1], dtype=np.float64) if times is None else np.asarray(times, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        logd = np.where(d > 0, np.log(d), np.nan)
    valid = np.isfinite(logd).any(axis=0)
    mean = np.full(d.shape[1], np.nan)
    mean[valid] = np.nanmean(logd[:, valid], axis=0)
    slope = np.gradient(mean, t) if d.shape[1] > 1 else np.full(1, np.nan)
    return mean, slope


@dataclasses.dataclass(frozen=True)
class WindowFit:
    """Best exponential fit of d(t) over a window: ln d ≈ intercept + slope·t."""

    slope: float
    intercept: float
    r2: float
    start: int
    stop: int

    @property
    def accepted(self) -> bool:
        return bool(np.isfinite(self.slope))


def best_window_fit(
    times,
    distances,
    *,
    starts=range(0, 101, 5),
    widths=range(30, 101, 5),
    average: str = "mean",
    min_points: int = 3,
) -> WindowFit:
    """Danovski et al.'s exponential fit: fit ln d on every window [x1, x1 + w], keep the best R².

    Args:
        times: (n,) steps of the samples.
        distances: (n,) or (replicas, n); with several replicas d is first averaged
            (``"mean"``: ln of the mean distance, as in the paper; ``"log"``: mean of ln d).
        starts: window starts x1 (steps).
        widths: window widths w (steps).
        min_points: windows with fewer samples are skipped.

    Returns:
        :class:`WindowFit` (slope per step); all NaN when no window had enough valid samples.
    """
    t = np.asarray(times, np.float64)
    d = np.asarray(distances, np.float64)
    if d.ndim == 2:
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (diverged) → NaN
            y = (
                np.log(np.nanmean(d, axis=0))
                if average == "mean"
                else np.nanmean(np.log(d), axis=0)
            )
    elif d.ndim == 1:
        with np.errstate(divide="ignore", invalid="ignore"):
            y = np.log(d)
    else:
        raise ValueError(f"distances: expected shape (n,) or (replicas, n), got {d.shape}")
    if average not in ("mean", "log"):
        raise ValueError(f"average: must be 'mean' or 'log', got {average!r}")
    if y.shape[0] != t.shape[0]:
        raise ValueError(f"times: length {t.shape[0]} differs from the distances' {y.shape[0]}")
    best = WindowFit(np.nan, np.nan, -np.inf, -1, -1)
    for x1 in starts:
        for w in widths:
            sel = (t >= x1) & (t <= x1 + w) & np.isfinite(y)
            if sel.sum() < max(min_points, 2):
                continue
            tt, yy = t[sel], y[sel]
            slope, icpt = np.polyfit(tt, yy, 1)
            ss_res = float(np.sum((yy - (icpt + slope * tt)) ** 2))
            ss_tot = float(np.sum((yy - yy.mean()) ** 2))
            r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
            if r2 > best.r2:
                best = WindowFit(float(slope), float(icpt), r2, int(x1), int(x1 + w))
    if best.start < 0:
        return WindowFit(np.nan, np.nan, np.nan, -1, -1)
    return best


def local_growth_rates(
    step: Callable,
    states,
    *,
    n_perturbations: int = 16,
    eps: float = 1e-8,
    delta_t: int = 10,
    key=None,
    t0: int = 0,
    args=None,
) -> np.ndarray:
    """Nonlinear growth of random perturbations from chosen states.

    From each state, ``n_perturbations`` random perturbations of norm ``eps`` are evolved
    with the reference for ``delta_t`` steps; the rate is ln(‖δ(Δt)‖/ε)/Δt (per step).

    Args:
        step: ``step(x, t)`` on a flat array state.
        states: (n_states, dim) starting states (all at time ``t0``).

    Returns:
        Rates of shape (n_states, n_perturbations), float64.
    """
    step = as_traceable(step)
    x = jnp.atleast_2d(jnp.asarray(states))
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError("states: floating arrays required")
    warn_if_below_resolution(float(eps), x.dtype, float(jnp.sqrt(jnp.mean(x**2))), what="eps")
    key = jax.random.PRNGKey(0) if key is None else key
    u = jax.random.normal(key, (x.shape[0], n_perturbations, x.shape[1]), x.dtype)
    u = eps * u / jnp.linalg.norm(u, axis=-1, keepdims=True)
    rates = _growth_jit(step, args, x, u, int(delta_t), jnp.asarray(t0, jnp.int32))
    return np.asarray(rates, np.float64)


def _growth(step, args, x, u, delta_t, t0):
    def f(v, t):
        return step(v, t) if args is None else step(v, t, args)

    def evolve(v):
        def body(c, t):
            return f(c, t), None

        return jax.lax.scan(body, v, t0 + jnp.arange(delta_t, dtype=t0.dtype))[0]

    ref = jax.vmap(evolve)(x)
    pert = jax.vmap(jax.vmap(evolve))(x[:, None, :] + u)
    d = jnp.linalg.norm(pert - ref[:, None, :], axis=-1)
    return jnp.log(d / jnp.linalg.norm(u, axis=-1)) / delta_t


_growth_jit = jax.jit(_growth, static_argnames=("delta_t",))


def log_det_jacobian(step: Callable, x, t=0, args=None) -> jax.Array:
    """log|det J| of the step at (x, t) from the dense Jacobian (small systems only)."""
    f = (lambda v: step(v, t)) if args is None else (lambda v: step(v, t, args))
    return jnp.linalg.slogdet(jax.jacfwd(f)(x))[1]


__all__ = [
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
    "tangent_step",
    "twin_lyapunov",
]
