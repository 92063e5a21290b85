"""Small problems shared by the sharding tests and the two-process worker."""

import jax
import jax.numpy as jnp

import chaosjax as cj
from chaosjax import datasets, models
from chaosjax.training import TrainingMap


def iris_replicas(optimizer: str = "sgd", lrs=(0.02, 0.05, 0.1)):
    """Danovski's Iris network at stable learning rates (no chaos, so sharded and unsharded
    runs agree to rounding for the whole run); 2 seeds × 3 η × (1 + 2 perturbed) = 18 rows."""
    net = models.PureMLP((4, 10, 3), activation="sigmoid", init="normal")
    tmap = TrainingMap(
        net.apply,
        net.init_params(jax.random.PRNGKey(0), jnp.float64),
        datasets.iris(),
        loss="cross_entropy",
        optimizer=optimizer,
        learning_rate=0.1,
        init_fn=lambda k: net.init_params(k, jnp.float64),
    )
    batch = cj.make_replicas(
        tmap, seeds=[0, 1], grid={"learning_rate": list(lrs)}, n_perturbed=2, eps=1e-6
    )
    return tmap, batch
