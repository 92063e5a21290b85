"""Covariant Lyapunov vectors by Ginelli et al.'s method, memory-lean.

Forward pass (device, inside the one replica engine): a :class:`chaosjax.LyapunovTracker`
with a :class:`chaosjax.observers.CLVWindow`, ``J_n Q_n = Q_{n+1} R_{n+1}`` for every
renormalisation interval n of the recorded trajectory; only the k×k factors ``R_{n+1}`` go
to the host, plus the (state, basis) at the kept times.

Backward pass (host, float64): CLVs at time n are ``V_n = Q_n C_n`` with C_n upper
triangular. Covariance ``J_n V_n ∝ V_{n+1}`` gives ``C_n ∝ R_{n+1}^{-1} C_{n+1}`` (each
column normalised), started from a seeded random upper-triangular matrix after
``backward_transient`` extra intervals. Note the pairing: the R that takes C_{n+1} back to
C_n is the one produced by the QR *at the end* of interval n.

Because the Q's are orthonormal, angles between CLVs come from C alone
(⟨v_i, v_j⟩ = ⟨c_i, c_j⟩), and the local growth of CLV i over interval n is
‖R_{n+1} c_i(n)‖; vectors are materialised only at kept times.

References:
    Ginelli, Poggi, Turchi, Chaté, Livi, Politi (2007). Characterizing dynamics with
    covariant Lyapunov vectors. PRL 99, 130601.
    Ginelli, Chaté, Livi, Politi (2013). Covariant Lyapunov vectors. J. Phys. A 46, 254005.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from chaosjax.observers import CLVWindow, LyapunovTracker, key_data

#: default host-memory budget of one call, bytes.
DEFAULT_MEMORY_BUDGET = 2 * 1024**3


def clv_memory_bytes(dim: int, k: int, n_intervals: int, n_kept: int, batch: int = 1) -> int:
    """Host memory a :func:`covariant_lyapunov_vectors` call needs, in bytes (float64):
    R and C factors 2·N·k² (N = kept + transient intervals), checkpoints and vectors at the
    kept times n_kept·dim·(2k + 1), times the batch size."""
    return 8 * batch * (2 * n_intervals * k * k + n_kept * dim * (2 * k + 1))


@dataclasses.dataclass
class CLVResult:
    """Covariant Lyapunov vectors and their statistics.

    Attributes:
        exponents: (k,) time averages of the CLVs' local log growth, per step.
        qr_exponents: (k,) the QR (Benettin) exponents over the same interval, per step.
        local_growth: (n, k) log‖J v_i‖ per renormalisation interval (divide by
            ``renorm_every`` for per-step rates).
        coefficients: (n, k, k) upper-triangular C_n with unit columns (V_n = Q_n C_n).
        angles: (n,) smallest angle between any two CLVs at each time, radians in [0, π/2].
        times: (n_kept,) time index of the kept vectors.
        vectors: (n_kept, dim, k) unit CLVs (columns) at the kept times.
        angle_matrix: (n_kept, k, k) all pairwise angles at the kept times, radians.
        states: (n_kept, dim) the state at the kept times.
        near_tangencies: number of times with a smallest angle below ``tangency_threshold``.
        reason: why every array is NaN ('' when the vectors were measured), e.g. a step that
            is not smooth (:func:`chaosjax.smoothness.step_smoothness`).
    With ``batched=True`` every array gains a leading batch axis.
    """

    exponents: np.ndarray
    qr_exponents: np.ndarray
    local_growth: np.ndarray
    coefficients: np.ndarray
    angles: np.ndarray
    times: np.ndarray
    vectors: np.ndarray
    angle_matrix: np.ndarray
    states: np.ndarray
    near_tangencies: Any
    tangency_threshold: float
    renorm_every: int
    t_start: int
    all_times: np.ndarray
    bases: np.ndarray | None = None
    kept: np.ndarray | None = None
    info: dict = dataclasses.field(default_factory=dict)
    reason: str = ""

    _PER_RUN = (
        "exponents", "qr_exponents", "local_growth", "coefficients", "angles", "vectors",
        "angle_matrix", "states", "bases", "near_tangencies",
    )  # fmt: skip

    def squeeze(self) -> CLVResult:
        """The result of a single trajectory (drop a batch axis of length 1)."""
        one = {name: getattr(self, name)[0] for name in self._PER_RUN}
        one["near_tangencies"] = int(one["near_tangencies"])
        return dataclasses.replace(self, **one)

    def backward_vectors_at(self, index: int) -> np.ndarray:
        """The Gram–Schmidt (backward Lyapunov) basis Q_n (dim, k) (a leading batch axis for
        batched results) at renormalisation interval ``index``, as the run saw it.

        Bases are stored at the kept intervals only (``keep_every``): nothing re-integrates
        the trajectory, so an interval that was not kept is refused.
        """
        index = int(index)
        pos = np.flatnonzero(self.kept == index)
        if pos.size == 0:
            raise ValueError(
                f"index: the basis of interval {index} was not kept (kept: every "
                f"{int(self.kept[1] - self.kept[0]) if self.kept.size > 1 else 1} interval(s) from "
                f"{int(self.kept[0])}); rerun with a smaller keep_every (keep_every=renorm_every "
                "keeps every interval)"
            )
        return self.bases[..., int(pos[0]), :, :]

    def vectors_at(self, index: int) -> np.ndarray:
        """CLVs V_n = Q_n C_n (dim, k) at a kept interval ``index``."""
        return self.backward_vectors_at(index) @ self.coefficients[..., int(index), :, :]


def _angles_from_c(c: np.ndarray):
    """Pairwise angles between unit columns of C (..., k, k) → (..., k, k) radians."""
    g = np.abs(np.einsum("...ij,...ik->...jk", c, c))
    return np.arccos(np.clip(g, 0.0, 1.0))


def _min_angle(ang: np.ndarray) -> np.ndarray:
    k = ang.shape[-1]
    if k < 2:
        return np.full(ang.shape[:-2], np.nan)
    iu = np.triu_indices(k, 1)
    return ang[..., iu[0], iu[1]].min(axis=-1)


def _backward(r: np.ndarray, n_keep: int, key, k: int):
    """Backward Ginelli iteration over R factors r (N, k, k) (N = n_keep + transient).

    Returns C (n_keep, k, k) with unit columns and the local log growth (n_keep, k)."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    c = np.triu(rng.normal(size=(k, k)))
    c[np.diag_indices(k)] = np.abs(c[np.diag_indices(k)]) + 0.5
    c /= np.linalg.norm(c, axis=0, keepdims=True)
    n_total = r.shape[0]
    cs = np.empty((n_keep, k, k))
    growth = np.empty((n_keep, k))
    for n in range(n_total - 1, -1, -1):
        # C_n ∝ R_{n+1}^{-1} C_{n+1}: r[n] is the R produced at the end of interval n
        c_new = _solve_upper(r[n], c)
        norms = np.linalg.norm(c_new, axis=0)
        c = c_new / norms
        if n < n_keep:
            cs[n] = c
            growth[n] = -np.log(norms)
    return cs, growth


def _solve_upper(r: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve R X = B for upper-triangular R (back substitution, exact zeros kept)."""
    k = r.shape[0]
    x = np.zeros_like(b)
    for i in range(k - 1, -1, -1):
        x[i] = (b[i] - r[i, i + 1 :] @ x[i + 1 :]) / r[i, i]
    return x


def _kept_intervals(steps, re: int, backward_transient, keep_every):
    """Validated CLV window in renormalisation intervals: (n_keep, n_bt, keep_per, kept), the
    intervals of the kept range and of the backward transient, the intervals between kept
    times and the (n_kept,) kept interval indices."""
    if (
        int(backward_transient) != backward_transient
        or backward_transient < 0
        or backward_transient % re
    ):
        raise ValueError(
            f"backward_transient: must be a non-negative multiple of renorm_every={re}, "
            f"got {backward_transient!r}"
        )
    n_keep = steps // re
    n_bt = int(backward_transient) // re
    if keep_every is None:
        keep_per = max(1, n_keep // 10)
    else:
        if int(keep_every) != keep_every or keep_every < re or keep_every % re:
            raise ValueError(
                f"keep_every: must be a positive multiple of renorm_every={re}, got {keep_every!r}"
            )
        keep_per = int(keep_every) // re
    return n_keep, n_bt, keep_per, np.arange(0, n_keep, keep_per)


def covariant_lyapunov_vectors(
    step: Callable,
    x0,
    *,
    k: int,
    steps: int,
    warmup: int = 0,
    align: int = 0,
    backward_transient: int,
    keep_every: int | None = None,
    key=None,
    renorm_every: int = 1,
    batched: bool = False,
    args=None,
    t0: int = 0,
    tangency_threshold: float = math.radians(1.0),
    host_memory_limit: int = DEFAULT_MEMORY_BUDGET,
    chunk_steps: int = 10_000,
    progress: bool = False,
    checkpoint=None,
    resume: bool = False,
    devices=None,
    memory_limit=None,
    strategy: str | int | None = None,
    allow_nonsmooth: bool = False,
) -> CLVResult:
    """Covariant Lyapunov vectors (Ginelli) of ``step`` over ``steps`` steps.

    One run of the replica engine: its :class:`chaosjax.LyapunovTracker` keeps the R factors
    of every renormalisation of the kept range and of the backward transient after it, and
    the basis and state at the kept times; the backward pass then runs on the host.

    Args:
        step: ``step(x, t) -> x`` (``step(x, t, args)`` with ``args``); any pytree state.
        x0: initial state (leading batch axis with ``batched=True``).
        k: number of vectors.
        steps: steps over which CLVs are computed (a multiple of ``renorm_every``).
        warmup: state-only transient steps.
        align: forward QR steps before the kept range (converges the backward vectors).
        backward_transient: extra forward steps after the kept range, iterated backwards to
            converge C before the kept range is reached (a multiple of ``renorm_every``).
        keep_every: materialise vectors every this many steps (default: 10 evenly spaced
            times, or every renormalisation if there are fewer).
        key: PRNG key of the initial basis and of the backward start.
        renorm_every: steps between QR renormalisations.
        batched: a leading batch axis of initial conditions / replicas (vmapped forward pass).
        args: extra step argument (batched like x0), e.g. training hyper-parameters.
        t0: time index of ``x0``.
        tangency_threshold: angle (radians) below which a time counts as a near-tangency.
        host_memory_limit: refuse (before running) a call whose host memory estimate
            :func:`clv_memory_bytes` exceeds this many bytes.
        chunk_steps: steps per jitted forward chunk.
        progress: show progress bars.
        checkpoint, resume: ``.npz`` checkpoint of the forward pass and continuing it.
        devices: with ``batched=True``, the devices sharing the batch axis (default every
            accelerator, one CPU device; see :func:`chaosjax.sharding.replica_mesh`).
        memory_limit: bytes (or ``"8GiB"``) a device may use.
        strategy: how a device runs the rows (see :func:`chaosjax.engine.run_replicas`).
        allow_nonsmooth: compute the vectors even for a step that is not smooth (Lion,
            sign-SGD: :func:`chaosjax.smoothness.step_smoothness`); by default such a step gives
            NaN arrays, the reason in ``.reason`` and one warning.

    Memory: the device holds the state and a (dim, k) basis per batch element; the host holds
    ``clv_memory_bytes(dim, k, N, n_kept, batch)`` bytes — R and C factors for every interval
    (2·N·k² floats, N = (steps + backward_transient) / renorm_every) and (state, basis,
    vectors) at the n_kept kept times — never the basis at every step.

    Returns:
        :class:`CLVResult`.
    """
    from chaosjax.lyapunov import _check_run, _check_windows, _engine, _prepare

    step, batch, dim = _prepare(step, x0, batched, args)
    _check_run(steps, renorm_every, k, dim)
    _check_windows(warmup=warmup, align=align)
    re = int(renorm_every)
    n_keep, n_bt, keep_per, kept = _kept_intervals(steps, re, backward_transient, keep_every)
    n_batch = len(batch)
    need = clv_memory_bytes(dim, k, n_keep + n_bt, len(kept), n_batch)
    if need > host_memory_limit:
        raise ValueError(
            f"host_memory_limit: this call needs about {need / 2**20:.0f} MiB of host memory "
            f"(limit {host_memory_limit / 2**20:.0f} MiB); raise keep_every, lower k or steps, or "
            "raise host_memory_limit"
        )
    key = jax.random.PRNGKey(0) if key is None else key
    k_basis, k_back = jax.random.split(key)
    n_align = -(-int(align) // re) * re
    start = int(warmup) + n_align
    window = CLVWindow(start, int(steps), int(backward_transient), keep_per * re)
    if math.gcd(start + int(steps) + int(backward_transient), int(chunk_steps), start or 0,
                keep_per * re) == keep_per * re:  # fmt: skip
        window = window._replace(by_records=True)  # every record is a kept step: no splitting
    tracker = LyapunovTracker(
        k=int(k),
        renorm_every=re,
        warmup=int(warmup),
        align=int(align),
        rows="all",
        key=key_data(k_basis),
        clv=window,
        allow_nonsmooth=bool(allow_nonsmooth),
    )
    total = start + int(steps) + int(backward_transient)
    res = _engine(
        step,
        batch,
        [tracker],
        batched=batched,
        total=total,
        t0=t0,
        chunk_steps=chunk_steps,
        windows=(start, keep_per * re),
        progress=progress,
        desc="clv forward",
        checkpoint=checkpoint,
        resume=resume,
        devices=devices,
        memory_limit=memory_limit,
        strategy=strategy,
    )
    out = from_forward(
        res.records["clv_r"],
        res.records["clv_basis"],
        res.records["clv_state"],
        n_keep=n_keep,
        kept=kept,
        renorm_every=re,
        t_start=int(t0) + start,
        key=k_back,
        tangency_threshold=tangency_threshold,
        info={
            "dim": dim,
            "memory_estimate_bytes": need,
            "backward_transient": int(backward_transient),
            "passes": int(res.attrs.get("passes", 1)),
        },
    )
    out.reason = res.attrs.get("tangent_reason", "")
    return out if batched else out.squeeze()


def from_forward(
    r,
    bases,
    states,
    *,
    n_keep: int,
    kept,
    renorm_every: int,
    t_start: int,
    key,
    k: int | None = None,
    tangency_threshold: float = math.radians(1.0),
    info: dict | None = None,
) -> CLVResult:
    """CLVs from the records of a forward pass (a :class:`chaosjax.LyapunovTracker` with a
    :class:`chaosjax.observers.CLVWindow`): the backward pass and the statistics.

    Args:
        r: (batch, N, K, K) R factors of the N renormalisations of the kept range and the
            backward transient after it.
        bases: (batch, n_kept, dim, K) orthonormal bases at the kept intervals.
        states: (batch, n_kept, dim) states at the kept intervals.
        n_keep: renormalisation intervals in the kept range.
        kept: (n_kept,) indices of the kept intervals.
        k: vectors (≤ K: the top-left k×k blocks of R and the first k basis columns are the
            QR process of the first k tangents); default K.

    Returns:
        :class:`CLVResult` with a leading batch axis (:meth:`CLVResult.squeeze` drops it).
    """
    r, bases, states = np.asarray(r), np.asarray(bases), np.asarray(states)
    k = int(r.shape[-1] if k is None else k)
    r, bases = r[..., :k, :k], bases[..., :k]
    kept = np.asarray(kept)
    parts = [
        _finish(r[i], states[i], bases[i], n_keep, kept, key, k, renorm_every, tangency_threshold)
        for i in range(r.shape[0])
    ]
    out = {name: np.stack([p[name] for p in parts]) for name in parts[0]}
    return CLVResult(
        **out,
        times=t_start + renorm_every * kept,
        tangency_threshold=float(tangency_threshold),
        renorm_every=int(renorm_every),
        t_start=int(t_start),
        all_times=t_start + renorm_every * np.arange(n_keep),
        kept=kept,
        info={**(info or {}), "k": k},
    )


def _finish(r, st, bs, n_keep, kept, key, k, renorm_every, tangency_threshold) -> dict:
    """The backward pass and the statistics of one trajectory."""
    cs, growth = _backward(r, n_keep, key, k)
    qr_exp = np.log(np.abs(np.diagonal(r[:n_keep], axis1=-2, axis2=-1))).mean(0) / renorm_every
    ang_all = _angles_from_c(cs)
    mins = _min_angle(ang_all)
    vectors = np.einsum("tdk,tkj->tdj", bs, cs[kept])
    return dict(
        exponents=growth.mean(0) / renorm_every,
        qr_exponents=qr_exp,
        local_growth=growth,
        coefficients=cs,
        angles=mins,
        vectors=vectors,
        angle_matrix=ang_all[kept],
        states=st,
        bases=bs,
        near_tangencies=int((mins < tangency_threshold).sum()),
    )


def clv_layer_mass(
    vectors: np.ndarray, layers: dict[str, tuple[int, int]], n_params: int | None = None
):
    """Share of each CLV's squared norm per parameter layer (and in optimizer moments).

    Args:
        vectors: (..., dim, k) unit CLVs.
        layers: {name: (start, stop)} parameter ranges (``TrainingMap.layers``).
        n_params: parameters in the state; entries beyond are optimizer moments.

    Returns:
        {name: (..., k)} masses summing to 1 over the names (with ``"optimizer"`` when the
        state holds moments).
    """
    v2 = np.asarray(vectors) ** 2
    total = v2.sum(axis=-2)
    out = {name: v2[..., a:b, :].sum(axis=-2) / total for name, (a, b) in layers.items()}
    if n_params is not None and n_params < v2.shape[-2]:
        out["optimizer"] = v2[..., n_params:, :].sum(axis=-2) / total
    return out


def clv_subspace_overlap(vectors: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Squared overlap of each CLV with the span of orthonormal columns ``basis`` (dim, m),
    e.g. the top Hessian eigenvectors padded to the state: ‖Bᵀ v_i‖² ∈ [0, 1], shape (..., k)."""
    proj = np.einsum("dm,...dk->...mk", np.asarray(basis), np.asarray(vectors))
    return (proj**2).sum(axis=-2)


__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "CLVResult",
    "clv_layer_mass",
    "clv_memory_bytes",
    "clv_subspace_overlap",
    "covariant_lyapunov_vectors",
]
