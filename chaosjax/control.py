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

Instability episodes (:func:`instability_episodes`) find loss spikes, sharpness excursions
above the stability threshold and bursts of replica divergence in recorded series, and label
each *helpful*, *harmful* or *neutral* by the rule in :data:`EPISODE_RULE`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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
    num_blocks: int = 4,
    cold_blocks: int = 24,
    smoothing=0.5,
    max_change=2.0,
    min_learning_rate=0.0,
    max_learning_rate=math.inf,
    seed: int = 0,
    **hparams,
) -> optax.GradientTransformationExtraArgs:
    """Hold η·λmax at ``margin`` × the optimizer's stability constant.

    Every ``every`` steps (first at count 0) the top algebraic eigenpair of the step's loss
    Hessian — preconditioned by P^{-1/2}·P^{-1/2} for Adam/RMSProp — is re-estimated by a block
    Krylov / Rayleigh–Ritz solve warm-started from the previous eigenvector (``num_blocks``
    blocks; the first solve starts from a seeded
    random vector with ``cold_blocks``; every solve adds a fresh random vector of that step to
    the block, so an eigenvalue that overtakes the tracked one is found). η then moves geometrically towards the target
    η* = margin·c/λmax: η ← clip(η·(η*/η)^smoothing, η/max_change, η·max_change), clipped to
    [min_learning_rate, max_learning_rate]. A non-positive or non-finite estimate leaves η
    unchanged. The updates are −η·direction, where the direction is the base optimizer's
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
        num_blocks, cold_blocks: Krylov blocks of the warm and of the first solve (a block is
            2 vectors: 2·(num_blocks + 1) Hessian-vector products per estimate).
        smoothing: exponent s in (0, 1] of the geometric move towards the target.
        max_change: largest factor by which η may change per estimate (>= 1).
        min_learning_rate, max_learning_rate: bounds on η.
        seed: seed of the initial eigenvector.
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
    _check("num_blocks", num_blocks, lo=1, integer=True)
    _check("cold_blocks", cold_blocks, lo=1, integer=True)
    _check("smoothing", smoothing, lo=0.0, hi=1.0, lo_open=True)
    _check("max_change", max_change, lo=1.0)
    _check("min_learning_rate", min_learning_rate, lo=0.0)
    _check("max_learning_rate", max_learning_rate, lo=0.0, lo_open=True, hi=math.inf)
    every, num_blocks, cold_blocks = int(every), int(num_blocks), int(cold_blocks)

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
                r = block_krylov_eigs(op, start, num_blocks=nb)
                lam, vec = r.eigenvalues[0].astype(dt), r.eigenvectors[0].astype(dt)
                vec = vec * jnp.where(vec @ w0 < 0, -1.0, 1.0).astype(dt)
                ok = jnp.isfinite(lam) & (lam > 0)
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
                return jnp.where(ok, new, eta0), lam, jnp.where(good, vec, v0)

            return run

        measure = state.count % every == 0
        eta, lam, vec = jax.lax.cond(
            measure,
            lambda _: jax.lax.cond(
                state.count == 0, estimate(cold_blocks), estimate(num_blocks), None
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


# ---------------------------------------------------------------------------------------------
# instability episodes

#: the documented detection and labelling rule (summaries repeat it)
EPISODE_RULE = (
    "Episodes are found on recorded series. A *loss spike* starts when the training loss "
    "exceeds spike_factor × its running minimum (the baseline) and ends when the loss is back "
    "within recover_factor × that baseline. A *sharpness excursion* starts when sharpness / "
    "threshold exceeds excursion and ends when it is back at or below 1. A *divergence burst* "
    "starts when the replica distance grows by burst_decades decades within burst_window "
    "records and ends when it stops growing. Overlapping intervals of any kind are one "
    "episode. Labels: *harmful* if the loss becomes non-finite or exceeds loss_bound between "
    "the start and the end of the episode (divergence; a divergence after an episode has "
    "recovered is an episode of its own), or if the loss has not returned within recover_factor × the "
    "pre-episode baseline within `recovery` steps of the start (no recovery); *unresolved* if "
    "it has not recovered but the run ended before that window closed; otherwise "
    "*helpful* if, settle records after the end, the sharpness is below (1 − tolerance) × the "
    "matched stable run's sharpness at the same step (without a matched run: the sharpness "
    "just before the episode), or the held-out loss is below (1 − tolerance) × the matched "
    "run's held-out loss at the same step (this test needs a matched run: a falling loss is "
    "always below its own past); otherwise *neutral* (recovered, neither flatter nor better)."
)


class Episode(NamedTuple):
    """One instability episode (steps are training steps; ``end`` = -1: did not end).

    ``numbers`` holds what the label was decided on: ``peak_ratio`` (peak loss / baseline),
    ``recovered_step`` (-1: never), ``sharpness_before``, ``sharpness_after``,
    ``reference_sharpness``, ``test_loss_before``, ``test_loss_after``,
    ``reference_test_loss`` (NaN when not available).
    """

    start: int
    peak: int
    end: int
    kinds: tuple[str, ...]
    label: str
    reason: str
    numbers: dict


def _series(name, x, n=None):
    if x is None:
        return None
    a = np.asarray(x, np.float64)
    if a.ndim == 0 and n is not None:
        return np.full(n, float(a))
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D series over records, got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name}: expected {n} records like loss, got {a.shape[0]}")
    return a


def _prior_min(loss: np.ndarray) -> np.ndarray:
    """(n,) minimum of the finite values strictly before each record (inf: none yet)."""
    acc = np.minimum.accumulate(np.where(np.isfinite(loss), loss, np.inf))
    return np.concatenate([[np.inf], acc[:-1]])


def _intervals_loss(loss, prior, spike_factor, recover_factor):
    out = []
    n = loss.shape[0]
    i = 1
    while i < n:
        base = prior[i]
        if not np.isfinite(base):
            i += 1
            continue
        if not (loss[i] > spike_factor * base) and np.isfinite(loss[i]):
            i += 1
            continue
        start, j = i, i
        while j < n and not (np.isfinite(loss[j]) and loss[j] <= recover_factor * base):
            j += 1
        end = j if j < n else -1
        seg = loss[start : (j if j < n else n)]
        peak = (
            start + int(np.nanargmax(np.where(np.isfinite(seg), seg, np.inf)))
            if seg.size
            else start
        )
        out.append((start, peak, end, "loss_spike"))
        i = j + 1 if j < n else n
    return out


def _intervals_ratio(ratio, excursion):
    out = []
    n = ratio.shape[0]
    i = 0
    while i < n:
        if not (np.isfinite(ratio[i]) and ratio[i] > excursion):
            i += 1
            continue
        start, j = i, i
        while j < n and not (np.isfinite(ratio[j]) and ratio[j] <= 1.0):
            j += 1
        seg = ratio[start:j]
        peak = start + int(np.nanargmax(seg)) if np.isfinite(seg).any() else start
        out.append((start, peak, j if j < n else -1, "sharpness"))
        i = j + 1
    return out


def _intervals_burst(distance, decades, window):
    out = []
    with np.errstate(divide="ignore", invalid="ignore"):
        logd = np.log10(distance)
    n = logd.shape[0]
    i, after = 1, 0  # growth is measured from records after the previous burst
    while i < n:
        lo = logd[max(after, i - window) : i]
        lo = lo[np.isfinite(lo)]
        if lo.size == 0 or not np.isfinite(logd[i]) or logd[i] - lo.min() < decades:
            i += 1
            continue
        start, j = i, i
        while j + 1 < n and np.isfinite(logd[j + 1]) and logd[j + 1] > logd[j]:
            j += 1
        out.append((start, j, j if j + 1 < n else -1, "divergence_burst"))
        i = after = j + 1
    return out


def _merge(intervals, n):
    """Merge overlapping (start, peak, end, kind) intervals (end -1 = open to the end)."""
    items = sorted(intervals)
    merged = []
    for s, p, e, kind in items:
        e_eff = n - 1 if e < 0 else e
        if merged and s <= merged[-1]["end_eff"]:
            m = merged[-1]
            m["kinds"].add(kind)
            m["end_eff"] = max(m["end_eff"], e_eff)
            m["open"] = m["open"] or e < 0
            if kind == "loss_spike":
                m["peak"] = p
        else:
            merged.append({"start": s, "peak": p, "end_eff": e_eff, "open": e < 0, "kinds": {kind}})
    return merged


def instability_episodes(
    loss,
    *,
    steps=None,
    sharpness=None,
    threshold=None,
    distance=None,
    test_loss=None,
    reference_sharpness=None,
    reference_test_loss=None,
    spike_factor: float = 2.0,
    recover_factor: float = 1.1,
    excursion: float = 1.1,
    burst_decades: float = 2.0,
    burst_window: int = 10,
    recovery: int | None = None,
    settle: int = 5,
    tolerance: float = 0.05,
    loss_bound: float = 1e8,
) -> list[Episode]:
    """Find and label instability episodes in one run's recorded series (rule:
    :data:`EPISODE_RULE`).

    Args:
        loss: (n,) training loss at the records.
        steps: (n,) training steps of the records (default 0 … n−1).
        sharpness: (n,) λmax of the (preconditioned) Hessian, with ``threshold`` (scalar or
            (n,), e.g. 2/η) for excursions and flatness.
        distance: (n,) distance of a perturbed replica to this run, for divergence bursts.
        test_loss: (n,) held-out loss.
        reference_sharpness, reference_test_loss: (n,) the same series of a matched stable run
            (same initialisation, a stable η), recorded at the same steps. Without them an
            episode is *helpful* only if it ends flatter than it started.
        spike_factor, recover_factor, excursion, burst_decades, burst_window, settle,
            tolerance, loss_bound: the thresholds of the rule.
        recovery: steps within which the loss must recover (default: a quarter of the run).

    Returns:
        the episodes in time order.
    """
    loss = _series("loss", loss)
    n = loss.shape[0]
    if n < 2:
        raise ValueError(f"loss: needs at least 2 records, got {n}")
    steps = np.arange(n) if steps is None else np.asarray(steps)
    if steps.shape != (n,):
        raise ValueError(f"steps: expected shape ({n},), got {steps.shape}")
    sharp = _series("sharpness", sharpness, n)
    thr = _series("threshold", threshold, n)
    dist = _series("distance", distance, n)
    test = _series("test_loss", test_loss, n)
    ref_s = _series("reference_sharpness", reference_sharpness, n)
    ref_t = _series("reference_test_loss", reference_test_loss, n)
    for name, v in (("spike_factor", spike_factor), ("recover_factor", recover_factor)):
        if not v >= 1.0:
            raise ValueError(f"{name}: must be >= 1, got {v!r}")
    if recover_factor > spike_factor:
        raise ValueError(
            f"recover_factor: must be <= spike_factor={spike_factor}, got {recover_factor}"
        )
    if not excursion >= 1.0:
        raise ValueError(f"excursion: must be >= 1, got {excursion!r}")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance: must be in [0, 1), got {tolerance!r}")
    if recovery is None:
        recovery = max(1, int(steps[-1] - steps[0]) // 4)

    bad = ~np.isfinite(loss) | (loss > loss_bound)
    first_bad = int(np.argmax(bad)) if bad.any() else -1
    prior = _prior_min(loss)
    intervals = _intervals_loss(loss, prior, spike_factor, recover_factor)
    if sharp is not None and thr is not None:
        intervals += _intervals_ratio(sharp / thr, excursion)
    if dist is not None:
        intervals += _intervals_burst(dist, burst_decades, int(burst_window))
    if first_bad >= 0 and not any(
        s <= first_bad <= (n - 1 if e < 0 else e) for s, _, e, _ in intervals
    ):
        intervals.append((first_bad, first_bad, -1, "divergence"))

    nan = float("nan")
    episodes = []
    for m in _merge(intervals, n):
        s, p = m["start"], m["peak"]
        end = -1 if m["open"] else m["end_eff"]
        before = max(s - 1, 0)
        baseline = float(prior[max(s, 1)]) if np.isfinite(prior[max(s, 1)]) else nan
        peak_loss = loss[s : m["end_eff"] + 1]
        peak_loss = peak_loss[np.isfinite(peak_loss)]
        rec = np.flatnonzero(
            (np.arange(n) >= s) & np.isfinite(loss) & (loss <= recover_factor * baseline)
        )
        recovered = int(steps[rec[0]]) if rec.size else -1
        after = min((m["end_eff"] if end >= 0 else n - 1) + settle, n - 1)
        numbers = {
            "baseline_loss": baseline,
            "peak_ratio": float(peak_loss.max() / baseline)
            if peak_loss.size and baseline > 0
            else nan,
            "recovered_step": recovered,
            "sharpness_before": float(sharp[before]) if sharp is not None else nan,
            "sharpness_after": float(sharp[after]) if sharp is not None else nan,
            "reference_sharpness": float(ref_s[after]) if ref_s is not None else nan,
            "test_loss_before": float(test[before]) if test is not None else nan,
            "test_loss_after": float(test[after]) if test is not None else nan,
            "reference_test_loss": float(ref_t[after]) if ref_t is not None else nan,
        }
        if s <= first_bad <= m["end_eff"]:  # a divergence after the recovery is its own episode
            label, reason = "harmful", f"diverged at step {int(steps[first_bad])}"
        elif recovered < 0 and int(steps[-1]) - int(steps[s]) < recovery:
            label = "unresolved"
            reason = (
                f"the run ended {int(steps[-1]) - int(steps[s])} steps after the start, before "
                f"the recovery window of {recovery} steps closed"
            )
        elif recovered < 0 or recovered - int(steps[s]) > recovery:
            label = "harmful"
            reason = (
                f"no recovery within {recovery} steps: the loss stayed above "
                f"{recover_factor:g} × baseline {baseline:.3g}"
                + ("" if recovered < 0 else f" until step {recovered}")
            )
        else:
            ref_sharp = numbers["reference_sharpness"]
            if not np.isfinite(ref_sharp):
                ref_sharp = numbers["sharpness_before"]
            ref_test = numbers["reference_test_loss"]  # only against a matched run
            flatter = (
                np.isfinite(ref_sharp) and numbers["sharpness_after"] < (1 - tolerance) * ref_sharp
            )
            better = (
                np.isfinite(ref_test) and numbers["test_loss_after"] < (1 - tolerance) * ref_test
            )
            if flatter or better:
                label = "helpful"
                why = []
                if flatter:
                    why.append(f"sharpness {numbers['sharpness_after']:.3g} < {ref_sharp:.3g}")
                if better:
                    why.append(f"held-out loss {numbers['test_loss_after']:.3g} < {ref_test:.3g}")
                reason = f"recovered at step {recovered}; " + ", ".join(why)
            else:
                label = "neutral"
                reason = (
                    f"recovered at step {recovered}; neither flatter nor a better held-out loss"
                )
        episodes.append(
            Episode(
                start=int(steps[s]),
                peak=int(steps[p]),
                end=int(steps[end]) if end >= 0 else -1,
                kinds=tuple(sorted(m["kinds"])),
                label=label,
                reason=reason,
                numbers=numbers,
            )
        )
    return episodes


def count_labels(episodes: Sequence[Episode]) -> dict[str, int]:
    """{"helpful": …, "harmful": …, "neutral": …, "unresolved": …} counts."""
    out = {"helpful": 0, "harmful": 0, "neutral": 0, "unresolved": 0}
    for e in episodes:
        out[e.label] += 1
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
