"""The probe protocol of :class:`chaosjax.Monitor` and the pieces its probes share.

A probe is a pure, jittable function of the parameters, the batch, the optimizer state, the
learning rate η_t and its own state (a warm start), declared as a :class:`Probe`: the monitor
jits ``probe.measure`` once per probe and calls it at its cadence. Nothing here is probed with
``hasattr``: a probe declares what it needs (``needs``) and its state (``init_state``), with
defaults in the base class.

Precision: the parameters are read into one flat vector (shape (dim,), the layout of
:mod:`chaosjax._layout`) of the *work dtype* ``result_type(param dtype, float32)``: float64 for
a float64 model, float32 for float32 and bfloat16 models. The model itself runs in its own
dtype (the flat vector is cast back to each leaf's dtype before ``loss_fn`` is called), while
every dot product, norm, Krylov basis and Rayleigh quotient accumulates in the work dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from chaosjax._finite_sqrt import finite_sqrt_derivative
from chaosjax._krylov import block_krylov_eigs
from chaosjax._layout import Layout

PRECISION = "highest"


def _update_select(grads, opt_state, params):
    """The inputs of ``tx.update(grads, opt_state, params)`` whose ``sqrt`` get the finite
    derivative at 0 (:func:`chaosjax._finite_sqrt.finite_sqrt_derivative`): the gradient and
    the optimizer state, never the parameters."""
    return (True, True, False)


#: what a probe may need beyond the parameters and the batch
NEEDS = ("optimizer", "learning_rate", "history", "tangents")


class ProbeInputs(NamedTuple):
    """What the monitor hands a probe at step t (every field a pytree of arrays).

    Attributes:
        params: the parameter pytree as the user's state holds it (its dtype and sharding).
        batch: the batch of step t as the loop passed it.
        opt_state: the optimizer state (``()`` when the monitor has none).
        eta: η_t, a scalar in the work dtype (NaN when unknown).
        key: a PRNG key for this call.
        history: ``(batches, weights)``: the last n batches stacked on a leading axis (n, ...)
            and their weights (n,) (1 for a batch the loop passed, 0 for padding); ``()``
            unless the probe declares ``"history"``.
        tangents: ``(log_growth (k,), n_steps ())``: Σ log R_ii of the tangent QR since the
            last record and the number of steps summed; ``()`` unless it declares
            ``"tangents"``.
    """

    params: Any
    batch: Any
    opt_state: Any
    eta: jax.Array
    key: jax.Array
    history: Any = ()
    tangents: Any = ()


@dataclasses.dataclass(frozen=True, eq=False)
class Context:
    """What every probe of one monitor shares (static: closed over by the jitted programs).

    Attributes:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        optimizer: the optax transformation (None when the monitor has none).
        layout: the flat layout of the parameters, in the work dtype.
    """

    loss_fn: Callable
    optimizer: Any
    layout: Layout

    @property
    def dtype(self):
        """The work dtype (float32 at least)."""
        return jnp.dtype(self.layout.dtype)

    def flat(self, params) -> tuple[jax.Array, tuple]:
        """``(x (dim,) in the work dtype, carried non-float leaves)`` of a parameter pytree."""
        return self.layout.split(params)

    def flat_loss(self, carried, batch) -> Callable:
        """``v (dim,) -> loss`` in the work dtype (the model runs in its own dtype)."""

        def f(v):
            return jnp.asarray(self.loss_fn(self.layout.merge(v, carried), batch), self.dtype)

        return f

    def hvp(self, f: Callable, x) -> Callable:
        """``v -> H v`` of ``f`` at ``x`` (forward over reverse, highest matmul precision)."""
        g = jax.grad(f)

        def mv(v):
            with jax.default_matmul_precision(PRECISION):
                return jax.jvp(g, (x,), (v.astype(x.dtype),))[1]

        return mv

    def update(self, params, x, carried, batch, opt_state) -> jax.Array:
        """u_t (dim,): the optimizer's update at ``params`` on ``batch`` as the loop would
        apply it, ``optax.apply_updates(params, u)``: ``tx.update(∇L, opt_state, params)``."""
        g = jax.grad(self.flat_loss(carried, batch))(x)
        grads = self.layout.merge(g, carried)
        # √ of the update's moments differentiable at 0 (scoped: the gradient and the state)
        update = finite_sqrt_derivative(self.optimizer.update, _update_select)
        updates, _ = update(grads, opt_state, params)
        return self.layout.split(updates)[0]


class Probe:
    """The protocol of a monitor probe, with defaults.

    Class attributes:
        name: the snake_case key of the probe's primary value in the monitor's output.
        needs: what it needs beyond parameters and batch (a subset of ``NEEDS``): the
            optimizer and its state, η_t, the batch history, the tangents of ``wrap``.

    Attributes:
        every: the probe's own cadence (None: the monitor's ``every``).
        k: vectors the probe follows (eigenvectors, tangents).
        sampler: ``sampler(t, i) -> batch`` of a ``"history"`` probe that draws its own
            batches (None: the batches the loop passed).
    """

    name: ClassVar[str] = "probe"
    needs: ClassVar[frozenset[str]] = frozenset()
    every: int | None = None
    k: int = 1
    sampler: Callable | None = None

    def init_state(self, ctx: Context, key) -> Any:
        """The probe's state before its first call (a pytree of arrays; default none)."""
        return ()

    def measure(self, ctx: Context, inp: ProbeInputs, state) -> tuple[dict, Any, jax.Array]:
        """``(values, new state, matvecs)``: values {key: scalar} (the primary value under
        ``name``, extras under ``name/…``), the probe's next state, and the Hessian-vector
        products (or forward passes, for forward-only probes) spent."""
        raise NotImplementedError(f"{type(self).__name__}.measure")

    def check_opt_state(self, opt_state) -> None:
        """Refuse an optimizer state the probe cannot read (one-line ``ValueError`` naming the
        argument), called by the monitor before any trace; default: accept."""

    def reason(self, *, eta_known: bool, tangents: bool) -> str:
        """Why the primary value is NaN under these conditions ("" when it is defined)."""
        return ""

    def history_size(self) -> int:
        """Batches the monitor keeps for this probe (``"history"`` probes)."""
        return 0

    def n_batches(self) -> int:
        """Batches a ``"history"`` probe averages over (kept or drawn from ``sampler``)."""
        return 0


def check_every(every, what: str = "every") -> int | None:
    """A cadence: None or an integer ≥ 1 (one-line ValueError naming it)."""
    if every is None:
        return None
    if isinstance(every, bool) or int(every) != every or every < 1:
        raise ValueError(f"{what}: must be an integer >= 1, got {every!r}")
    return int(every)


def top_eigs(matvec: Callable, v0, k: int, *, tol: float, n_blocks: int, max_rounds: int):
    """The k largest algebraic eigenpairs of a symmetric operator, warm-started from ``v0``.

    Rounds of :func:`chaosjax._krylov.block_krylov_eigs` (block width b = ``v0.shape[1]``,
    ``n_blocks`` blocks: b·(n_blocks + 1) matvecs a round), each restarted from the previous
    round's b Ritz vectors, until the relative residual max_i ‖A v_i − θ_i v_i‖ / max_j |θ_j|
    of the k wanted pairs is ≤ ``tol`` or ``max_rounds`` rounds are spent.

    Returns:
        ``(theta (k,), vectors (dim, b) — the b Ritz vectors, the next warm start,
        relative residuals (k,), matvecs ())``.
    """
    b = v0.shape[1]
    p = max(0, min(int(n_blocks), v0.shape[0] // b - 1))
    per_round = b * (p + 1)

    def one(v):
        r = block_krylov_eigs(matvec, v, n_blocks=p, k=b, unroll=False)
        scale = jnp.maximum(jnp.max(jnp.abs(r.eigenvalues)), jnp.finfo(v.dtype).tiny)
        return r.eigenvalues, r.eigenvectors.T, r.residuals / scale

    def cond(c):
        _, _, rel, i = c
        return (i < max_rounds) & (jnp.max(rel[:k]) > tol)

    def body(c):
        _, v, _, i = c
        return (*one(v), i + 1)

    theta, vecs, rel, n = jax.lax.while_loop(cond, body, (*one(v0), jnp.asarray(1)))
    return theta[:k], vecs, rel[:k], n * per_round


def rayleigh(mv: Callable, u) -> jax.Array:
    """uᵀ A u / uᵀu (NaN for u = 0)."""
    uu = u @ u
    return jnp.where(uu > 0, (u @ mv(u)) / jnp.where(uu > 0, uu, 1.0), jnp.nan)


__all__: list[str] = []
