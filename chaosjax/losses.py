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


def constant_loss(loss: str, targets) -> float:
    """The loss of the best constant output on ``targets``: a network that has died to it
    ("dead plateau") predicts the class prior. Cross-entropy: the entropy of the class
    frequencies (integer labels or probability rows); MSE: ½·mean‖y − ȳ‖²; NaN for another
    loss."""
    import numpy as np

    y = np.asarray(targets)
    if loss == "mse":
        y = y.reshape(y.shape[0], -1).astype(np.float64)
        return float(0.5 * np.mean(np.sum((y - y.mean(axis=0)) ** 2, axis=-1)))
    if loss == "cross_entropy":
        p = (
            np.bincount(y.astype(np.int64).ravel()) / y.size
            if np.issubdtype(y.dtype, np.integer)
            else y.reshape(y.shape[0], -1).mean(axis=0)
        )
        p = p[p > 0]
        return float(-np.sum(p * np.log(p)))
    return float("nan")


def loss_function(loss) -> Callable:
    """A loss by name (:data:`LOSSES`) or the callable itself."""
    if callable(loss):
        return loss
    if loss == "mse":
        return mse_loss
    if loss == "cross_entropy":
        return cross_entropy_loss
    raise ValueError(f"loss: unknown {loss!r}; allowed: {', '.join(LOSSES)} or a callable")


__all__ = ["LOSSES", "constant_loss", "cross_entropy_loss", "loss_function", "mse_loss"]
