"""Losses of a training map: ``loss(outputs, targets) -> scalar``, mean over examples."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import optax

LOSSES = ("mse", "cross_entropy")


def mse_loss(outputs, targets):
    """½‖f − y‖² summed over outputs, averaged over examples."""
    return 0.5 * jnp.mean(jnp.sum((outputs - targets) ** 2, axis=-1))


def cross_entropy_loss(logits, targets):
    """Softmax cross-entropy, mean over examples; integer labels or probability rows."""
    if jnp.issubdtype(targets.dtype, jnp.integer):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def loss_function(loss) -> Callable:
    """A loss by name (:data:`LOSSES`) or the callable itself."""
    if callable(loss):
        return loss
    if loss == "mse":
        return mse_loss
    if loss == "cross_entropy":
        return cross_entropy_loss
    raise ValueError(f"loss: unknown {loss!r}; allowed: {', '.join(LOSSES)} or a callable")


__all__ = ["LOSSES", "cross_entropy_loss", "loss_function", "mse_loss"]
