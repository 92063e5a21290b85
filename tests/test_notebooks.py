"""Every notebook runs at tiny size, its paired .ipynb matches the py:percent source, and it
uses only public chaosjax names."""

import ast
import importlib
import os
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))


def test_the_eight_notebooks_exist():
    names = [p.stem for p in SOURCES]
    assert names == [
        "01_quickstart",
        "02_learning_rate_regimes",
        "03_edge_of_stability",
        "04_covariant_vectors",
        "05_training_response",
        "06_gpu_replicas",
        "07_your_model",
        "08_your_loop",
    ]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.stem)
def test_notebook_runs_at_tiny_size(path, tmp_path, monkeypatch):
    """Run as a script in this process (a kernel would share its process the same way; a
    subprocess per notebook only added interpreter and JAX start-up to the suite)."""
    import runpy

    import matplotlib.pyplot as plt

    monkeypatch.setenv("CHAOSJAX_NOTEBOOK_SIZE", "tiny")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        plt.close("all")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.stem)
def test_paired_ipynb_matches_source(path):
    jupytext = pytest.importorskip("jupytext")
    ipynb = path.with_suffix(".ipynb")
    assert ipynb.exists(), f"run: jupytext --to ipynb {path.name}"
    src = jupytext.read(path)
    nb = jupytext.read(ipynb)
    assert [(c.cell_type, c.source) for c in src.cells] == [
        (c.cell_type, c.source) for c in nb.cells
    ], f"{ipynb.name} is out of date: jupytext --sync {path.name}"


def _public_violations(tree: ast.Module) -> list[str]:
    aliases, bad = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "chaosjax":
                    aliases[a.asname or a.name.split(".")[0]] = a.name
                    if any(part.startswith("_") for part in a.name.split(".")):
                        bad.append(a.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("chaosjax"):
            if any(part.startswith("_") for part in node.module.split(".")):
                bad.append(node.module)
            mod = importlib.import_module(node.module)
            for a in node.names:
                if a.name.startswith("_") or not hasattr(mod, a.name):
                    bad.append(f"{node.module}.{a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, cur = [], node
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id in aliases:
                obj = importlib.import_module(aliases[cur.id])
                for part in reversed(chain):
                    if part.startswith("_"):
                        bad.append(f"{cur.id}.{'.'.join(reversed(chain))}")
                        break
                    if not hasattr(obj, part):
                        bad.append(f"{cur.id}.{'.'.join(reversed(chain))} (missing)")
                        break
                    obj = getattr(obj, part)
                    if not (isinstance(obj, type(os)) or isinstance(obj, type)):
                        break  # a function or value: attributes beyond are its own
    return bad


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.stem)
def test_notebook_uses_public_api_and_states_runtime(path):
    text = path.read_text()
    assert "CHAOSJAX_NOTEBOOK_SIZE" in text and "**Runtime**" in text
    assert _public_violations(ast.parse(text)) == []


def test_public_api_check_catches_private_names():
    tree = ast.parse(
        "import chaosjax as cj\nfrom chaosjax._util import fmt\nfrom chaosjax.replicas import "
        "_chunk\ncj._util.fmt(1)\ncj.no_such_name\n"
    )
    bad = _public_violations(tree)
    assert "chaosjax._util" in bad and "chaosjax.replicas._chunk" in bad
    assert "cj._util.fmt" in bad and any("no_such_name" in b for b in bad)
