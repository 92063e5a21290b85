"""The curvature tracker: top-k Hessian (or preconditioned) eigenpairs of every replica at each
record of :func:`chaosjax.run_replicas`, warm-started, restarted until converged or capped.

Built on the operators of :mod:`chaosjax.curvature` and the kernels of :mod:`chaosjax._krylov`;
exported as :class:`chaosjax.CurvatureTracker`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from chaosjax import _smalllinalg as _sl
from chaosjax._krylov import block_krylov_eigs, lanczos_eigs
from chaosjax._observer import Observer, Record
from chaosjax.curvature import (
    LOSS_MODES,
    hessian_operator,
    preconditioned_operator,
    training_loss,
    training_preconditioner,
)
from chaosjax.optimizers import operator_of

# ---------------------------------------------------------------------------------------------
# tracking during training (a stateful observable of the replica engine)


def _principal_angles(a, b):
    """Principal angles (k,) between the column spans of orthonormal a, b (dim, k)."""
    s = _sl.singular_values(a.T @ b)
    return jnp.arccos(jnp.clip(s, 0.0, 1.0))


@dataclasses.dataclass(frozen=True)
class CurvatureTracker(Observer):
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
        restart_blocks: Krylov blocks of each restart ((k + 1)·(restart_blocks + 1) matvecs; a
            deeper space converges in fewer matvecs than many shallow restarts).
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
    restart_blocks: int = 8

    requires = ("loss",)

    _DIMS = (  # extra dims of the records (after replica, step)
        ("sharpness", ("eig",)),
        ("subspace_angle", ("eig",)),
        ("grad_overlap", ("eig",)),
        ("update_overlap", ("eig",)),
        ("eig_residual", ("eig",)),
        ("sharpness_residual", ("eig",)),
        ("sharpness_converged", ("eig",)),
        ("top_layer_mass", ("layer",)),
    )
    _NAMES = (
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

    def records(self, model) -> dict[str, Record]:
        dims = dict(self._DIMS)
        return {name: Record("step", dims.get(name, ())) for name in self._NAMES}

    def validate(self, tmap, dim=None, info=None) -> None:
        if self.rows not in ("all", "references"):
            raise ValueError(f"rows: unknown {self.rows!r}; allowed: all, references")
        if self.operator not in ("auto", "hessian", "preconditioned"):
            raise ValueError(
                f"operator: unknown {self.operator!r}; allowed: auto, hessian, preconditioned"
            )
        if self.mode not in LOSS_MODES:
            raise ValueError(f"mode: unknown {self.mode!r}; allowed: {', '.join(LOSS_MODES)}")
        n = tmap.n_params_of(dim) if dim is not None else None
        if int(self.k) != self.k or self.k < 1 or (n is not None and self.k > n):
            raise ValueError(f"k: must be an integer in [1, {n}], got {self.k!r}")
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
        spans = list(tmap.layers.values()) or [(0, dim)]  # a map without layers: one
        layers = jnp.stack([jnp.sum(v1[a:b]) for a, b in spans])
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
        return width * (max(0, min(self.restart_blocks, dim // width - 1)) + 1)

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
                matvec, basis, n_blocks=self.restart_blocks, unroll=False,
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


__all__ = ["CurvatureTracker"]
