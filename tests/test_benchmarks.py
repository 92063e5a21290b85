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


@pytest.mark.parametrize("name", sorted(p.stem for p in BENCH.glob("[!_]*.py")))
def test_benchmark_runs_tiny(name, tmp_path):
    rows = load(name).main(["--tiny", "--json", str(tmp_path / f"{name}.json")])
    assert rows and (tmp_path / f"{name}.json").exists()
