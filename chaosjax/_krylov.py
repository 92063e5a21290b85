"""Krylov kernels on matrix-free symmetric operators ``matvec(v) -> A v`` (flat vectors).

Lanczos with full reorthogonalisation (:func:`lanczos`, :func:`lanczos_eigs`), the warm-started
block Krylov / Rayleigh–Ritz solver of the trackers (:func:`block_krylov_eigs`), stochastic
trace (:func:`trace_estimate`: Hutchinson, Hutch++) and stochastic Lanczos quadrature
(:func:`density_estimate`). Every kernel is jit and vmap friendly with a fixed matvec count.
:mod:`chaosjax.curvature` builds the Hessian operators these act on and re-exports them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from chaosjax import _smalllinalg as _sl
from chaosjax._util import warn_renamed

# ---------------------------------------------------------------------------------------------
# results


class EigResult(NamedTuple):
    """Eigenpairs: ``eigenvalues`` (k,), ``eigenvectors`` (k, dim) unit rows, ``residuals``
    (k,) ‖A v − λ v‖, ``converged`` (k,) bool, ``n_matvecs`` used."""

    eigenvalues: jax.Array
    eigenvectors: jax.Array
    residuals: jax.Array
    converged: jax.Array
    n_matvecs: int

    @property
    def num_matvecs(self) -> int:
        """The old name of :attr:`n_matvecs` (one release)."""
        warn_renamed("num_matvecs", "n_matvecs", stacklevel=2)
        return self.n_matvecs


class TraceResult(NamedTuple):
    """``estimate`` of tr(A), its ``stderr``, and the per-probe ``samples``."""

    estimate: jax.Array
    stderr: jax.Array
    samples: jax.Array


class DensityResult(NamedTuple):
    """Stochastic Lanczos quadrature: ``nodes`` and ``weights`` (each (runs·m,)); the weights
    sum to 1 and ``Σ w δ(λ − node)`` approximates the spectral density."""

    nodes: jax.Array
    weights: jax.Array


# ---------------------------------------------------------------------------------------------
# Lanczos


def _default_tol(dtype) -> float:
    return 1e-6 if jnp.dtype(dtype) == jnp.float64 else 1e-3


def lanczos(matvec: Callable, v0, n_matvecs: int, key=None):
    """Lanczos with full reorthogonalisation.

    Each step costs the matvec plus one pass over the basis: the three-term recurrence
    removes the two large components of ``A q_j`` (the first orthogonalisation) and one
    classical Gram–Schmidt pass against the whole basis removes the rest, O(ε‖A‖) when the
    basis is orthonormal to working precision ("twice is enough").

    On breakdown (an invariant subspace found) the iteration continues from a random vector
    orthogonal to the basis, with a zero off-diagonal, so ``n_matvecs`` stays fixed. The
    breakdown test reads the norm of the recurrence's output, which differs from the
    orthogonalised one by O(ε‖A‖), far below the threshold 10³ε‖A‖; on breakdown that
    vector is swapped for the candidate *before* the single pass, so the replacement costs
    no pass of its own and no random draw in the loop (one random vector is drawn before the
    loop; step j's candidate is that vector cyclically shifted by j). The work per step is
    thus the same with and without ``vmap``, where a ``lax.cond`` would run both branches.

    Returns:
        ``(alphas (m,), betas (m,), Q (m, dim))``: T = tridiag(betas[:-1], alphas, betas[:-1]),
        A Q[:m]ᵀ ≈ Q[:m]ᵀ T; ``betas[-1]`` is the residual coupling.
    """
    m = int(n_matvecs)
    n = v0.shape[0]
    key = jax.random.PRNGKey(0) if key is None else key
    dtype = v0.dtype
    q0 = v0 / jnp.linalg.norm(v0)
    basis = jnp.zeros((m + 1, n), dtype).at[0].set(q0)
    spare = jax.random.normal(key, (n,), dtype)
    floor = 1e3 * jnp.finfo(dtype).eps
    tiny = jnp.finfo(dtype).tiny

    def body(carry, j):
        basis, alphas, betas, scale = carry
        q = basis[j]
        w = matvec(q)
        a = q @ w
        b_prev = jnp.where(j > 0, betas[jnp.maximum(j - 1, 0)], 0.0)
        w = w - a * q - b_prev * basis[jnp.maximum(j - 1, 0)]
        size = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.abs(a) + size)
        good = size > floor * scale
        w = jnp.where(good, w, jnp.roll(spare, j))
        w = w - (basis @ w) @ basis  # one pass; rows > j of the basis are still zero
        b = jnp.linalg.norm(w)
        basis = basis.at[j + 1].set(w / jnp.maximum(b, tiny))
        b = jnp.where(good, b, 0.0)
        return (basis, alphas.at[j].set(a), betas.at[j].set(b), scale), None

    init = (basis, jnp.zeros((m,), dtype), jnp.zeros((m,), dtype), jnp.zeros((), dtype))
    (basis, alphas, betas, _), _ = jax.lax.scan(body, init, jnp.arange(m))
    return alphas, betas, basis[:m]


def _tridiag(alphas, betas):
    return jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)


def lanczos_eigs(
    matvec: Callable,
    dim: int,
    k: int,
    *,
    n_matvecs: int | None = None,
    key=None,
    which: str = "largest",
    dtype=None,
    tol: float | None = None,
    v0=None,
) -> EigResult:
    """k extreme algebraic eigenpairs of a symmetric operator by Lanczos.

    Args:
        matvec: ``v -> A v`` on (dim,) vectors.
        dim: the operator's dimension.
        k: number of eigenpairs.
        n_matvecs: Lanczos steps m (default min(dim, max(4k, 64))); fixed, so the call is
            jit and vmap friendly.
        which: ``"largest"`` (algebraic; sharpness) or ``"smallest"``.
        tol: a pair is converged when its residual estimate |β_m s_mi| ≤ tol·max|θ| (default
            1e-6 in float64, 1e-3 in float32).
        v0: start vector (default random).

    Returns:
        :class:`EigResult`, largest first for ``"largest"``, smallest first for ``"smallest"``.
    """
    if which not in ("largest", "smallest"):
        raise ValueError(f"which: must be 'largest' or 'smallest', got {which!r}")
    if int(k) != k or not 1 <= k <= dim:
        raise ValueError(f"k: must be an integer in [1, {dim}], got {k!r}")
    m = int(min(dim, max(4 * k, 64)) if n_matvecs is None else n_matvecs)
    if not k <= m <= dim:
        raise ValueError(f"n_matvecs: must lie in [k={k}, dim={dim}], got {m}")
    dtype = dtype or jnp.asarray(0.0).dtype
    key = jax.random.PRNGKey(0) if key is None else key
    k_start, k_lan = jax.random.split(key)
    if v0 is None:
        v0 = jax.random.normal(k_start, (dim,), dtype)
    alphas, betas, q = lanczos(matvec, jnp.asarray(v0, dtype), m, k_lan)
    theta, s = _sl.eigh(_tridiag(alphas, betas))
    if which == "largest":
        theta, s = theta[::-1], s[:, ::-1]
    theta, s = theta[:k], s[:, :k]
    vecs = (q.T @ s).T
    vecs = vecs / jnp.linalg.norm(vecs, axis=1, keepdims=True)
    res = jnp.abs(betas[-1] * s[-1, :])
    tol = _default_tol(dtype) if tol is None else tol
    scale = jnp.maximum(jnp.max(jnp.abs(theta)), jnp.finfo(dtype).tiny)
    return EigResult(theta, vecs, res, res <= tol * scale, m)


def block_krylov_eigs(
    matvec: Callable,
    v0,
    *,
    n_blocks: int = 2,
    which: str = "largest",
    tol: float | None = None,
    k: int | None = None,
    key=None,
    unroll: bool = True,
) -> EigResult:
    """Top-k eigenpairs by Rayleigh–Ritz on the block Krylov space span{V, AV, …, A^p V}.

    Warm-started from ``v0`` (dim, b) — e.g. the previous eigenvectors while tracking, plus
    fresh random vectors — it needs few blocks. Uses b·(p + 1) matvecs (p = ``n_blocks``)
    and returns exact residuals; p is capped so the space is no wider than the dimension.
    When the space is exhausted (the new block lies in the span
    already: a low-rank operator, or a start that is nearly invariant) the vanishing columns
    are replaced by random vectors, and every block is re-orthogonalised after its QR, so the
    basis stays orthonormal and the Ritz values never exceed the operator's spectrum.

    Each block costs its b matvecs plus two passes over the basis: one classical Gram–Schmidt
    pass (whose output tells the spent columns), the swap of the spent columns for random
    ones, a QR, and one re-orthogonalisation pass and QR (QR of near-dependent columns loses
    orthogonality to the basis; the second pass restores it). The random block is drawn once
    before the loop (block j uses it cyclically shifted by j rows), so the work does not
    depend on whether a column was spent, also under ``vmap``.

    Args:
        k: eigenpairs returned (default b, the block width).
        key: PRNG key of the replacement vectors (default ``PRNGKey(0)``).
        unroll: build the blocks in Python (True: each block is its own code, the fastest
            at a few blocks) or in a ``lax.fori_loop`` over a fixed (dim, b·(p + 1)) basis
            buffer (False: one copy of the operator in the program, so many blocks compile
            as fast as one; the same space, equal to round-off).
    """
    if which not in ("largest", "smallest"):
        raise ValueError(f"which: must be 'largest' or 'smallest', got {which!r}")
    v = jnp.asarray(v0)
    n, b_width = v.shape
    # a Krylov space wider than the dimension is degenerate: cap the blocks
    n_blocks = max(0, min(int(n_blocks), n // b_width - 1))
    k = b_width if k is None else int(k)
    if not 1 <= k <= b_width:
        raise ValueError(f"k: must be an integer in [1, {b_width}] (the block width), got {k!r}")
    key = jax.random.PRNGKey(0) if key is None else key
    dt = v.dtype
    eps = jnp.finfo(dt).eps
    mv = jax.vmap(matvec, in_axes=1, out_axes=1)

    spare = jax.random.normal(key, v.shape, dt)
    if not unroll:
        b, ab = _scanned_blocks(mv, v, spare, int(n_blocks))
        return _rayleigh_ritz(b, ab, k, which, tol, b_width * (int(n_blocks) + 1))
    blocks = [_sl.qr_q(v)]
    images = []
    for j in range(int(n_blocks)):
        w = mv(blocks[-1])
        images.append(w)
        basis = jnp.concatenate(blocks, axis=1)
        size = jnp.linalg.norm(w, axis=0)
        w = w - basis @ (basis.T @ w)
        spent = jnp.linalg.norm(w, axis=0) <= 1e3 * eps * jnp.maximum(size, jnp.finfo(dt).tiny)
        q = _sl.qr_q(jnp.where(spent[None, :], jnp.roll(spare, j, axis=0), w))
        blocks.append(_sl.qr_q(q - basis @ (basis.T @ q)))
    images.append(mv(blocks[-1]))
    b = jnp.concatenate(blocks, axis=1)
    ab = jnp.concatenate(images, axis=1)
    return _rayleigh_ritz(b, ab, k, which, tol, b_width * (int(n_blocks) + 1))


def _scanned_blocks(mv, v, spare, p: int):
    """The block Krylov basis and its image, (dim, b·(p + 1)) each, built in a fori_loop
    over a zero-initialised buffer (zero columns do not change a projection)."""
    n, w = v.shape
    dt = v.dtype
    eps = jnp.finfo(dt).eps
    m = w * (p + 1)
    basis = jnp.zeros((n, m), dt).at[:, :w].set(_sl.qr_q(v))

    def body(j, c):
        basis, image = c
        q = jax.lax.dynamic_slice_in_dim(basis, j * w, w, axis=1)
        a = mv(q)
        image = jax.lax.dynamic_update_slice_in_dim(image, a, j * w, axis=1)
        size = jnp.linalg.norm(a, axis=0)
        r = a - basis @ (basis.T @ a)
        spent = jnp.linalg.norm(r, axis=0) <= 1e3 * eps * jnp.maximum(size, jnp.finfo(dt).tiny)
        nxt = _sl.qr_q(jnp.where(spent[None, :], jnp.roll(spare, j, axis=0), r))
        nxt = _sl.qr_q(nxt - basis @ (basis.T @ nxt))
        at = jnp.minimum((j + 1) * w, m - w)  # the last round writes nothing new
        grown = jax.lax.dynamic_update_slice_in_dim(basis, nxt, at, axis=1)
        return jnp.where(j < p, grown, basis), image

    return jax.lax.fori_loop(0, p + 1, body, (basis, jnp.zeros((n, m), dt)))


def _rayleigh_ritz(b, ab, k: int, which: str, tol, n_matvecs: int) -> EigResult:
    """Ritz pairs of the basis ``b`` (orthonormal columns) from its image ``ab`` = A b."""
    dt = b.dtype
    h = b.T @ ab
    theta, s = _sl.eigh(0.5 * (h + h.T))
    if which == "largest":
        theta, s = theta[::-1], s[:, ::-1]
    theta, s = theta[:k], s[:, :k]
    y = b @ s
    ay = ab @ s
    norms = jnp.linalg.norm(y, axis=0)
    y, ay = y / norms, ay / norms
    res = jnp.linalg.norm(ay - y * theta, axis=0)
    tol = _default_tol(dt) if tol is None else tol
    scale = jnp.maximum(jnp.max(jnp.abs(theta)), jnp.finfo(dt).tiny)
    return EigResult(theta, y.T, res, res <= tol * scale, n_matvecs)


# ---------------------------------------------------------------------------------------------
# trace and density

TRACE_METHODS = ("hutchinson", "hutch++")


def trace_estimate(
    matvec: Callable, dim: int, *, n_probes: int, key, method: str = "hutchinson", dtype=None
) -> TraceResult:
    """Stochastic trace of a symmetric operator with Rademacher probes.

    ``"hutchinson"``: mean of zᵀAz over ``n_probes`` probes. ``"hutch++"``: a third of the
    probes build a sketch Q = orth(A S); tr(QᵀAQ) is exact and the rest estimate the
    remainder tr((I − QQᵀ) A (I − QQᵀ)). The standard error is that of the stochastic part.
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"method: unknown {method!r}; allowed: {', '.join(TRACE_METHODS)}")
    if int(n_probes) != n_probes or n_probes < 2:
        raise ValueError(f"n_probes: must be an integer >= 2, got {n_probes!r}")
    dtype = dtype or jnp.asarray(0.0).dtype
    mv = jax.vmap(matvec)
    if method == "hutchinson":
        z = jax.random.rademacher(key, (n_probes, dim), dtype)
        samples = jnp.sum(z * mv(z), axis=1)
        return TraceResult(samples.mean(), samples.std(ddof=1) / jnp.sqrt(n_probes), samples)
    m = max(1, n_probes // 3)
    g_n = max(2, n_probes - 2 * m)
    ks, kg = jax.random.split(key)
    s = jax.random.rademacher(ks, (m, dim), dtype)
    q = _sl.qr_q(mv(s).T)
    exact = jnp.trace(q.T @ mv(q.T).T)
    g = jax.random.rademacher(kg, (g_n, dim), dtype)
    g = g - (g @ q) @ q.T
    samples = jnp.sum(g * mv(g), axis=1)
    return TraceResult(exact + samples.mean(), samples.std(ddof=1) / jnp.sqrt(g_n), exact + samples)


def density_estimate(
    matvec: Callable, dim: int, *, n_matvecs: int, n_runs: int, key, dtype=None
) -> DensityResult:
    """Stochastic Lanczos quadrature: for each of ``n_runs`` random unit starts, the Ritz
    values of an m-step Lanczos run are nodes with weights (first eigenvector component)²/runs."""
    m = int(min(n_matvecs, dim))
    dtype = dtype or jnp.asarray(0.0).dtype

    def one(key):
        k1, k2 = jax.random.split(key)
        v0 = jax.random.rademacher(k1, (dim,), dtype)
        a, b, _ = lanczos(matvec, v0, m, k2)
        theta, s = jnp.linalg.eigh(_tridiag(a, b))
        return theta, s[0, :] ** 2

    nodes, weights = jax.lax.map(one, jax.random.split(key, int(n_runs)))
    return DensityResult(nodes.ravel(), weights.ravel() / n_runs)
