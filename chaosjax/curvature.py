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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from chaosjax import _smalllinalg as _sl
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
from chaosjax._util import renamed, warn_renamed
from chaosjax.optimizers import operator_of, optimizer_hparams

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
    batch, info = tmap.curvature_batch(t, mode, subset)
    params = tmap.flat_params(state)

    def loss(p):
        return tmap.batch_loss(tmap.unravel_params(p), batch, state)

    return loss, params, info


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
    from chaosjax.training import TrainingMap

    if isinstance(loss, TrainingMap):
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


# ---------------------------------------------------------------------------------------------
# tracking during training (a stateful observable of the replica engine)


def _principal_angles(a, b):
    """Principal angles (k,) between the column spans of orthonormal a, b (dim, k)."""
    s = _sl.singular_values(a.T @ b)
    return jnp.arccos(jnp.clip(s, 0.0, 1.0))


class _CurvatureTracker(NamedTuple):
    """Track the top-k curvature of every replica at each record of :func:`run_replicas`.

    The first record runs a cold Lanczos (``cold_matvecs``); later records warm-start a block
    Krylov solve (``n_blocks`` blocks of k + 1 vectors: the previous eigenvectors and a fresh
    random vector; (k + 1)·(n_blocks + 1) matvecs) from the previous
    eigenvectors, sign-aligned to them. Recorded per replica:

    * ``sharpness`` (k,): top algebraic eigenvalues of the operator;
    * ``threshold``: the optimizer's stability threshold (:func:`chaosjax.optimizers.stability_threshold`) at the
      learning rate of the next step, η_t (:meth:`TrainingMap.learning_rate_at`: schedules
      included; NaN for an optimizer without a known threshold or learning rate);
    * ``sharpness_ratio``: sharpness / threshold (1 = edge of stability);
    * ``rotation``: 1 − |⟨v1(prev), v1⟩| between consecutive records (NaN at the first);
    * ``subspace_angle`` (k,): principal angles between consecutive top-k subspaces (radians);
    * ``grad_overlap`` / ``update_overlap`` (k,): ⟨ĝ, v_i⟩² and ⟨û, v_i⟩² of the unit
      gradient and of the unit parameter update of the next step;
    * ``top_layer_mass`` (layers,): share of v1's squared norm per layer;
    * ``eig_residual`` (k,): ‖A v − λ v‖;
    * ``sharpness_residual`` (k,): the relative residual ‖A v − λ v‖ / max_i |λ_i|;
    * ``sharpness_converged`` (k,): 1 where ``sharpness_residual`` ≤ ``tol``, else 0 — a record
      that is not converged is reported as such and left out of verdicts;
    * ``sharpness_matvecs``: the operator applications the record took.

    Convergence: after the first solve (cold Lanczos, or the warm block Krylov solve) the
    tracker restarts block Krylov from its k + 1 best Ritz vectors while any of the k pairs
    has a relative residual above ``tol``, within ``max_matvecs`` operator applications per
    record (``lax.while_loop``: under vmap every replica iterates until the slowest
    converges, and a converged replica keeps its values). Records that reach the cap
    unconverged keep their best estimate and ``sharpness_converged = 0``.

    Args:
        k: number of eigenpairs.
        operator: ``"hessian"``, ``"preconditioned"`` (P^{-1/2} H P^{-1/2} of Adam/RMSProp)
            or ``"auto"`` (the operator of the optimizer's threshold).
        mode: loss for the curvature: ``"full"``, ``"subset"`` (first ``subset`` examples)
            or ``"batch"`` (the minibatch of the record step).
        n_blocks: warm-start blocks; cold_matvecs: Lanczos steps of the first record.
        rows: the replicas tracked: ``"all"`` or ``"references"`` (NaN rows for the others).
        tol: relative residual a record must reach (default 1e-3, DESIGN.md "Numerical
            rules").
        max_matvecs: the cap on operator applications per record and replica.
    """

    k: int = 1
    operator: str = "auto"
    mode: str = "full"
    subset: int | None = None
    n_blocks: int = 2
    cold_matvecs: int = 64
    rows: str = "all"
    tol: float = 1e-3
    max_matvecs: int = 512

    DIMS = (  # extra dims of the records (after replica, step)
        ("sharpness", ("eig",)),
        ("subspace_angle", ("eig",)),
        ("grad_overlap", ("eig",)),
        ("update_overlap", ("eig",)),
        ("eig_residual", ("eig",)),
        ("sharpness_residual", ("eig",)),
        ("sharpness_converged", ("eig",)),
        ("top_layer_mass", ("layer",)),
    )
    NAMES = (
        "sharpness",
        "threshold",
        "sharpness_ratio",
        "rotation",
        "subspace_angle",
        "grad_overlap",
        "update_overlap",
        "top_layer_mass",
        "eig_residual",
        "sharpness_residual",
        "sharpness_converged",
        "sharpness_matvecs",
    )

    def validate(self, tmap) -> None:
        if self.rows not in ("all", "references"):
            raise ValueError(f"rows: unknown {self.rows!r}; allowed: all, references")
        if self.operator not in ("auto", "hessian", "preconditioned"):
            raise ValueError(
                f"operator: unknown {self.operator!r}; allowed: auto, hessian, preconditioned"
            )
        if self.mode not in LOSS_MODES:
            raise ValueError(f"mode: unknown {self.mode!r}; allowed: {', '.join(LOSS_MODES)}")
        if int(self.k) != self.k or not 1 <= self.k <= tmap.n_params:
            raise ValueError(f"k: must be an integer in [1, {tmap.n_params}], got {self.k!r}")
        if not 0 < self.tol < 1:
            raise ValueError(f"tol: must lie in (0, 1), got {self.tol!r}")
        if int(self.max_matvecs) != self.max_matvecs or self.max_matvecs < 1:
            raise ValueError(f"max_matvecs: must be a positive integer, got {self.max_matvecs!r}")
        if self._operator(tmap) == "preconditioned" and tmap.optimizer_name not in (
            "adam",
            "adamw",
            "rmsprop",
        ):
            raise ValueError(
                f"operator: 'preconditioned' needs an adam/adamw/rmsprop optimizer, got {tmap.optimizer_name!r}"
            )

    def _operator(self, tmap) -> str:
        if self.operator != "auto":
            return self.operator
        return operator_of(tmap.optimizer_name)

    def _one(self, tmap, state, hparams, t, v_prev, cold: bool):
        loss, p, _ = training_loss(tmap, state, t, mode=self.mode, subset=self.subset)
        matvec, _ = hessian_operator(loss, p)
        if self._operator(tmap) == "preconditioned":
            matvec = preconditioned_operator(
                matvec, training_preconditioner(tmap, state, t, hparams)
            )
        dim = p.shape[0]
        width = min(self.k + 1, dim)  # pairs kept for restarts: the k tracked and one more
        if cold:
            m = int(min(dim, max(self.cold_matvecs, 2 * self.k)))
            r = lanczos_eigs(matvec, dim, width, n_matvecs=m, dtype=p.dtype)
            first = m
        else:
            # a previous record without finite vectors (e.g. Adam before its first update, where
            # P is undefined) restarts from a fixed random basis; residuals show the accuracy
            start = jnp.where(
                jnp.all(jnp.isfinite(v_prev)),
                v_prev,
                jax.random.normal(jax.random.PRNGKey(1), v_prev.shape, v_prev.dtype),
            )
            # the warm start plus a fresh random vector of this record: a warm start alone
            # converges to *an* eigenvector and misses an eigenvalue that overtakes it
            fresh = jax.random.normal(
                jax.random.fold_in(jax.random.PRNGKey(2), t), (dim, 1), p.dtype
            )
            block = start if dim <= self.k else jnp.concatenate([start, fresh], axis=1)
            r = block_krylov_eigs(
                matvec, block, n_blocks=self.n_blocks, k=width,
                key=jax.random.fold_in(jax.random.PRNGKey(3), t),
            )  # fmt: skip
            first = block.shape[1] * (min(self.n_blocks, dim // block.shape[1] - 1) + 1)
        vecs, vals, res, used = self._refine(matvec, r, t, first)
        if not cold:
            sign = jnp.sign(jnp.sum(vecs * start, axis=0))
            vecs = vecs * jnp.where(sign == 0, 1.0, sign)
        rel = res / jnp.maximum(jnp.max(jnp.abs(vals)), jnp.finfo(p.dtype).tiny)
        thr = jnp.asarray(tmap.threshold_at(state, t, hparams), p.dtype)
        g = jax.grad(loss)(p)
        u = tmap.flat_params(tmap.step_with(state, t, hparams)) - p
        gu = g / jnp.maximum(jnp.linalg.norm(g), jnp.finfo(p.dtype).tiny)
        uu = u / jnp.maximum(jnp.linalg.norm(u), jnp.finfo(p.dtype).tiny)
        v1 = vecs[:, 0] ** 2
        layers = jnp.stack([jnp.sum(v1[a:b]) for a, b in tmap.layers.values()])
        nan = jnp.full((), jnp.nan, p.dtype)
        values = {
            "sharpness": vals,
            "threshold": thr,
            "sharpness_ratio": vals[0] / thr,
            "rotation": nan if cold else 1.0 - jnp.abs(v_prev[:, 0] @ vecs[:, 0]),
            "subspace_angle": jnp.full((self.k,), jnp.nan, p.dtype)
            if cold
            else _principal_angles(v_prev, vecs),
            "grad_overlap": (gu @ vecs) ** 2,
            "update_overlap": (uu @ vecs) ** 2,
            "top_layer_mass": layers / jnp.sum(v1),
            "eig_residual": res,
            "sharpness_residual": rel,
            "sharpness_converged": (rel <= self.tol).astype(p.dtype),
            "sharpness_matvecs": jnp.asarray(used, p.dtype),
        }
        return values, vecs

    def _restart_matvecs(self, dim: int) -> int:
        width = min(self.k + 1, dim)
        return width * (max(0, min(self.n_blocks, dim // width - 1)) + 1)

    def _refine(self, matvec, r, t, first: int):
        """Restarted block Krylov from the k + 1 best Ritz vectors of ``r`` until every
        tracked pair's relative residual is ≤ ``tol`` or ``max_matvecs`` is spent.

        Returns ``(vecs (dim, k), vals (k,), residuals (k,), matvecs used)``."""
        k = self.k
        dim = r.eigenvectors.shape[1]
        dtype = r.eigenvalues.dtype
        per = self._restart_matvecs(dim)
        n_restarts = max(0, (int(self.max_matvecs) - first) // per) if dim > k else 0

        def unconverged(vals, res):
            scale = jnp.maximum(jnp.max(jnp.abs(vals[:k])), jnp.finfo(dtype).tiny)
            return jnp.any(res[:k] > self.tol * scale)

        def cond(c):
            _, vals, res, i = c
            return (i < n_restarts) & unconverged(vals, res)

        def body(c):
            basis, _, _, i = c
            nxt = block_krylov_eigs(
                matvec, basis, n_blocks=self.n_blocks,
                key=jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(4), t), i),
            )  # fmt: skip
            return nxt.eigenvectors.T, nxt.eigenvalues, nxt.residuals, i + 1

        init = (r.eigenvectors.T, r.eigenvalues, r.residuals, jnp.zeros((), jnp.int32))
        if n_restarts:
            init = jax.lax.while_loop(cond, body, init)
        basis, vals, res, i = init
        return basis[:, :k], vals[:k], res[:k], first + per * i

    def init(self, tmap, states, hparams, t):
        """Cold start at the first record; returns (values, tracker state (R, n_params, k))."""
        return jax.vmap(lambda s, h: self._one(tmap, s, h, t, None, True))(states, hparams)

    def update(self, tmap, states, hparams, vecs, t):
        """Warm-started update at a later record."""
        return jax.vmap(lambda s, h, v: self._one(tmap, s, h, t, v, False))(states, hparams, vecs)

    def matvecs(self, first: bool) -> int:
        return self.cold_matvecs if first else (self.k + 1) * (self.n_blocks + 1)


class CurvatureTracker(_CurvatureTracker):
    __doc__ = _CurvatureTracker.__doc__
    __slots__ = ()

    def __new__(cls, *args, num_blocks=None, **kwargs):
        if num_blocks is not None:  # the old name, for one release
            if "n_blocks" in kwargs:
                raise TypeError("n_blocks: given twice (also as its old name 'num_blocks')")
            warn_renamed("num_blocks", "n_blocks", stacklevel=2)
            kwargs["n_blocks"] = num_blocks
        return super().__new__(cls, *args, **kwargs)


__all__ += ["CurvatureTracker"]
