#!/usr/bin/env bash
# The version floor of pyproject.toml, tested: a fresh virtual environment with exactly the
# oldest jax / jaxlib / flax / optax the package declares, then a fast subset of the tests
# (engine, Lyapunov, training maps, nnx models, sharding, the optimizer sqrt rewrite, stages,
# results). Run from anywhere: `bash scripts/check_floor.sh [VENV_DIR]` (default
# /tmp/chaosjax-floor; removed and created anew). Exit status: that of pytest.
#
# Why these floors: flax 0.12.0 is the first with nnx.List / nnx.Dict (chaosjax.models) and
# itself needs jax >= 0.7.1; jax 0.7.1 has jax.shard_map(check_vma=) and
# jax.sharding.AxisType (chaosjax.sharding); optax 0.2.4 is the first with
# optax.safe_increment (chaosjax.optimizers).
#
# Override a floor to try another: JAX_FLOOR=0.8.0 bash scripts/check_floor.sh.
#
# Measured 2026-12-03 (2 CPU cores, Python 3.11, the tree after commit ef2fe96 plus the
# map-protocol test): jax/jaxlib 0.7.1, flax 0.12.0, optax 0.2.4 resolve and install, and all
# 103 tests of the subset pass (90 s). (The first try, at 618dd93, failed 5: a private
# pe.dce_jaxpr call wanted a sequence of booleans on 0.7.1, and the jnp.sqrt patch was still
# there; both are gone.)
set -euo pipefail

JAX_FLOOR="${JAX_FLOOR:-0.7.1}"
FLAX_FLOOR="${FLAX_FLOOR:-0.12.0}"
OPTAX_FLOOR="${OPTAX_FLOOR:-0.2.4}"
FAST_TESTS=(
  tests/test_results.py
  tests/test_systems.py
  tests/test_training.py
  tests/test_models.py
  tests/test_sharding.py
  tests/test_finite_sqrt.py
  tests/test_smoothness.py
  tests/test_stages.py
)

root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-/tmp/chaosjax-floor}"
rm -rf "$venv"
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
cd "$root"
pip install -q "jax==$JAX_FLOOR" "jaxlib==$JAX_FLOOR" "flax==$FLAX_FLOOR" "optax==$OPTAX_FLOOR" -e ".[dev]"
python - <<PY
import flax, jax, jaxlib, optax
got = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
       "optax": optax.__version__}
want = {"jax": "$JAX_FLOOR", "jaxlib": "$JAX_FLOOR", "flax": "$FLAX_FLOOR", "optax": "$OPTAX_FLOOR"}
assert got == want, f"floor venv resolved {got}, wanted {want}"
print("floor versions:", got)
PY
python -m pytest -q -p no:cacheprovider -n 2 "${FAST_TESTS[@]}"
