"""Test setup: 4 CPU devices (sharding tests run anywhere), float64 by default, and JAX's
persistent compilation cache shared by the test workers and their subprocesses (the CLI,
preset and notebook tests compile the same programs again and again; results do not depend
on the cache)."""

import os
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")
# JAX writes a cache entry with a plain write_bytes and reads it without a lock unless its
# eviction is on (a size limit), which takes a file lock (the `filelock` package, a dev
# dependency) around every read and write: with it, the workers share one folder and reuse each
# other's programs; without it, one folder per xdist worker, so that no process loads another's
# half-written executable (a worker and the subprocess it waits for share its folder safely)
try:
    import filelock  # noqa: F401

    _WORKER = "shared"
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
except ImportError:
    _WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
_CACHE = Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax-compilation" / _WORKER
if "PYTEST_XDIST_WORKER" in os.environ or "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_CACHE)  # the worker's subprocesses too
# every program that takes 0.05 s or more to compile (most of a CLI run's small programs too)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.05")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
if "JAX_COMPILATION_CACHE_MAX_SIZE" in os.environ:
    jax.config.update(
        "jax_compilation_cache_max_size", int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"])
    )
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)

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
