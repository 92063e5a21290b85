"""Instability control: optax transformations that *set* the stability of training.

Three controllers, each an optax transformation usable in any optax chain and as the optimizer
of a :class:`chaosjax.TrainingMap` (pass a factory, e.g.
``functools.partial(sharpness_margin, every=10)``, with ``hparams={"margin": 1.0}``; the float
arguments stay vmappable hyper-parameters):

* :func:`sharpness_margin` — every ``every`` steps it estimates the top algebraic eigenvalue of
  the Hessian (preconditioned ``P^{-1/2} H P^{-1/2}`` for Adam and RMSProp, P read from the
  optimizer state) with a warm-started block Krylov solve, and moves η towards
  ``margin × c / λmax`` where c is the optimizer's stability constant (GD 2, heavy ball 2 + 2β,
  Nesterov (2 + 2β)/(1 + 2β), Adam (2 + 2β1)/(1 − β1), RMSProp 2). Margin 0.5 is comfortably
  stable, 1.0 the edge of stability, 1.5 deliberately unstable. Changes are smoothed
  geometrically and bounded per update.
* :func:`ftle_target` — propagates ``k`` tangent vectors of the uncontrolled step (parameters
  and optimizer moments, at the current η) with Jacobian-vector products, keeps a running
  finite-time exponent (per step) and moves η so that it sits at ``target`` (e.g. just above
  0: the onset of chaos).
* :func:`gradient_noise` — additive Gaussian gradient noise whose scale follows a constant, a
  schedule ``count -> σ`` or a noise-to-signal target (``relative=True``); its key is
  ``fold_in(PRNGKey(seed), count)``, so the map stays deterministic and replicas share it.

The controllers need the loss of the step's batch: ``update(..., value_fn=loss_of_params)``
(optax's extra-argument convention, as for its line searches). :class:`TrainingMap` passes
``value``, ``grad`` and ``value_fn`` to every optimizer. Their own state — η, the last estimate,
the eigenvector warm start, the tangents — is float optimizer state, so it is part of the
training map's flat state and of its tangent space; the step counter is an integer counter
that the training map derives from t.

Instability episodes (loss spikes, sharpness excursions, divergence bursts in recorded series,
labelled by :data:`~chaosjax.episodes.EPISODE_RULE`) live in :mod:`chaosjax.episodes`; their
names stay importable from here.

Length: about 500 lines, three controllers with their states.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from chaosjax._layout import layout_of
from chaosjax.curvature import (
    PRECISION,
    adaptive_preconditioner,
    block_krylov_eigs,
    hessian_operator,
    preconditioned_operator,
    preconditioner_diagonal,
)
from chaosjax.episodes import EPISODE_RULE, Episode, count_labels, instability_episodes
from chaosjax.optimizers import CONTROLLED, OPTIMIZERS, with_defaults
from chaosjax.tangents import qr_renormalize, random_basis, tangent_step

#: base optimizers a controller can drive (the direction; the controller sets η): those of the
#: one registry (:data:`chaosjax.optimizers.OPTIMIZERS`) with a direction.
CONTROLLED_OPTIMIZERS = CONTROLLED


def _concrete(x) -> float | None:
    """The float value of a concrete scalar; None for a tracer (vmapped hyper-parameters)."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _check(name: str, value, *, lo=None, hi=None, lo_open=False, integer=False):
    """Validate a concrete scalar (tracers pass: they are vmapped hyper-parameters)."""
    v = _concrete(value)
    if v is None:
        return
    if integer and (not math.isfinite(v) or v != int(v)):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    inf_ok = hi == math.inf and v == math.inf
    bad = (
        math.isnan(v)
        or (math.isinf(v) and not inf_ok)
        or (lo is not None and (v <= lo if lo_open else v < lo))
        or (hi is not None and v > hi)
    )
    if bad:
        lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
        hi_s = "" if hi is None or hi == math.inf else f"<= {hi}"
        allowed = " and ".join(x for x in (lo_s, hi_s) if x) or "finite"
        raise ValueError(f"{name}: must be {allowed}, got {value!r}")


def _base(optimizer: str, hparams: dict):
    """(direction transformation, stability constant c, preconditioned?, hyper-parameters)."""
    if optimizer not in CONTROLLED_OPTIMIZERS:
        raise ValueError(
            f"optimizer: unknown {optimizer!r}; allowed: {', '.join(CONTROLLED_OPTIMIZERS)}"
        )
    s = OPTIMIZERS[optimizer]
    hp = with_defaults(optimizer, hparams)
    hp.pop("learning_rate", None)
    for name in ("momentum", "b1", "b2", "decay"):
        if name in hp:
            _check(name, hp[name], lo=0.0, hi=1.0)
            if _concrete(hp[name]) == 1.0:
                raise ValueError(f"{name}: must be < 1, got {hp[name]!r}")
    return s.direction(hp), s.constant(hp), s.operator == "preconditioned", hp


def stability_constant(optimizer: str, **hparams):
    """c such that the optimizer is stable on a quadratic while η·λmax < c (λmax of the
    preconditioned Hessian for Adam/RMSProp): GD 2, heavy ball 2 + 2β, Nesterov
    (2 + 2β)/(1 + 2β), Adam (2 + 2β1)/(1 − β1), RMSProp 2."""
    return _base(optimizer, hparams)[1]


def _need_value_fn(name, params, value_fn):
    if params is None or value_fn is None:
        raise TypeError(
            f"{name}: update needs params and value_fn=loss(params) (the loss of the step's batch); "
            "call update(grads, state, params, value_fn=...) or use it inside a TrainingMap"
        )


def _apply_lr(direction, eta):
    return jax.tree_util.tree_map(lambda d: (-eta * d).astype(d.dtype), direction)


def _ratio_step(eta, log_ratio, max_change, lo, hi):
    """η · exp(clip(log_ratio, ±log max_change)), clipped to [lo, hi]."""
    bound = jnp.log(jnp.asarray(max_change, eta.dtype))
    new = eta * jnp.exp(jnp.clip(log_ratio, -bound, bound))
    return jnp.clip(new, jnp.asarray(lo, eta.dtype), jnp.asarray(hi, eta.dtype))


# ---------------------------------------------------------------------------------------------
# sharpness-margin controller


class SharpnessControlState(NamedTuple):
    """State of :func:`sharpness_margin`.

    Attributes:
        count: steps taken (an integer counter; a training map derives it from t).
        learning_rate: η used by the last step.
        sharpness: the last estimate of λmax of the (preconditioned) Hessian; 0 before the
            first step (the first step measures).
        vector: (n_params,) unit eigenvector estimate, the warm start of the next solve.
        inner: the base optimizer's state (momentum, Adam moments).
    """

    count: jax.Array
    learning_rate: jax.Array
    sharpness: jax.Array
    vector: jax.Array
    inner: Any


def sharpness_margin(
    margin=1.0,
    learning_rate=0.01,
    *,
    optimizer: str = "sgd",
    every: int = 5,
    n_blocks: int = 4,
    cold_blocks: int = 24,
    smoothing=0.5,
    max_change=2.0,
    min_learning_rate=0.0,
    max_learning_rate=math.inf,
    seed: int = 0,
    tol: float = 1e-3,
    **hparams,
) -> optax.GradientTransformationExtraArgs:
    """Hold η·λmax at ``margin`` × the optimizer's stability constant.

    Every ``every`` steps (first at count 0) the top algebraic eigenpair of the step's loss
    Hessian — preconditioned by P^{-1/2}·P^{-1/2} for Adam/RMSProp — is re-estimated by a block
    Krylov / Rayleigh–Ritz solve warm-started from the previous eigenvector (``n_blocks``
    blocks; the first solve starts from a seeded
    random vector with ``cold_blocks``; every solve adds a fresh random vector of that step to
    the block, so an eigenvalue that overtakes the tracked one is found). η then moves geometrically towards the target
    η* = margin·c/λmax: η ← clip(η·(η*/η)^smoothing, η/max_change, η·max_change), clipped to
    [min_learning_rate, max_learning_rate]. A non-positive or non-finite estimate, or one whose
    relative residual ‖Hv − λv‖/λ exceeds ``tol`` (not converged), leaves η unchanged (the
    eigenvector is still kept as the next warm start). The updates are −η·direction, where the direction is the base optimizer's
    (identity for GD, the momentum trace, Adam's m̂/P).

    With ``smoothing=1`` the controller has no memory once the target is inside the change
    bound: the Jacobian of η with respect to its own previous value is then 0. With
    smoothing s < 1 the controlled map gains an exponent log(1 − s)/every per step from η.
    The warm start enters each solve as a constant (``stop_gradient``), so the Jacobian of
    the controlled map treats the estimate as the eigenpair of H(θ) (λ' = vᵀH'v); the
    solver's own dependence on its start vector, of the order of its residual, is left out.

    Args:
        margin: target η·λmax / c (vmappable).
        learning_rate: initial η (vmappable).
        optimizer: base optimizer, one of :data:`CONTROLLED_OPTIMIZERS`.
        every: steps between estimates (>= 1).
        n_blocks, cold_blocks: Krylov blocks of the warm and of the first solve (a block is
            2 vectors: 2·(n_blocks + 1) Hessian-vector products per estimate).
        smoothing: exponent s in (0, 1] of the geometric move towards the target.
        max_change: largest factor by which η may change per estimate (>= 1).
        min_learning_rate, max_learning_rate: bounds on η.
        seed: seed of the initial eigenvector.
        tol: relative eigen-residual an estimate must reach to move η (default 1e-3).
        **hparams: the base optimizer's hyper-parameters (``momentum``; ``b1``, ``b2``,
            ``eps``, ``eps_root``; ``decay``, ``eps``).

    Returns:
        an ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params`` and
        ``value_fn`` (the loss of the step's batch as a function of the parameter pytree).
    """
    base, c, pre, hp = _base(optimizer, hparams)
    _check("margin", margin, lo=0.0, lo_open=True)
    _check("learning_rate", learning_rate, lo=0.0, lo_open=True)
    _check("every", every, lo=1, integer=True)
    _check("n_blocks", n_blocks, lo=1, integer=True)
    _check("cold_blocks", cold_blocks, lo=1, integer=True)
    _check("smoothing", smoothing, lo=0.0, hi=1.0, lo_open=True)
    _check("max_change", max_change, lo=1.0)
    _check("min_learning_rate", min_learning_rate, lo=0.0)
    _check("max_learning_rate", max_learning_rate, lo=0.0, lo_open=True, hi=math.inf)
    _check("tol", tol, lo=0.0, lo_open=True, hi=1.0)
    every, n_blocks, cold_blocks = int(every), int(n_blocks), int(cold_blocks)

    def init_fn(params):
        flat = layout_of(params, what="params").ravel(params)
        v = jax.random.normal(jax.random.PRNGKey(seed), flat.shape, flat.dtype)
        return SharpnessControlState(
            count=jnp.zeros((), jnp.int32),
            learning_rate=jnp.asarray(learning_rate, flat.dtype),
            sharpness=jnp.zeros((), flat.dtype),
            vector=v / jnp.linalg.norm(v),
            inner=base.init(params),
        )

    def update_fn(updates, state, params=None, *, value_fn=None, **extra):
        del extra
        _need_value_fn("sharpness_margin", params, value_fn)
        direction, inner = base.update(updates, state.inner, params)
        eta0, lam0, v0 = state.learning_rate, state.sharpness, state.vector
        dt = eta0.dtype
        # The warm start enters the solve as a constant: the estimate is the eigenpair of
        # H(θ) to the solver's residual, and its derivative is that of the eigenpair (λ' =
        # vᵀ H' v). Differentiating through the start vector instead gives O(1/‖remainder‖)
        # garbage once it has converged (the Krylov remainder vanishes).
        w0 = jax.lax.stop_gradient(v0)

        def estimate(blocks):
            def run(_):
                op, flat = hessian_operator(value_fn, params)
                if pre:  # P of the base state after this step's update (Adam: count >= 1)
                    op = preconditioned_operator(
                        op, preconditioner_diagonal(*adaptive_preconditioner(inner), hp)
                    )

                # The block is the warm start and a fresh random vector of this step: a warm
                # start alone converges to *an* eigenvector and purges the others, so when a
                # lower eigenvalue overtakes the tracked one it would be missed. A Krylov space
                # larger than the dimension would be degenerate, hence the caps.
                n = flat.shape[0]
                if n >= 4:
                    fresh = jax.random.normal(
                        jax.random.fold_in(jax.random.PRNGKey(seed + 1), state.count), (n,), dt
                    )
                    start, nb = jnp.stack([w0, fresh], axis=1), min(blocks, n // 2 - 1)
                else:
                    start, nb = w0[:, None], min(blocks, n - 1)
                r = block_krylov_eigs(op, start, n_blocks=nb)
                lam, vec = r.eigenvalues[0].astype(dt), r.eigenvectors[0].astype(dt)
                vec = vec * jnp.where(vec @ w0 < 0, -1.0, 1.0).astype(dt)
                ok = jnp.isfinite(lam) & (lam > 0)
                conv = r.residuals[0].astype(dt) <= tol * jnp.abs(lam)
                safe = jnp.where(ok, lam, 1.0)
                target = margin * c / safe
                new = _ratio_step(
                    eta0,
                    smoothing * jnp.log(target / eta0),
                    max_change,
                    min_learning_rate,
                    max_learning_rate,
                )
                good = ok & jnp.all(jnp.isfinite(vec))
                return jnp.where(ok & conv, new, eta0), lam, jnp.where(good, vec, v0)

            return run

        measure = state.count % every == 0
        eta, lam, vec = jax.lax.cond(
            measure,
            lambda _: jax.lax.cond(
                state.count == 0, estimate(cold_blocks), estimate(n_blocks), None
            ),
            lambda _: (eta0, lam0, v0),
            None,
        )
        new_state = SharpnessControlState(
            optax.safe_increment(state.count), eta, lam.astype(dt), vec, inner
        )
        return _apply_lr(direction, eta), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# FTLE controller


class FTLEControlState(NamedTuple):
    """State of :func:`ftle_target`.

    Attributes:
        count: steps taken (integer counter).
        learning_rate: η used by the last step.
        ftle: running finite-time top exponent (per step; exponential average over ``window``).
        tangents: (k, n_params + n_moments) orthonormal tangent vectors of the step.
        inner: the base optimizer's state.
    """

    count: jax.Array
    learning_rate: jax.Array
    ftle: jax.Array
    tangents: jax.Array
    inner: Any


def ftle_target(
    target=0.0,
    learning_rate=0.01,
    *,
    optimizer: str = "sgd",
    k: int = 1,
    window: int = 50,
    every: int | None = None,
    warmup: int | None = None,
    gain=20.0,
    max_change=1.25,
    min_learning_rate=0.0,
    max_learning_rate=math.inf,
    seed: int = 0,
    **hparams,
) -> optax.GradientTransformationExtraArgs:
    """Hold the running finite-time Lyapunov exponent of training at ``target`` (per step).

    Each step propagates ``k`` tangent vectors through the linearisation of the *uncontrolled*
    step at the current η — parameters and the base optimizer's float moments, on the step's
    batch, by Jacobian-vector products (k Hessian-vector products per step) — and
    re-orthonormalises them. The per-step log growth of the first vector updates the running
    exponent ``ftle ← ftle + (log r11 − ftle)/window``. After ``warmup`` steps (default
    ``window``), every ``every`` steps (default ``window``: one move per fresh average — faster
    moves chase the average's lag and oscillate),
    η ← η·exp(clip(gain·(target − ftle), ±log max_change)), clipped to
    [min_learning_rate, max_learning_rate].

    Stable training has λ1 ≈ 0⁻ (flat directions), so a target "just above zero" such as 0.01
    per step is the useful onset-of-chaos setting; the default gain moves log η by 0.2 for an
    error of 0.01.

    For GD on a quadratic the exponent is max_i log|1 − η a_i|, so a target τ > 0 drives
    η → (1 + e^τ)/a_max.

    Args:
        target: the FTLE to hold, per step (vmappable). 0 is the onset of chaos.
        learning_rate: initial η (vmappable).
        optimizer: base optimizer (:data:`CONTROLLED_OPTIMIZERS`).
        k: tangent vectors (the control uses the top one; more vectors cost more HVPs).
        window: averaging window of the running exponent (steps).
        every: steps between η updates (default ``window``).
        warmup: steps before the first η update (the tangents align first).
        gain: log-η change per unit exponent error (vmappable).
        max_change: largest factor η may change by per update.
        min_learning_rate, max_learning_rate: bounds on η.
        seed: seed of the initial tangents.
        **hparams: base optimizer hyper-parameters.
    """
    base, _, _, hp = _base(optimizer, hparams)
    del hp
    _check("learning_rate", learning_rate, lo=0.0, lo_open=True)
    _check("target", target)
    _check("k", k, lo=1, integer=True)
    _check("window", window, lo=1, integer=True)
    if every is not None:
        _check("every", every, lo=1, integer=True)
    if warmup is not None:
        _check("warmup", warmup, lo=0, integer=True)
    _check("gain", gain, lo=0.0, lo_open=True)
    _check("max_change", max_change, lo=1.0)
    _check("min_learning_rate", min_learning_rate, lo=0.0)
    _check("max_learning_rate", max_learning_rate, lo=0.0, lo_open=True, hi=math.inf)
    k, window = int(k), int(window)
    every = window if every is None else int(every)
    warmup = window if warmup is None else int(warmup)

    def init_fn(params):
        p_lay = layout_of(params, what="params")
        inner = base.init(params)
        n = p_lay.dim + layout_of(inner, what="optimizer state").dim
        if k > n:
            raise ValueError(f"k: must be <= the tangent dimension {n}, got {k}")
        dt = jnp.dtype(p_lay.dtype)
        return FTLEControlState(
            count=jnp.zeros((), jnp.int32),
            learning_rate=jnp.asarray(learning_rate, dt),
            ftle=jnp.zeros((), dt),
            tangents=random_basis(jax.random.PRNGKey(seed), n, k, dt).T,
            inner=inner,
        )

    def update_fn(updates, state, params=None, *, value_fn=None, **extra):
        del extra
        _need_value_fn("ftle_target", params, value_fn)
        eta0 = state.learning_rate
        dt = eta0.dtype
        direction, inner = base.update(updates, state.inner, params)

        p_lay = layout_of(params, what="params")
        i_lay = layout_of(state.inner, what="optimizer state")
        n_p = p_lay.dim
        s_flat, ints = i_lay.split(state.inner)

        def uncontrolled(z, t):  # the step at fixed η as a map on (params, float moments)
            del t
            p = p_lay.unravel(z[:n_p])
            g = jax.grad(value_fn)(p)
            d, new_inner = base.update(g, i_lay.merge(z[n_p:], ints), p)
            new_p = p_lay.ravel(p) - eta0 * p_lay.ravel(d)
            return jnp.concatenate([new_p, i_lay.split(new_inner)[0]]).astype(z.dtype)

        z = jnp.concatenate([p_lay.ravel(params), s_flat]).astype(dt)
        with jax.default_matmul_precision(PRECISION):
            _, w = tangent_step(uncontrolled, z, state.tangents.T, 0)
        q, r = qr_renormalize(w.astype(dt))
        growth = jnp.log(jnp.maximum(r[0, 0], jnp.finfo(dt).tiny))
        ok = jnp.isfinite(growth) & jnp.all(jnp.isfinite(q))
        ftle = jnp.where(ok, state.ftle + (growth - state.ftle) / window, state.ftle)
        tangents = jnp.where(ok, q.T, state.tangents)
        act = (state.count >= warmup) & ((state.count - warmup) % every == 0) & ok
        new = _ratio_step(
            eta0, gain * (target - ftle), max_change, min_learning_rate, max_learning_rate
        )
        eta = jnp.where(act, new, eta0)
        new_state = FTLEControlState(optax.safe_increment(state.count), eta, ftle, tangents, inner)
        return _apply_lr(direction, eta), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# calibrated gradient noise


class NoiseState(NamedTuple):
    """State of :func:`gradient_noise`: the step count (the noise key is derived from it)."""

    count: jax.Array


def gradient_noise(scale, *, seed: int = 0, relative: bool = False) -> optax.GradientTransformation:
    """Add N(0, σ_t² I) to the gradients, with σ_t from a constant, a schedule or a target.

    Put it before the optimizer: ``optax.chain(gradient_noise(0.1), optax.sgd(η))``.

    Args:
        scale: σ (vmappable), or a schedule ``count -> σ``.
        seed: the noise of step ``count`` is drawn with ``fold_in(PRNGKey(seed), count)``:
            the map stays deterministic and every replica at step t sees the same noise.
        relative: calibrate to a noise-to-signal target: σ_t = scale·‖g_t‖/√n, so that the
            noise norm is about ``scale`` times the gradient norm.
    """
    if not callable(scale):
        _check("scale", scale, lo=0.0)
    if not isinstance(relative, bool):
        raise TypeError(f"relative: expected a bool, got {type(relative).__name__}")

    def init_fn(params):
        del params
        return NoiseState(jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        sigma = scale(state.count) if callable(scale) else scale
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        if relative:
            flat = layout_of(leaves, what="updates").ravel(leaves)
            sigma = sigma * jnp.linalg.norm(flat) / jnp.sqrt(max(flat.size, 1))
        key = jax.random.fold_in(jax.random.PRNGKey(seed), state.count)
        keys = jax.random.split(key, max(len(leaves), 1))
        noisy = [
            g + (sigma * jax.random.normal(kk, jnp.shape(g), jnp.asarray(g).dtype)).astype(g.dtype)
            for g, kk in zip(leaves, keys)
        ]
        return jax.tree_util.tree_unflatten(treedef, noisy), NoiseState(
            optax.safe_increment(state.count)
        )

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# reading the controller state


def controller_state(opt_state) -> SharpnessControlState | FTLEControlState | None:
    """The first controller state found in an optax state tree (None if there is none)."""
    is_ctl = lambda n: isinstance(n, SharpnessControlState | FTLEControlState)  # noqa: E731
    for leaf in jax.tree_util.tree_leaves(opt_state, is_leaf=is_ctl):
        if is_ctl(leaf):
            return leaf
    return None


def controller_observables(tmap) -> dict[str, Callable]:
    """Custom observables of :func:`chaosjax.run_replicas` for a controlled training map:
    ``control_lr`` (η in use) and ``control_sharpness`` or ``control_ftle`` (its estimate)."""
    ctl = controller_state(tmap.opt_state(tmap.init(), 0))
    if ctl is None:
        raise ValueError("tmap: its optimizer holds no chaosjax controller state")

    def read(field):
        def fn(state):
            return getattr(controller_state(tmap.opt_state(state, 0)), field)

        return fn

    out = {"control_lr": read("learning_rate")}
    if isinstance(ctl, SharpnessControlState):
        out["control_sharpness"] = read("sharpness")
    else:
        out["control_ftle"] = read("ftle")
    return out


__all__ = [
    "CONTROLLED_OPTIMIZERS",
    "EPISODE_RULE",
    "Episode",
    "FTLEControlState",
    "NoiseState",
    "SharpnessControlState",
    "controller_observables",
    "controller_state",
    "count_labels",
    "ftle_target",
    "gradient_noise",
    "instability_episodes",
    "sharpness_margin",
    "stability_constant",
]
