"""Small dense linear algebra in plain JAX operations (no LAPACK custom calls).

XLA's CPU runtime can deadlock when several devices of one process run programs with batched
LAPACK calls at the same time (observed with ``jax_num_cpu_devices`` > 1 and the curvature
tracker's Lanczos/block-Krylov solves). The sharded replica driver therefore traces the
trackers under :func:`pure_linalg` on the CPU backend, which swaps the few small
factorisations they need for these versions: a parallel-ordered cyclic Jacobi eigensolver
(m − 1 rounds of m/2 disjoint rotations per sweep, as dense matrix products) and a twice
re-orthogonalised modified Gram–Schmidt QR. Both are for small matrices (tens of rows).
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
import numpy as np

_PURE = contextvars.ContextVar("chaosjax_pure_linalg", default=False)


@contextlib.contextmanager
def pure_linalg(on: bool = True):
    """Within this context (at trace time) :func:`eigh` and :func:`qr_q` avoid LAPACK."""
    token = _PURE.set(bool(on))
    try:
        yield
    finally:
        _PURE.reset(token)


def _schedule(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Round-robin pairs: n − 1 rounds, each pairing every index once (n even)."""
    idx = list(range(n))
    ps, qs = [], []
    for _ in range(n - 1):
        pairs = [(idx[i], idx[n - 1 - i]) for i in range(n // 2)]
        ps.append([min(p) for p in pairs])
        qs.append([max(p) for p in pairs])
        idx = [idx[0], idx[-1], *idx[1:-1]]
    return np.asarray(ps), np.asarray(qs)


def jacobi_eigh(a, sweeps: int = 12):
    """Eigenvalues (ascending) and unit eigenvectors (columns) of a small symmetric matrix."""
    a = 0.5 * (a + a.T)
    m = a.shape[0]
    n = m + (m % 2)
    if n != m:  # pad to even size with an eigenvalue below every other one; dropped after
        low = -(jnp.sqrt(jnp.sum(a * a)) + 1.0)
        a = jnp.pad(a, ((0, 1), (0, 1))).at[m, m].set(low)
    ps, qs = _schedule(n)
    eye = jnp.eye(n, dtype=a.dtype)
    tiny = jnp.finfo(a.dtype).tiny

    def rotate(carry, pq):
        a, v = carry
        p, q = pq
        app, aqq, apq = a[p, p], a[q, q], a[p, q]
        small = jnp.abs(apq) <= tiny
        theta = (aqq - app) / (2.0 * jnp.where(small, 1.0, apq))
        t = jnp.sign(theta) / (jnp.abs(theta) + jnp.sqrt(theta * theta + 1.0))
        t = jnp.where(small, 0.0, jnp.where(theta == 0, 1.0, t))
        c = 1.0 / jnp.sqrt(1.0 + t * t)
        s = t * c
        j = eye.at[p, p].set(c).at[q, q].set(c).at[p, q].set(s).at[q, p].set(-s)
        return (j.T @ a @ j, v @ j), None

    def sweep(carry, _):
        return jax.lax.scan(rotate, carry, (jnp.asarray(ps), jnp.asarray(qs)))[0], None

    (a, v), _ = jax.lax.scan(sweep, (a, eye), None, length=sweeps)
    w = jnp.diagonal(a)
    order = jnp.argsort(w)
    w, v = w[order], v[:, order]
    if n != m:
        w, v = w[1:], v[:m, 1:]
    return w, v


def mgs_qr(v):
    """QR of ``v`` (n, k), k small, by modified Gram–Schmidt applied twice: ``(Q, R)`` with
    orthonormal columns, R upper triangular with a non-negative diagonal."""
    k = v.shape[1]
    q = jnp.zeros_like(v)
    r = jnp.zeros((k, k), v.dtype)
    tiny = jnp.finfo(v.dtype).tiny
    for j in range(k):
        x = v[:, j]
        for _ in range(2):
            c = q.T @ x
            x = x - q @ c
            r = r.at[:, j].add(c)
        n = jnp.linalg.norm(x)
        r = r.at[j, j].set(n)
        q = q.at[:, j].set(x / jnp.maximum(n, tiny))
    return q, r


def mgs_q(v):
    """Orthonormal columns spanning those of ``v`` (n, k), k small (Gram–Schmidt, twice)."""
    return mgs_qr(v)[0]


def eigh(a):
    """``jnp.linalg.eigh`` or, under :func:`pure_linalg`, :func:`jacobi_eigh`."""
    return jacobi_eigh(a) if _PURE.get() else jnp.linalg.eigh(a)


def qr(v):
    """``jnp.linalg.qr`` (reduced) or, under :func:`pure_linalg`, :func:`mgs_qr`."""
    return mgs_qr(v) if _PURE.get() else jnp.linalg.qr(v)


#: the largest tangent space (rows, columns) that :func:`tangent_qr` factorises by
#: Gram–Schmidt rather than by LAPACK
SMALL_TANGENTS = (64, 8)


def gram_schmidt_qr(v):
    """QR of ``v`` (n, k), k small, by modified Gram–Schmidt applied twice, one column
    against one column (element-wise products and sums, no matrix products): ``(Q, R)``
    with orthonormal columns, R upper triangular with a non-negative diagonal. The fewest
    kernels per step for the small systems of :func:`tangent_qr`. The columns are scaled by
    max|v| first (no overflow of the squares of large entries); columns whose norms differ by
    more than ~1e150 (float64) lose the smaller one to underflow, which tangents renormalised
    within the documented ``renorm_every`` never do."""
    k = v.shape[1]
    tiny = jnp.finfo(v.dtype).tiny
    zero = jnp.zeros((), v.dtype)
    # scaled by max|v|: no overflow of the squares of large entries
    big = jnp.max(jnp.abs(v))
    big = jnp.where(big > 0, big, 1).astype(v.dtype)
    v = v / big
    cols, r_cols = [], []
    for j in range(k):
        x = v[:, j]
        r = [zero] * k
        for _ in range(2):
            for i in range(j):
                c = jnp.sum(cols[i] * x)
                x = x - c * cols[i]
                r[i] = r[i] + c
        norm = jnp.sqrt(jnp.sum(x * x))
        r[j] = norm
        cols.append(x / jnp.maximum(norm, tiny))
        r_cols.append(jnp.stack(r))
    return jnp.stack(cols, 1), jnp.stack(r_cols, 1) * big


def tangent_qr(v):
    """QR of tangent columns ``v`` (n, k): :func:`gram_schmidt_qr` for n ≤ 64 and k ≤ 8 —
    the small systems (maps, ODEs), where the fixed cost of a LAPACK call is most of a step
    (Hénon, 10⁵ steps, k = 2: 0.175 s with LAPACK, 0.054 s with this and the drivers' record
    cadence on the CPU) — else :func:`qr` (Householder).
    Both give orthonormal Q to working precision; the two differ in round-off only."""
    n, k = v.shape[-2:]
    if n <= SMALL_TANGENTS[0] and k <= SMALL_TANGENTS[1]:
        return gram_schmidt_qr(v)
    return qr(v)


def log_abs_det(a):
    """log|det a| of a square matrix: ``slogdet`` (LU) or, under :func:`pure_linalg`, the
    diagonal of :func:`mgs_qr`."""
    if _PURE.get():
        return jnp.sum(jnp.log(jnp.abs(jnp.diagonal(mgs_qr(a)[1]))))
    return jnp.linalg.slogdet(a)[1]


def qr_q(v):
    """The Q factor of :func:`qr`."""
    return qr(v)[0]


def singular_values(a):
    """Singular values (descending) of a small matrix, via :func:`eigh` of aᵀa."""
    if not _PURE.get():
        return jnp.linalg.svd(a, compute_uv=False)
    w = jacobi_eigh(a.T @ a)[0]
    return jnp.sqrt(jnp.maximum(w[::-1], 0.0))
