"""Curvature: matrix-free Hessian, Gauss–Newton and preconditioned operators; eigenvalues,
trace and spectral density; stability thresholds of optimizers.

One operator layer serves every algorithm: an operator is a function ``matvec(v) -> A v``
on flat vectors (shape (dim,)), evaluated at the highest matmul precision.

* :func:`hessian_operator` — forward-over-reverse HVP ``jvp(grad(loss))``;
* :func:`ggn_operator` — Gauss–Newton ``Jᵀ H_ℓ J`` of a loss ℓ(f(θ));
* :func:`preconditioned_operator` — ``P^{-1/2} A P^{-1/2}`` for a diagonal P, e.g. the
  Adam / RMSProp preconditioner :func:`adaptive_preconditioner` reads from an optax state.

Algorithms (all jit/vmap friendly, fixed matvec counts):

* :func:`lanczos_eigs` / :func:`hessian_eigs` — Lanczos with full reorthogonalisation; the
  k largest (or smallest) *algebraic* eigenvalues, unit eigenvectors, residual norms and
  converged flags;
* :func:`block_krylov_eigs` — a warm-startable block Krylov / Rayleigh–Ritz solver for
  tracking eigenvectors during training (exact residuals, no extra matvecs);
* :func:`hessian_trace` — Hutchinson or Hutch++ with a standard error;
* :func:`hessian_density` — stochastic Lanczos quadrature nodes and weights, with
  :func:`smooth_density`;
* :func:`dense_hessian` — the dense matrix from chunked HVP columns (tiny models; the test
  oracle).

References:
    Ghorbani, Krishnan, Xiao (2019). An investigation into neural net optimization via
    Hessian eigenvalue density. ICML.
    Meyer, Musco, Musco, Woodruff (2021). Hutch++: optimal stochastic trace estimation.
    Cohen, Kaur, Li, Kolter, Talwalkar (2021). Gradient descent on neural networks typically
    occurs at the edge of stability. ICLR.

The Krylov kernels themselves live in :mod:`chaosjax._krylov` and are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from chaosjax._krylov import (
    TRACE_METHODS,
    DensityResult,
    EigResult,
    TraceResult,
    block_krylov_eigs,
    density_estimate,
    lanczos,
    lanczos_eigs,
    trace_estimate,
)
from chaosjax._layout import layout_of
from chaosjax._util import renamed
from chaosjax.optimizers import optimizer_hparams

PRECISION = "highest"

# ---------------------------------------------------------------------------------------------
# operators


def _ravel(params):
    """(flat params, unravel) in the one flat layout of :mod:`chaosjax._layout`."""
    lay = layout_of(params, what="params")
    return lay.ravel(params), lay.unravel


def _flat(loss: Callable, params):
    """(loss on flat vectors, flat params, unravel)."""
    if isinstance(params, jax.Array | np.ndarray) and jnp.ndim(params) == 1:
        p = jnp.asarray(params)
        return loss, p, lambda v: v
    flat, unravel = _ravel(params)
    return (lambda v: loss(unravel(v))), flat, unravel


def hvp(loss: Callable, params, v):
    """Hessian-vector product H v of ``loss`` at ``params`` (forward-over-reverse).

    Args:
        loss: scalar function of a parameter pytree (or of a flat vector).
        params: where the Hessian is taken.
        v: a vector shaped like ``params`` (pytree of the same structure, or flat).

    Returns:
        H v, shaped like ``v``.
    """
    with jax.default_matmul_precision(PRECISION):
        return jax.jvp(jax.grad(loss), (params,), (v,))[1]


def hessian_operator(loss: Callable, params) -> tuple[Callable, jax.Array]:
    """``(matvec, flat_params)``: the Hessian of ``loss`` at ``params`` on flat vectors."""
    f, p, _ = _flat(loss, params)
    g = jax.grad(f)

    def matvec(v):
        with jax.default_matmul_precision(PRECISION):
            return jax.jvp(g, (p,), (v,))[1]

    return matvec, p


def ggn_operator(
    apply_fn: Callable, out_loss: Callable, params, x, y
) -> tuple[Callable, jax.Array]:
    """Gauss–Newton operator ``Jᵀ H_ℓ J`` of ``out_loss(apply_fn(params, x), y)``.

    J is the Jacobian of the outputs with respect to the (flat) parameters and H_ℓ the Hessian
    of the loss with respect to the outputs. Equals the Hessian when the model is linear in its
    parameters.
    """
    flat, unravel = (
        _ravel(params)
        if not (isinstance(params, jax.Array) and params.ndim == 1)
        else (params, lambda v: v)
    )

    def f(v):
        return apply_fn(unravel(v), x)

    def matvec(v):
        with jax.default_matmul_precision(PRECISION):
            out, jv = jax.jvp(f, (flat,), (v,))
            hjv = jax.jvp(jax.grad(lambda o: out_loss(o, y)), (out,), (jv,))[1]
            _, vjp = jax.vjp(f, flat)
            return vjp(hjv)[0]

    return matvec, flat


def preconditioned_operator(matvec: Callable, p_diag) -> Callable:
    """``v -> P^{-1/2} A P^{-1/2} v`` for a positive diagonal preconditioner ``p_diag`` (dim,)."""
    s = 1.0 / jnp.sqrt(p_diag)

    def op(v):
        return s * matvec(s * v)

    return op


def adaptive_preconditioner(opt_state) -> tuple[jax.Array, str]:
    """The diagonal preconditioner P (flat, parameter order) of an Adam or RMSProp optax state.

    Adam (``ScaleByAdamState``): P = sqrt(ν̂) + ε with ν̂ = ν / (1 − β2^t) (t = the state's
    count, at least 1). RMSProp (``ScaleByRmsState``): P = sqrt(ν + ε). The hyper-parameters
    (β2, ε) are not in the state; pass them through :func:`training_preconditioner`.

    Returns:
        ``(nu_flat, kind, count)``: the flat second moments, ``"adam"`` or ``"rmsprop"``, and
        Adam's step count (None for RMSProp); raises ``ValueError`` when the state has neither.
    """
    import optax

    def find(tree):
        for node in jax.tree_util.tree_leaves(
            tree, is_leaf=lambda n: isinstance(n, tuple) and hasattr(n, "_fields")
        ):
            if isinstance(node, optax.ScaleByAdamState):
                return _ravel(node.nu)[0], "adam", node.count
            if isinstance(node, optax.ScaleByRmsState):
                return _ravel(node.nu)[0], "rmsprop", None
            if isinstance(node, tuple) and hasattr(node, "_fields"):  # a wrapper: look inside
                found = find(tuple(node))
                if found is not None:
                    return found
        return None

    found = find(opt_state)
    if found is None:
        raise ValueError(
            "optimizer: the state holds no Adam or RMSProp second moments to precondition with"
        )
    return found


def training_preconditioner(tmap, state, t, hparams=None) -> jax.Array:
    """P (n_params,) of an Adam/AdamW/RMSProp :class:`TrainingMap` state at step t.

    Adam: sqrt(ν̂ + eps_root) + eps with ν̂ = ν / (1 − β2^count). Before the first update
    (count = 0) Adam holds no second-moment estimate, so P is NaN there rather than eps.
    """
    hp = tmap.hparams if hparams is None else hparams
    opt_state = tmap.opt_state(state, t)
    nu, kind, count = adaptive_preconditioner(opt_state)
    p = preconditioner_diagonal(nu, kind, count, optimizer_hparams(tmap, opt_state, hp))
    return jnp.where(count > 0, p, jnp.nan) if kind == "adam" else p


def preconditioner_diagonal(nu, kind: str, count, hparams) -> jax.Array:
    """P from :func:`adaptive_preconditioner`'s ``(nu, kind, count)`` and the optimizer's
    hyper-parameters: Adam sqrt(ν / (1 − β2^max(count, 1)) + eps_root) + eps, RMSProp
    sqrt(ν + eps)."""
    if kind == "adam":
        c = jnp.maximum(count, 1).astype(nu.dtype)
        return (
            jnp.sqrt(nu / (1.0 - hparams["b2"] ** c) + hparams.get("eps_root", 0.0))
            + hparams["eps"]
        )
    return jnp.sqrt(nu + hparams["eps"])


LOSS_MODES = ("full", "subset", "batch")


def training_loss(tmap, state, t=0, *, mode: str = "full", subset: int | None = None, hparams=None):
    """``(loss(params), params, info)`` of a :class:`TrainingMap` state for curvature.

    Args:
        mode: ``"full"`` (the whole training set), ``"subset"`` (the first ``subset``
            training examples, recorded in ``info``) or ``"batch"`` (the minibatch of step t).
    """
    if mode not in LOSS_MODES:
        raise ValueError(f"mode: unknown {mode!r}; allowed: {', '.join(LOSS_MODES)}")
    return tmap.curvature_loss(state, t, mode, subset)


@renamed(num_matvecs="n_matvecs")
def hessian_eigs(
    loss: Callable, params, k: int, *, n_matvecs=None, key=None, which="largest", tol=None
) -> EigResult:
    """The k largest algebraic Hessian eigenvalues of ``loss`` at ``params`` (Lanczos).

    ``loss`` maps a parameter pytree (or a flat vector) to a scalar; or pass a
    :class:`chaosjax.TrainingMap` (any ``from_*``) and one of its states: the Hessian of the
    loss its step differentiates, on the full training set (:func:`training_loss`). Eigenvectors
    are flat unit rows in ``jax.tree_util`` leaf order (the flat layout of
    :mod:`chaosjax._layout`). See :func:`lanczos_eigs`.
    """
    from chaosjax._map import is_training_map

    if is_training_map(loss):
        loss, params, _ = training_loss(loss, params)
    matvec, p = hessian_operator(loss, params)
    return lanczos_eigs(
        matvec, p.shape[0], k, n_matvecs=n_matvecs, key=key, which=which, dtype=p.dtype, tol=tol
    )


def dense_hessian(loss: Callable, params, *, chunk_size: int = 64) -> jax.Array:
    """The dense Hessian (dim, dim) from HVP columns, ``chunk_size`` columns per vmap."""
    matvec, p = hessian_operator(loss, params)
    n = p.shape[0]
    eye = jnp.eye(n, dtype=p.dtype)
    cols = [jax.vmap(matvec)(eye[i : i + chunk_size]) for i in range(0, n, chunk_size)]
    h = jnp.concatenate(cols, axis=0).T
    return 0.5 * (h + h.T)


# ---------------------------------------------------------------------------------------------
# trace and density


@renamed(num_probes="n_probes")
def hessian_trace(
    loss: Callable, params, *, n_probes: int, key, method: str = "hutchinson"
) -> TraceResult:
    """tr(H) of ``loss`` at ``params`` by :func:`trace_estimate`."""
    matvec, p = hessian_operator(loss, params)
    return trace_estimate(
        matvec, p.shape[0], n_probes=n_probes, key=key, method=method, dtype=p.dtype
    )


@renamed(num_matvecs="n_matvecs", num_runs="n_runs")
def hessian_density(loss: Callable, params, *, n_matvecs: int, n_runs: int, key) -> DensityResult:
    """Spectral density of the Hessian by stochastic Lanczos quadrature (nodes, weights)."""
    matvec, p = hessian_operator(loss, params)
    return density_estimate(
        matvec, p.shape[0], n_matvecs=n_matvecs, n_runs=n_runs, key=key, dtype=p.dtype
    )


def smooth_density(nodes, weights, grid=None, *, width: float | None = None, n_grid: int = 512):
    """Gaussian-smoothed density on a grid from SLQ nodes and weights.

    The default width is 1% of the node range (at least 1e-12 of the largest |node|), wide
    enough to merge Ritz values from different runs, narrow enough to keep outliers apart.

    Returns:
        ``(grid, density)`` with ∫ density ≈ Σ weights.
    """
    nodes = np.asarray(nodes, np.float64)
    weights = np.asarray(weights, np.float64)
    lo, hi = float(nodes.min()), float(nodes.max())
    span = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
    width = 0.01 * span if width is None else float(width)
    if not width > 0:
        raise ValueError(f"width: must be > 0, got {width!r}")
    if grid is None:
        grid = np.linspace(lo - 5 * width, hi + 5 * width, n_grid)
    grid = np.asarray(grid, np.float64)
    z = (grid[:, None] - nodes[None, :]) / width
    dens = (weights[None, :] * np.exp(-0.5 * z**2)).sum(1) / (width * math.sqrt(2 * math.pi))
    return grid, dens


# ---------------------------------------------------------------------------------------------
# stability thresholds


__all__ = [
    "LOSS_MODES",
    "TRACE_METHODS",
    "DensityResult",
    "EigResult",
    "TraceResult",
    "adaptive_preconditioner",
    "block_krylov_eigs",
    "dense_hessian",
    "density_estimate",
    "ggn_operator",
    "hessian_density",
    "hessian_eigs",
    "hessian_operator",
    "hessian_trace",
    "hvp",
    "lanczos",
    "lanczos_eigs",
    "preconditioned_operator",
    "preconditioner_diagonal",
    "smooth_density",
    "trace_estimate",
    "training_loss",
    "training_preconditioner",
]
