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
    0: ["tangents", "_layout", "optimizers", "losses", "_smalllinalg", "_krylov", "_fit", "_util",
        "_finite_sqrt", "_map", "_observer"],
    1: ["systems", "training", "nnx_adapter", "stepmap", "models", "datasets", "_training_core",
        "_optimizer_binding", "_state_codec"],
    2: ["engine", "observers", "replicas", "sharding", "results", "smoothness",
        "_monitor_tangents", "_engine_plan", "_engine_program", "_engine_pass", "_engine_rows",
        "_engine_memory", "_engine_checkpoint"],
    3: ["lyapunov", "clv", "curvature", "landscape", "response", "series", "episodes",
        "control", "plots", "orbits", "_curvature_tracker", "_orbit_newton", "_orbit_plots",
        "_orbit_observer", "_divergence", "writers", "_probe_base", "probes", "_monitor",
        "_monitor_report"],
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


#: the house rule (split, don't explain): no module and no function over these many lines
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 650, 150


def _over_the_length_rule(root: Path) -> list[str]:
    """'path: N lines' for every module over MAX_MODULE_LINES and 'path:line name: N lines' for
    every function (methods and nested functions included) over MAX_FUNCTION_LINES."""
    out = []
    for p in sorted(root.rglob("*.py")):
        src = p.read_text()
        rel = p.relative_to(root.parent).as_posix()
        n = len(src.splitlines())
        if n > MAX_MODULE_LINES:
            out.append(f"{rel}: {n} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                m = node.end_lineno - start + 1
                if m > MAX_FUNCTION_LINES:
                    out.append(f"{rel}:{node.lineno} {node.name}: {m} lines")
    return out


def test_no_module_over_650_lines_and_no_function_over_150():
    over = _over_the_length_rule(ROOT / "chaosjax")
    assert not over, "over the length rule (split, don't explain):\n" + "\n".join(over)


def test_the_length_rule_catches_a_long_module_and_a_long_nested_function(tmp_path):
    pkg = tmp_path / "chaosjax"
    pkg.mkdir()
    (pkg / "short.py").write_text("def f():\n    return 1\n")
    body = "".join(f"            x{i} = {i}\n" for i in range(150))
    (pkg / "nested.py").write_text("class A:\n    def m(self):\n        def g():\n" + body)
    (pkg / "long.py").write_text("x = 1\n" * 651)
    over = _over_the_length_rule(pkg)
    assert over == ["chaosjax/long.py: 651 lines", "chaosjax/nested.py:2 m: 152 lines",
                    "chaosjax/nested.py:3 g: 151 lines"], over  # fmt: skip
    assert not [o for o in over if o.startswith("chaosjax/short.py")]
