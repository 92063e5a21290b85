"""Test setup: 4 CPU devices (sharding tests run anywhere) and float64 by default."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import jax

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_enable_x64", True)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def iris_map():
    """Danovski et al.'s Iris network: 4→10 sigmoid→3 softmax, N(0,1) weights, float64."""
    import jax.numpy as jnp

    from chaosjax import datasets, models
    from chaosjax.training import TrainingMap

    net = models.PureMLP((4, 10, 3), activation="sigmoid", init="normal")
    return TrainingMap(
        net.apply,
        net.init_params(jax.random.PRNGKey(0), jnp.float64),
        datasets.iris(),
        loss="cross_entropy",
        optimizer="sgd",
        learning_rate=1.0,
        init_fn=lambda k: net.init_params(k, jnp.float64),
    )
