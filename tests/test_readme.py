"""The README's API tour runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "iris.zarr").exists()


def test_readme_opens_with_the_two_commands():
    text = README.read_text()
    cmds = re.findall(r"```bash\n(.*?)```", text, re.S)[:2]
    assert "chaosjax run" in cmds[0] and "pip install -e ." in cmds[0]
    assert 'pip install -e ".[dev]"' in cmds[1] and "pytest" in cmds[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert cmds[1].split("&& ")[-1].strip() in ci
