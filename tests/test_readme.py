"""The README's API tour runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


# every block is self-contained (its own imports): they run in parallel under xdist
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = BLOCKS[index]
    exec(compile(code, f"README.md block {index}", "exec"), {"__name__": "readme"})
    if "iris.zarr" in code:
        assert (tmp_path / "iris.zarr").exists()


def test_readme_opens_with_the_two_commands():
    text = README.read_text()
    cmds = re.findall(r"```bash\n(.*?)```", text, re.S)[:2]
    assert "chaosjax run" in cmds[0] and "pip install -e ." in cmds[0]
    assert 'pip install -e ".[dev]"' in cmds[1] and "pytest" in cmds[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert cmds[1].split("&& ")[-1].strip() in ci
