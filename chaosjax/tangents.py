"""The pure pieces every tangent-space analysis is built from.

* :func:`tangent_step` — advance a state and k tangent vectors by one step (one
  ``jax.linearize`` of the step, vmapped over the vectors: cost ∝ k, never a dense Jacobian);
* :func:`qr_renormalize` — the one orthonormalisation: a QR with a non-negative diagonal
  (LAPACK, or modified Gram–Schmidt inside :func:`chaosjax._smalllinalg.pure_linalg`, which
  the sharded CPU programs use);
* :func:`random_basis` — a seeded random orthonormal basis;
* :func:`log_det_jacobian` — log|det J| from the dense Jacobian (small systems).

They are jittable and vmappable; :class:`chaosjax.LyapunovTracker` and the Lyapunov, CLV and
controller code use them and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from chaosjax import _smalllinalg as _sl


def tangent_step(step: Callable, x, basis, t, args=None, *, has_aux: bool = False):
    """Advance a state and k tangent vectors by one step.

    Args:
        step: ``step(x, t) -> x`` (or ``step(x, t, args)``) on a flat array state; with
            ``has_aux=True`` it returns ``(x_next, aux)`` and ``aux`` (e.g. carried leaves, the
            loss) is passed through untouched.
        x: state, shape (n,).
        basis: tangent vectors as columns, shape (n, k).
        t: time index.
        args: optional extra argument of the step (e.g. hyper-parameters).

    Returns:
        ``(x_next, J basis)`` (and ``aux``) with shapes (n,) and (n, k); one linearisation of
        the step, reused for the k vectors (cost ∝ k, no dense Jacobian).
    """
    f = (lambda v: step(v, t)) if args is None else (lambda v: step(v, t, args))
    if has_aux:
        y, lin, aux = jax.linearize(f, x, has_aux=True)
        return y, jax.vmap(lin, in_axes=1, out_axes=1)(basis), aux
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
    q, r = _sl.tangent_qr(y)
    s = jnp.sign(jnp.diagonal(r))
    s = jnp.where(s == 0, 1, s).astype(y.dtype)
    return q * s[None, :], r * s[:, None]


def random_basis(key, n: int, k: int, dtype=None):
    """A seeded random orthonormal basis, shape (n, k)."""
    dtype = dtype or jnp.asarray(0.0).dtype
    q, _ = qr_renormalize(jax.random.normal(key, (n, k), dtype))
    return q


def log_det_jacobian(step: Callable, x, t=0, args=None) -> jax.Array:
    """log|det J| of the step at (x, t) from the dense Jacobian (small systems only)."""
    f = (lambda v: step(v, t)) if args is None else (lambda v: step(v, t, args))
    return _sl.log_abs_det(jax.jacfwd(f)(x))


__all__ = ["log_det_jacobian", "qr_renormalize", "random_basis", "tangent_step"]
