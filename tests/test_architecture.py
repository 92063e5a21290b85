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
    0: ["tangents", "_layout", "optimizers", "losses", "_smalllinalg", "_krylov", "_fit", "_util"],
    1: ["systems", "training", "nnx_adapter", "stepmap", "models", "datasets"],
    2: ["engine", "observers", "replicas", "sharding", "results", "smoothness"],
    3: ["lyapunov", "clv", "curvature", "landscape", "response", "series", "episodes",
        "control", "plots", "orbits", "_curvature_tracker", "_orbit_newton", "_orbit_plots",
        "_orbit_observer"],
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


def _module_graph() -> dict[str, set[str]]:
    """chaosjax module → the chaosjax modules it imports (function-local imports included)."""
    pkg = ROOT / "chaosjax"
    files = {
        ".".join(p.relative_to(pkg).with_suffix("").parts).replace(".__init__", ""): p
        for p in pkg.rglob("*.py")
    }
    files = {("" if k == "__init__" else k): p for k, p in files.items()}
    graph = {}
    for name, p in files.items():
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("chaosjax")
            ):
                mod = node.module[len("chaosjax") :].lstrip(".")
                for a in node.names:
                    sub = f"{mod}.{a.name}".lstrip(".")
                    deps.add(sub if sub in files else mod)
            elif isinstance(node, ast.Import):
                deps |= {
                    a.name[len("chaosjax.") :] for a in node.names if a.name.startswith("chaosjax.")
                }
        graph[name] = {d for d in deps if d in files and d != name and d != ""}
    return graph


def test_no_import_cycle_anywhere_in_the_package():
    """Not even through imports inside functions (they used to hide runner ↔ controlled)."""
    graph = _module_graph()
    assert "experiments.runner" in graph and "experiments.stages" in graph
    done: set[str] = set()

    def visit(n, path):
        assert n not in path, " → ".join([*path, n])
        if n in done:
            return
        for d in sorted(graph[n]):
            visit(d, [*path, n])
        done.add(n)

    for n in sorted(graph):
        visit(n, [])


def test_a_module_over_about_500_lines_says_why():
    import ast as _ast

    for p in sorted((ROOT / "chaosjax").rglob("*.py")):
        n = len(p.read_text().splitlines())
        if n > 520:
            doc = _ast.get_docstring(_ast.parse(p.read_text())) or ""
            assert "Length:" in doc, f"{p.relative_to(ROOT)}: {n} lines and no 'Length:' reason"
