"""The tangents :meth:`chaosjax.Monitor.wrap` advances along the user's own trajectory.

The map whose exponents are measured is the optimizer step built from ``loss_fn`` and the optax
transformation, on the batch the loop used at step t:

    F(θ, s) = (optax.apply_updates(θ, u), s′),   (u, s′) = tx.update(∇L(θ; B_t), s, θ)

on the dynamical coordinates x = (θ, float leaves of s) (the one flat layout of
:mod:`chaosjax._layout`; integer counters and ``inject_hyperparams``' hyper-parameters are
carried). It is *not* a derivative of the user's ``train_step`` itself: that step may donate its
buffers, log, clip outside the optimizer or use dropout, and chaosjax never re-traces it. A step
that does exactly ``apply_updates(params, tx.update(grad(loss_fn), opt_state, params))`` — the
standard loop — has exactly this Jacobian; anything the step does beyond it is not in the
exponents (documented on :class:`chaosjax.probes.FTLE`).

Each step: k tangents Q (dim, k) → J Q (one ``jax.linearize`` of F, vmapped:
:func:`chaosjax.tangent_step`) → QR with a non-negative diagonal
(:func:`chaosjax.qr_renormalize`); Σ log R_ii accumulates until the monitor records it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from chaosjax._finite_sqrt import finite_sqrt_derivative
from chaosjax._layout import layout_of
from chaosjax._util import warn_at_caller
from chaosjax.optimizers import carried_leaf
from chaosjax.smoothness import NonSmoothWarning, step_smoothness
from chaosjax.tangents import qr_renormalize, random_basis, tangent_step


def optimizer_map(loss_fn: Callable, tx) -> Callable:
    """``F((params, opt_state), t, batch) -> (params′, opt_state′)``: one step of ``tx`` on
    the gradient of ``loss_fn`` (the map whose tangents ``wrap`` follows)."""

    # √ of the update's moments differentiable at 0: only sqrt fed by the gradient or the
    # optimizer state (a sqrt in the loss, fed by the parameters, keeps its derivative)
    update = finite_sqrt_derivative(tx.update, lambda g, s, p: (True, True, False))

    def step(state, t, batch):
        params, opt_state = state
        g = jax.grad(loss_fn)(params, batch)
        u, new = update(g, opt_state, params)
        return optax.apply_updates(params, u), new

    return step


class Tangents:
    """k tangents of :func:`optimizer_map` along the states the loop passes (a host object).

    Attributes:
        k: the number of tangents.
        dim: the dimension of x = (θ, float optimizer leaves).
        void: the reason the exponents are NaN ("" when they are measured).
        log_growth: (k,) Σ log R_ii since the last :meth:`take`.
        n_steps: steps summed in ``log_growth``.
        seconds: wall time of the tangent programs since the last :meth:`take`.
        traces: how many times the tangent program was traced (1 after the first step).
    """

    def __init__(self, loss_fn: Callable, tx, params, opt_state, batch, k: int, key):
        self.step = optimizer_map(loss_fn, tx)
        example = (params, opt_state)
        work = jnp.result_type(
            jnp.float32,
            *[
                leaf.dtype
                for leaf in jax.tree_util.tree_leaves(example)
                if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating)
            ],
        )
        self.layout = layout_of(example, carried=carried_leaf, dtype=work, what="state")
        self.dim = self.layout.dim
        if k > self.dim:
            raise ValueError(f"k: FTLE(k={k}) exceeds the state's dimension {self.dim}")
        self.k = k
        verdict = step_smoothness(self.step, example, args=batch)
        self.void = verdict.reason
        if self.void:
            warn_at_caller(verdict.reason, NonSmoothWarning)
        self.q = random_basis(key, self.dim, k, work)
        self.log_growth = jnp.zeros((k,), work)
        self.n_steps = 0
        self.seconds = 0.0
        self.traces = 0
        self._program = jax.jit(self._advance)

    def _advance(self, params, opt_state, q, batch):
        self.traces += 1
        x, carried = self.layout.split((params, opt_state))

        def flat(v, t):
            return self.layout.split(self.step(self.layout.merge(v, carried), t, batch))[0]

        _, jq = tangent_step(flat, x, q, 0)
        q2, r = qr_renormalize(jq)
        return q2, jnp.log(jnp.diagonal(r))

    def advance(self, params, opt_state, batch) -> None:
        """One step of the tangents at the state the loop is about to step from."""
        if self.void:
            return
        t0 = time.perf_counter()
        self.q, logs = self._program(params, opt_state, self.q, batch)
        self.log_growth = jax.block_until_ready(self.log_growth + logs)
        self.seconds += time.perf_counter() - t0
        self.n_steps += 1

    def take(self) -> tuple[tuple[jax.Array, jax.Array], float]:
        """``((log_growth (k,), n_steps), seconds)`` since the last take; resets them."""
        out = (self.log_growth, jnp.asarray(self.n_steps)), self.seconds
        self.log_growth = jnp.zeros_like(self.log_growth)
        self.n_steps = 0
        self.seconds = 0.0
        return out


__all__: list[str] = []
