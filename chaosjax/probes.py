"""Probes of :class:`chaosjax.Monitor`: the field's stability measures, inside your own loop.

Every probe is a pure, jittable function of (parameters, batch, optimizer state, η_t, its own
state), jitted once by the monitor, so it runs under the user's sharding and dtype. Values are
Python floats in the monitor's output, the primary one under the probe's snake_case ``name``,
extras under ``name/…``; the monitor adds ``name/seconds`` (wall time of the call) and
``name/matvecs`` (Hessian-vector products, or forward passes for forward-only probes).

Notation: L the loss ``loss_fn(params, batch)`` on the batch of step t, θ the parameters as one
flat vector (dim,), g = ∇L, H = ∇²L, η_t the learning rate at t, u_t the optimizer's update as
the loop would apply it, θ_{t+1} = θ_t + u_t with u_t = ``tx.update(g, opt_state, params)``
(GD: u_t = −η_t g).

Precision: probes accumulate in ``result_type(param dtype, float32)`` — float32 for bfloat16 and
float32 models, float64 for float64 ones — while the model runs in its own dtype
(:mod:`chaosjax._probe_base`).

Probes that do not apply give NaN, and the monitor says why once (a warning, and
``Monitor.reasons``): η_t unknown, no ``wrap`` for FTLE, a step that is not smooth.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

from chaosjax._probe_base import (
    Context,
    Probe,
    ProbeInputs,
    check_every,
    rayleigh,
    top_eigs,
)
from chaosjax.curvature import adaptive_preconditioner, preconditioner_diagonal
from chaosjax.optimizers import OPTIMIZERS, held_hyperparams, spec, stability_threshold


def _check_int(v, what: str, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{what}: must be an integer >= {lo}, got {v!r}")
    return v


def _check_pos(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
        raise ValueError(f"{what}: must be a number > 0, got {v!r}")
    return float(v)


_ETA_REASON = (
    "η_t is unknown: pass Monitor(learning_rate=...) (a float or an optax schedule of t), or "
    "build the optimizer with optax.inject_hyperparams so its state holds it"
)


class _Eigen(Probe):
    """Shared by the eigenvalue probes: the warm start (dim, b) and the solve."""

    k: int = 1
    tol: float = 1e-6
    n_blocks: int = 4
    max_matvecs: int = 1000

    def _validate(self):
        _check_int(self.k, "k")
        _check_pos(self.tol, "tol")
        _check_int(self.n_blocks, "n_blocks")
        _check_int(self.max_matvecs, "max_matvecs")
        check_every(self.every)

    @property
    def width(self) -> int:
        """Block width b = k + 1 (one guard vector speeds convergence past a close λ_{k+1})."""
        return self.k + 1

    def init_state(self, ctx: Context, key):
        w = min(self.width, ctx.layout.dim)
        return jax.random.normal(key, (ctx.layout.dim, w), ctx.dtype)

    def _solve(self, mv, v0):
        k = min(self.k, v0.shape[1])
        b = v0.shape[1]
        p = max(0, min(self.n_blocks, v0.shape[0] // b - 1))
        rounds = max(1, self.max_matvecs // (b * (p + 1)))
        return top_eigs(mv, v0, k, tol=self.tol, n_blocks=self.n_blocks, max_rounds=rounds)


@dataclasses.dataclass(frozen=True, eq=False)
class Sharpness(_Eigen):
    """The k largest algebraic eigenvalues λ_1 ≥ … ≥ λ_k of H = ∇²L at θ_t.

    Solved by block Krylov / Rayleigh–Ritz rounds (block width k + 1, ``n_blocks`` blocks a
    round), warm-started from the previous call's Ritz vectors, until the relative residual
    max_i ‖H v_i − λ_i v_i‖ / max|λ| ≤ ``tol`` or ``max_matvecs`` Hessian-vector products are
    spent (a miss shows in ``sharpness/residual``).

    Values: ``sharpness`` = λ_1; ``sharpness/1`` … ``sharpness/{k-1}`` = λ_2 … λ_k;
    ``sharpness/residual`` = the relative residual reached.

    Memory: the Krylov basis and its image, 2·b·(p + 1) flat vectors in the work dtype, plus
    a few b-wide blocks and the HVP's own (b = k + 1, p = ``n_blocks``). Measured at k = 1,
    p = 4 on a 5.8M-parameter float32 MLP: XLA's temporaries 31.4 parameter vectors, 36.4
    with the arguments and outputs (benchmarks/RESULTS.md, "Monitor").

    Args:
        batch: a fixed batch to measure on (default: the batch of step t).
    """

    k: int = 1
    tol: float = 1e-6
    batch: Any = None
    every: int | None = None
    n_blocks: int = 4
    max_matvecs: int = 1000
    name: ClassVar[str] = "sharpness"

    def __post_init__(self):
        self._validate()

    def measure(self, ctx, inp: ProbeInputs, state):
        batch = inp.batch if self.batch is None else self.batch
        x, c = ctx.flat(inp.params)
        theta, vecs, rel, n = self._solve(ctx.hvp(ctx.flat_loss(c, batch), x), state)
        out = {"sharpness": theta[0], "sharpness/residual": jnp.max(rel)}
        out.update({f"sharpness/{i}": theta[i] for i in range(1, theta.shape[0])})
        return out, vecs, n


@dataclasses.dataclass(frozen=True, eq=False)
class PreconditionedSharpness(_Eigen):
    """λ_1(P^-1/2 H P^-1/2), P the diagonal preconditioner an Adam or RMSProp optax state holds.

    Adam: P = sqrt(ν / (1 − β2^count) + eps_root) + eps; RMSProp: P = sqrt(ν + eps)
    (:func:`chaosjax.curvature.preconditioner_diagonal`); the hyper-parameters are those an
    ``optax.inject_hyperparams`` state holds, else the arguments here (optax's defaults).
    NaN before Adam's first update (count 0: no second-moment estimate yet).

    Values: ``preconditioned_sharpness`` = λ_1; ``preconditioned_sharpness/threshold`` = the
    registry's threshold at η_t: (2 + 2β1)/((1 − β1)η_t) for Adam, 2/η_t for RMSProp (NaN
    without η_t); ``preconditioned_sharpness/residual``. Warm-started like :class:`Sharpness`.
    """

    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    eps_root: float = 0.0
    k: int = 1
    tol: float = 1e-6
    every: int | None = None
    n_blocks: int = 4
    max_matvecs: int = 1000
    name: ClassVar[str] = "preconditioned_sharpness"
    needs: ClassVar[frozenset[str]] = frozenset({"optimizer"})

    def __post_init__(self):
        self._validate()

    def check_opt_state(self, opt_state) -> None:
        kinds = (optax.ScaleByAdamState, optax.ScaleByRmsState)
        nodes = jax.tree_util.tree_leaves(opt_state, is_leaf=lambda n: isinstance(n, kinds))
        if not any(isinstance(n, kinds) for n in nodes):
            raise ValueError(
                "optimizer: PreconditionedSharpness needs an Adam-type or RMSProp optax state "
                "(a ScaleByAdamState or ScaleByRmsState inside it, as optax.adam, adamw or "
                f"rmsprop build); the state given holds neither ({type(opt_state).__name__})"
            )

    def measure(self, ctx, inp: ProbeInputs, state):
        x, c = ctx.flat(inp.params)
        nu, kind, count = adaptive_preconditioner(inp.opt_state)
        hp = {"b1": self.b1, "b2": self.b2, "eps": self.eps, "eps_root": self.eps_root}
        hp.update(held_hyperparams(inp.opt_state))
        p = preconditioner_diagonal(nu.astype(ctx.dtype), kind, count, hp)
        if kind == "adam":
            p = jnp.where(count > 0, p, jnp.nan)
        s = 1.0 / jnp.sqrt(p)
        h = ctx.hvp(ctx.flat_loss(c, inp.batch), x)
        theta, vecs, rel, n = self._solve(lambda v: s * h(s * v), state)
        name = "adam" if kind == "adam" else "rmsprop"
        thr = OPTIMIZERS[name].constant({"b1": hp["b1"]}) / inp.eta
        out = {
            "preconditioned_sharpness": theta[0],
            "preconditioned_sharpness/threshold": thr,
            "preconditioned_sharpness/residual": jnp.max(rel),
        }
        return out, jnp.where(jnp.isfinite(vecs), vecs, state), n

    def reason(self, *, eta_known, tangents):
        return "" if eta_known else "preconditioned_sharpness/threshold: " + _ETA_REASON


@dataclasses.dataclass(frozen=True, eq=False)
class BatchSharpness(Probe):
    """Batch sharpness E_B[g_Bᵀ H_B g_B / ‖g_B‖²] (Andreyev & Beneventano, "Edge of Stochastic
    Stability", arXiv 2412.20553): g_B, H_B the gradient and Hessian of the loss on minibatch
    B, all at the current θ_t; the mean over the last ``n`` batches the loop passed (fewer
    before n steps; a batch whose shapes differ from the current one is left out), or over
    ``sampler(t, i)`` for i = 0 … n − 1 when a sampler is given.

    Values: ``batch_sharpness`` = the mean; ``batch_sharpness/stderr`` = its standard error
    std/√m over the m batches (ddof 1; NaN for m < 2); ``batch_sharpness/batches`` = m.

    Memory and buffers: without a sampler the monitor keeps *references* to the last ``n``
    batches the loop passed (no copy: n batches stay alive on their devices). A train step
    that donates its batch buffers (``jax.jit(step, donate_argnums=1)``) invalidates them, and
    the next call fails on a deleted array; with such a step pass ``sampler=`` (or a copy of
    the batch to ``mon``).
    """

    n: int = 16
    sampler: Callable | None = None
    every: int | None = None
    name: ClassVar[str] = "batch_sharpness"
    needs: ClassVar[frozenset[str]] = frozenset({"history"})

    def __post_init__(self):
        _check_int(self.n, "n")
        check_every(self.every)
        if self.sampler is not None and not callable(self.sampler):
            raise TypeError(
                f"sampler: expected a callable sampler(t, i) -> batch, got "
                f"{type(self.sampler).__name__}"
            )

    def history_size(self) -> int:
        return 0 if self.sampler is not None else self.n

    def n_batches(self) -> int:
        return self.n

    def measure(self, ctx, inp: ProbeInputs, state):
        batches, w = inp.history
        x, c = ctx.flat(inp.params)

        def one(b):
            f = ctx.flat_loss(c, b)
            g = jax.grad(f)(x)
            return rayleigh(ctx.hvp(f, x), g)

        r = jax.lax.map(one, batches)
        ok = (w > 0) & jnp.isfinite(r)
        m = jnp.sum(ok)
        mean = jnp.sum(jnp.where(ok, r, 0.0)) / m
        var = jnp.sum(jnp.where(ok, (r - mean) ** 2, 0.0)) / (m - 1)
        stderr = jnp.where(m > 1, jnp.sqrt(var / m), jnp.nan)
        out = {
            "batch_sharpness": mean,
            "batch_sharpness/stderr": stderr,
            "batch_sharpness/batches": m.astype(ctx.dtype),
        }
        return out, state, jnp.sum(w > 0)


@dataclasses.dataclass(frozen=True, eq=False)
class CriticalSharpness(Probe):
    """Critical sharpness λ_c = 2/η_c (Kalra et al., arXiv 2601.16979), forward passes only.

    η_c = s_c·η_t with s_c the smallest multiplier of the optimizer's own update u_t for which
    L(θ + s·u_t) > L(θ): from s = 1, doubling until the loss rises (at most
    ``max_doublings``), then bisection of the bracket [s_lo, s_hi] until
    s_hi − s_lo ≤ ``rtol``·s_hi; s_c = s_hi. (The first rise found: a loss that rises and
    falls again inside the first bracket is read at its crossing there.) Under GD on
    ½θᵀAθ, L(θ − sηg) = L − sη gᵀg + ½s²η² gᵀAg, so λ_c = gᵀAg/gᵀg.

    Values: ``critical_sharpness`` = λ_c (NaN without η_t, and where the loss never rises:
    u_t = 0 or a descent along the whole doubling range); ``critical_sharpness/step_scale`` =
    s_c (defined without η_t). ``critical_sharpness/matvecs`` counts forward passes.
    """

    rtol: float = 1e-3
    max_doublings: int = 40
    every: int | None = None
    name: ClassVar[str] = "critical_sharpness"
    needs: ClassVar[frozenset[str]] = frozenset({"optimizer"})

    def __post_init__(self):
        _check_pos(self.rtol, "rtol")
        _check_int(self.max_doublings, "max_doublings")
        check_every(self.every)

    def measure(self, ctx, inp: ProbeInputs, state):
        x, c = ctx.flat(inp.params)
        u = ctx.update(inp.params, x, c, inp.batch, inp.opt_state)
        f = ctx.flat_loss(c, inp.batch)
        l0 = f(x)

        def rises(s):
            return f(x + s * u) > l0

        one = jnp.ones((), ctx.dtype)

        def grow(cv):
            _, hi, _, n = cv
            return hi, 2.0 * hi, rises(2.0 * hi), n + 1

        lo, hi, r_hi, n = jax.lax.while_loop(
            lambda cv: ~cv[2] & (cv[3] < self.max_doublings + 2),
            grow,
            (0.0 * one, one, rises(one), jnp.asarray(2)),
        )

        def halve(cv):
            lo, hi, n = cv
            mid = 0.5 * (lo + hi)
            r = rises(mid)
            return jnp.where(r, lo, mid), jnp.where(r, mid, hi), n + 1

        lo, hi, n = jax.lax.while_loop(
            lambda cv: r_hi & (cv[1] - cv[0] > self.rtol * cv[1]) & (cv[2] < 300),
            halve,
            (lo, hi, n),
        )
        s_c = jnp.where(r_hi, hi, jnp.nan)
        out = {"critical_sharpness": 2.0 / (s_c * inp.eta), "critical_sharpness/step_scale": s_c}
        return out, state, n

    def reason(self, *, eta_known, tangents):
        return "" if eta_known else _ETA_REASON


@dataclasses.dataclass(frozen=True, eq=False)
class DirectionalSharpness(Probe):
    """uᵀHu/‖u‖² along the optimizer's update u_t at θ_t (one Hessian-vector product).

    Value: ``directional_sharpness`` (NaN where u_t = 0).
    """

    every: int | None = None
    name: ClassVar[str] = "directional_sharpness"
    needs: ClassVar[frozenset[str]] = frozenset({"optimizer"})

    def __post_init__(self):
        check_every(self.every)

    def measure(self, ctx, inp: ProbeInputs, state):
        x, c = ctx.flat(inp.params)
        u = ctx.update(inp.params, x, c, inp.batch, inp.opt_state)
        h = ctx.hvp(ctx.flat_loss(c, inp.batch), x)
        return {"directional_sharpness": rayleigh(h, u)}, state, jnp.asarray(1)


@dataclasses.dataclass(frozen=True, eq=False)
class GradientNorm(Probe):
    """‖g‖₂ = ‖∇L(θ_t)‖ on the batch of step t. Values: ``gradient_norm``, ``gradient_norm/loss``
    = L(θ_t) on that batch (both in the work dtype)."""

    every: int | None = None
    name: ClassVar[str] = "gradient_norm"

    def __post_init__(self):
        check_every(self.every)

    def measure(self, ctx, inp: ProbeInputs, state):
        x, c = ctx.flat(inp.params)
        loss, g = jax.value_and_grad(ctx.flat_loss(c, inp.batch))(x)
        out = {"gradient_norm": jnp.linalg.norm(g), "gradient_norm/loss": loss}
        return out, state, jnp.asarray(0)


@dataclasses.dataclass(frozen=True, eq=False)
class Threshold(Probe):
    """The stability threshold at step t.

    Values: ``threshold`` = 2/η_t (GD's threshold on λ_max); ``threshold/learning_rate`` = η_t;
    with ``optimizer`` named (a registry name, :mod:`chaosjax.optimizers`: ``"momentum"``,
    ``"adam"``, …, with its ``hparams``), ``threshold/rule`` = the registry's threshold c/η_t
    on its operator (Hessian or preconditioned). NaN with the reason when η_t is unknown.
    """

    optimizer: str | None = None
    hparams: dict = dataclasses.field(default_factory=dict)
    every: int | None = None
    name: ClassVar[str] = "threshold"
    needs: ClassVar[frozenset[str]] = frozenset({"learning_rate"})

    def __post_init__(self):
        check_every(self.every)
        if self.optimizer is not None:
            spec(self.optimizer)

    def measure(self, ctx, inp: ProbeInputs, state):
        out = {"threshold": 2.0 / inp.eta, "threshold/learning_rate": inp.eta}
        if self.optimizer is not None:
            hp = {**self.hparams, "learning_rate": inp.eta}
            out["threshold/rule"] = jnp.asarray(stability_threshold(self.optimizer, hp)[0])
        return out, state, jnp.asarray(0)

    def reason(self, *, eta_known, tangents):
        return "" if eta_known else _ETA_REASON


@dataclasses.dataclass(frozen=True, eq=False)
class FTLE(Probe):
    """Finite-time Lyapunov exponents of the user's step along the user's trajectory.

    ``Monitor.wrap(train_step)`` advances k orthonormal tangents Q through the Jacobian of the
    map (θ, s) ↦ (θ + u, s′), (u, s′) = ``tx.update(∇L(θ; B_t), s, θ)`` on the batch B_t the
    loop used, with QR renormalisation each step (:func:`chaosjax.tangent_step`,
    :func:`chaosjax.qr_renormalize`). Values: ``ftle`` = (1/n) Σ log R_11 over the n steps
    since the previous record (per step); ``ftle/1`` … ``ftle/{k-1}`` the next ones. NaN (with
    the reason) without ``wrap``, for a step that is not smooth (Lion, sign-SGD:
    :func:`chaosjax.step_smoothness`), and at a record with no step since the previous one.
    ``ftle/matvecs`` = the tangent JVPs (k per step); ``ftle/seconds`` the time spent in the
    tangent programs since the previous record.
    """

    k: int = 1
    every: int | None = None
    name: ClassVar[str] = "ftle"
    needs: ClassVar[frozenset[str]] = frozenset({"optimizer", "tangents"})

    def __post_init__(self):
        _check_int(self.k, "k")
        check_every(self.every)

    def measure(self, ctx, inp: ProbeInputs, state):
        logs, n = inp.tangents
        lam = jnp.where(n > 0, logs / jnp.maximum(n, 1), jnp.nan)
        out = {"ftle": lam[0]}
        out.update({f"ftle/{i}": lam[i] for i in range(1, lam.shape[0])})
        return out, state, n * lam.shape[0]

    def reason(self, *, eta_known, tangents):
        return "" if tangents else "ftle needs the tangents of mon.wrap(train_step)"


@dataclasses.dataclass(frozen=True, eq=False)
class SelfStabilization(_Eigen):
    """Self-stabilization quantities (Damian, Nichani, Lee, ICLR 2023) at θ_t.

    S = λ_max(H) and its unit eigenvector u (warm-started as :class:`Sharpness`),
    ∇S = ∇³L[u, u] = ∇_θ (uᵀ H(θ) u) at fixed u, α = −∇L·∇S (progressive sharpening: S grows
    along −∇L when α > 0), β = ‖∇S‖², and the predicted oscillation amplitude √(2α/β) along u.
    Damian et al. define these on the projected ("constrained") trajectory; evaluated at θ_t
    they are an approximation of those quantities.

    Values: ``self_stabilization`` = √(2α/β) (NaN when α ≤ 0 or β = 0: no sharpening to
    balance); ``self_stabilization/alpha``, ``/beta``, ``/sharpness`` = S, ``/residual``.
    """

    tol: float = 1e-6
    every: int | None = None
    n_blocks: int = 4
    max_matvecs: int = 1000
    name: ClassVar[str] = "self_stabilization"

    def __post_init__(self):
        self._validate()

    def measure(self, ctx, inp: ProbeInputs, state):
        x, c = ctx.flat(inp.params)
        f = ctx.flat_loss(c, inp.batch)
        theta, vecs, rel, n = self._solve(ctx.hvp(f, x), state)
        u = vecs[:, 0]
        g = jax.grad(f)(x)

        def s_of(y):
            return u @ ctx.hvp(f, y)(u)

        grad_s = jax.grad(s_of)(x)
        alpha = -(g @ grad_s)
        beta = grad_s @ grad_s
        ok = (alpha > 0) & (beta > 0)
        amp = jnp.where(ok, jnp.sqrt(2.0 * alpha / jnp.where(ok, beta, 1.0)), jnp.nan)
        out = {
            "self_stabilization": amp,
            "self_stabilization/alpha": alpha,
            "self_stabilization/beta": beta,
            "self_stabilization/sharpness": theta[0],
            "self_stabilization/residual": jnp.max(rel),
        }
        return out, vecs, n + 2


__all__ = [
    "FTLE",
    "BatchSharpness",
    "Context",
    "CriticalSharpness",
    "DirectionalSharpness",
    "GradientNorm",
    "PreconditionedSharpness",
    "Probe",
    "ProbeInputs",
    "SelfStabilization",
    "Sharpness",
    "Threshold",
]
