"""docs/architecture.md: its worked example (a new observer and a new stage) runs as written,
and the layering it describes holds (no module imports from a layer above it)."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def test_worked_example_adds_an_observer_and_a_stage(tmp_path, monkeypatch):
    from chaosjax.experiments.stages import STAGES

    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1
    before = list(STAGES)
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "docs/architecture.md", "exec"), {"__name__": "architecture"})
    assert list(STAGES) == before  # the example unregisters its stage
    from chaosjax.results import open_group

    ds = open_group(tmp_path / "weight-norm-run" / "results.zarr", "weight_norm")
    assert ds is not None and ds["final_norm"].size == 4  # one per η of the quickstart
    assert (ds["final_norm"].values > 0).all()


#: layer of each module (docs/architecture.md): imports go to the same layer or below
LAYERS = {
    0: ["tangents", "_layout", "optimizers", "losses", "_smalllinalg", "_fit", "_util"],
    1: ["systems", "training", "nnx_adapter", "stepmap", "models", "datasets"],
    2: ["engine", "observers", "replicas", "sharding", "results"],
    3: ["lyapunov", "clv", "curvature", "landscape", "response", "series", "episodes",
        "control", "plots"],
    4: ["experiments", "cli"],
}  # fmt: skip


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("chaosjax"):
            parts = node.module.split(".")
            if len(parts) > 1:
                out.add(parts[1])
            else:
                out |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("chaosjax.")}
    return out


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_no_module_imports_from_a_layer_above(layer):
    level = {m: k for k, ms in LAYERS.items() for m in ms}
    pkg = ROOT / "chaosjax"
    for name in LAYERS[layer]:
        path = pkg / name if (pkg / name).is_dir() else pkg / f"{name}.py"
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            for dep in _imports(f):
                if dep in level:
                    assert level[dep] <= layer, (
                        f"{f.relative_to(ROOT)} imports {dep} (layer {level[dep]})"
                    )


def test_every_module_is_placed_in_a_layer():
    placed = {m for ms in LAYERS.values() for m in ms}
    found = {p.stem for p in (ROOT / "chaosjax").glob("*.py")} - {"__init__"}
    found |= {p.name for p in (ROOT / "chaosjax").iterdir() if (p / "__init__.py").exists()}
    assert found <= placed, sorted(found - placed)


def test_experiments_have_no_import_cycle():
    mods = {p.stem: p for p in (ROOT / "chaosjax" / "experiments").glob("*.py")}
    graph = {}
    for name, p in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith("chaosjax.experiments."):
                    deps.add(node.module.split(".")[2])
                elif node.module == "chaosjax.experiments":
                    deps |= {a.name for a in node.names if a.name in mods}
        graph[name] = deps & set(mods) - {name}

    def visit(n, path):
        assert n not in path, " → ".join([*path, n])
        for d in graph[n]:
            visit(d, [*path, n])

    for n in graph:
        visit(n, [])
