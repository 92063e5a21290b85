"""Every benchmark script runs at tiny size."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


#: extra arguments at tiny size (the suite's tiny mode on its ResNet only: each model compiles
#: a dozen programs; the Transformer and MLP paths are the same code)
EXTRA = {"suite": ["--models", "resnet-bn"]}


#: scripts whose tiny run only re-times code that test_curvature, test_lyapunov,
#: test_sharding, test_real_models and test_monitor/test_probes check for correctness:
#: `pytest -m slow` runs them (the suite stays under 10 minutes on 2 cores); the others run here
SLOW = {"curvature", "lyapunov", "scaling", "monitor", "suite"}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
        for n in sorted(p.stem for p in BENCH.glob("[!_]*.py"))
    ],
)
def test_benchmark_runs_tiny(name, tmp_path):
    args = ["--tiny", "--json", str(tmp_path / f"{name}.json"), *EXTRA.get(name, [])]
    rows = load(name).main(args)
    assert rows and (tmp_path / f"{name}.json").exists()
    if name == "suite":  # every strategy timed, the costs measured, a markdown table written
        m = rows["models"]["resnet-bn"]
        assert {r["strategy"].split()[0] for r in m["throughput"]} == {"vmap", "map", "8"}
        assert all(r["replica_steps_per_s"] > 0 for r in m["throughput"])
        assert m["tangents"][0]["ratio"] > 0 and m["curvature"]["hvp_over_grad"] > 0
        assert "replica-steps/s" in (tmp_path / "suite.md").read_text()
