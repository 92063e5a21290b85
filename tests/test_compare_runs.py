"""scripts/compare_runs.py says which arrays of two run folders agree, and how."""

import importlib.util
from pathlib import Path

import numpy as np
import xarray as xr

from chaosjax.results import ReplicaResults

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_runs.py"


def _load():
    spec = importlib.util.spec_from_file_location("compare_runs", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _save(folder: Path, loss, exponents, extra=None):
    n = loss.shape[0]
    res = ReplicaResults(
        steps=np.arange(loss.shape[1]) * 50,
        records={"loss": loss},
        final_state=np.zeros((n, 2)),
        diverged_step=np.full(n, -1),
        coords={"learning_rate": np.array([0.05, 4.0]), "member": np.zeros(n, int)},
        attrs={"total_time_s": float(len(str(folder)))},  # differs between the folders
    )
    group = xr.Dataset(
        {"exponents": (("group",), exponents)},
        coords={"group": np.arange(n), "learning_rate": ("group", [0.05, 4.0])},
    )
    groups = {"lyapunov": group, **(extra or {})}
    res.save(folder / "results.zarr", groups=groups)


def test_verdicts_and_exit_code(tmp_path, capsys):
    cmp = _load()
    loss = np.array([np.linspace(1, 0.1, 5), np.linspace(1, 2, 5)])
    _save(tmp_path / "a", loss, np.array([-0.1, 0.5]))
    chaotic = loss.copy()
    chaotic[1, 3:] += 1e-3  # the chaotic row parts after step 100
    _save(tmp_path / "b", chaotic, np.array([-0.1, 0.5000001]))
    assert cmp.main([str(tmp_path / "a"), str(tmp_path / "b"), "--stable", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "\tloss\tearly" in out and "\texponents\tchaotic" in out
    assert "final_state\tbitwise" in out and "total_time_s" not in out
    # the stable row differs: DIFFERS, exit 1
    moved = loss.copy()
    moved[0, 2] *= 1 + 1e-6
    _save(tmp_path / "c", moved, np.array([-0.1, 0.5]))
    assert cmp.main([str(tmp_path / "a"), str(tmp_path / "c"), "--stable", "0.05"]) == 1
    assert "loss\tDIFFERS (stable rows" in capsys.readouterr().out
    # a group on one side only
    _save(tmp_path / "d", loss, np.array([-0.1, 0.5]), {"extra": xr.Dataset({"v": ((), 1.0)})})
    assert cmp.main([str(tmp_path / "a"), str(tmp_path / "d")]) == 1
    assert "extra\t*\tDIFFERS: only in after" in capsys.readouterr().out
