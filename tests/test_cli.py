import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from chaosjax.cli import main
from chaosjax.results import ReplicaResults

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
from referee import check_summary

TINY = [
    "--set",
    "steps=40",
    "--set",
    "record_every=10",
    "--set",
    "chunk_steps=20",
    "--set",
    "replicas.seeds=[0]",
    "--set",
    "replicas.n_perturbed=2",
    "--set",
    "data.n_samples=40",
    "--set",
    "model.hidden=[8]",
    "--set",
    "clv.align=10",
    "--set",
    "clv.steps=20",
    "--set",
    "clv.backward_transient=10",
]


#: TINY without the analysis stages, for tests about the run folder, flags and devices
BARE = [
    *TINY,
    *[x for s in ("lyapunov", "curvature", "clv", "instability") for x in ("--set", f"{s}.enabled=false")],
]  # fmt: skip


def test_run_default_preset_writes_every_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--quiet", *TINY]) == 0
    for name in (
        "config.toml",
        "summary.md",
        "figures/loss.png",
        "figures/replica_distance.png",
        "figures/spectrum.png",
        "figures/ftle.png",
        "figures/sharpness.png",
        "figures/rotation.png",
        "figures/density.png",
        "figures/landscape_1d.png",
        "figures/landscape_2d.png",
    ):
        assert (out / name).exists(), name
    assert not (out / "checkpoint.npz").exists()
    res = ReplicaResults.load(out / "results.zarr")
    assert res.records["loss"].shape == (4 * 3, 5)
    assert int(res.attrs["complete"]) == 1
    text = (out / "summary.md").read_text()
    assert "| η |" in text and "quickstart" in text and "## Lyapunov exponents" in text
    assert "## Curvature and the edge of stability" in text and "Verdict from" in text
    assert res.records["sharpness"].shape == (12, 5, 2)
    assert "results.zarr" in capsys.readouterr().out
    # every stage the default preset enables stored its dataset (the preset test skips it)
    from chaosjax.experiments import load_plan
    from chaosjax.experiments.stages import enabled_stages
    from chaosjax.results import open_group

    for stage in enabled_stages(load_plan(str(out / "config.toml"))[0][1]):
        ds = open_group(out / "results.zarr", stage.name)
        assert ds is not None and ds.data_vars, stage.name
    # report re-renders the same summary from the stored results alone
    (out / "summary.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "summary.md").read_text() == text
    # report re-renders the same summary from the store
    (out / "summary.md").unlink()
    (out / "figures" / "loss.png").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "summary.md").read_text() == text
    assert (out / "figures" / "loss.png").exists()
    # the referee: every number of the summary's tables is the stored arrays' (and the
    # regime line joins the stages' words without contradiction)
    assert check_summary(out) > 20
    assert "## Regime of each run" in text


def test_presets_listed(capsys):
    assert main(["presets"]) == 0
    assert "quickstart" in capsys.readouterr().out


def test_config_prints_resolved_toml(capsys):
    assert main(["config", "--set", "steps=40", "--set", "record_every=5", *TINY[-6:]]) == 0
    out = capsys.readouterr().out
    assert "steps = 40" in out and "[training]" in out


@pytest.mark.parametrize(
    "args, msg",
    [
        (["run", "nosuchpreset"], "preset: unknown 'nosuchpreset'; allowed: "),
        (["run", "--set", "training.lr=1"], "training.lr: unknown key; allowed in training:"),
        (["run", "--set", "steps=abc"], "steps: expected an integer, got 'abc'"),
        (["run", "--set", "steps=0"], "steps: must be >= 1, got 0"),
        (
            ["run", "--set", "training.optimizer=sgdd"],
            "training.optimizer: unknown 'sgdd'; allowed: sgd",
        ),
        (
            ["run", "--set", "training.learning_rates=[0.1,-1]"],
            "training.learning_rates[1]: must be > 0",
        ),
        (["run", "--set", "record_every=7"], "record_every: must divide steps"),
        (
            ["run", "--set", "replicas.distribution=cauchy"],
            "replicas.distribution: unknown 'cauchy'",
        ),
        (["run", "/nonexistent/cfg.toml"], "config: cannot read /nonexistent/cfg.toml"),
        (["run", "--set", "novalue"], "--set: expected key=value"),
        (["run", "--bogus"], "unrecognized arguments: --bogus"),
        (
            ["run", "--set", "lyapunov.k=100000", *TINY],
            "lyapunov.k: must be <= the state dimension",
        ),
        (["run", "--set", "lyapunov.renorm_every=3", *TINY], "lyapunov.renorm_every: must divide"),
        (
            ["run", "--set", "lyapunov.fit_starts=[5,1,1]"],
            "lyapunov.fit_starts: expected [first, last, stride]",
        ),
        (["run", "--devices", "0"], "--devices: must be a positive device count, got 0"),
        (["run", "--devices", "9", *TINY], "devices: must be between 1 and 4"),
        (["run", "--memory-limit", "lots"], "scale.memory_limit: expected a positive number"),
        (["run", "--num-processes", "2"], "--coordinator: required with --num-processes > 1"),
        (["run", "--set", "steps=20"], "clv.align: the CLV window starts at clv.align=100"),
        (["run", "--resume"], "--resume: "),
    ],
)
def test_bad_input_one_line_exit_2(args, msg, capsys, tmp_path):
    code = (
        main([*args, "--out", str(tmp_path / "o")])
        if args[0] == "run" and "--bogus" not in args
        else None
    )
    if code is None:
        with pytest.raises(SystemExit) as e:
            main(args)
        code = e.value.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert msg in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bad_toml_file(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("steps = = 3\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_existing_folder_needs_force(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["run", "--out", str(out), *TINY]) == 2
    assert "already exists; use --force" in capsys.readouterr().err
    # --force refuses to delete a folder that is not a chaosjax run
    assert main(["run", "--out", str(out), "--force", *TINY]) == 2
    assert (out / "keep.txt").read_text() == "mine"
    run = tmp_path / "run2"
    assert main(["run", "--out", str(run), "--quiet", *BARE]) == 0
    assert main(["run", "--out", str(run), "--quiet", "--force", *BARE]) == 0
    assert (
        main(["run", "--out", str(run), "--quiet", "--resume", "--set", "steps=60", *BARE[2:]]) == 2
    )
    assert "config differs" in capsys.readouterr().err


def test_killed_run_resumes_to_the_same_arrays(tmp_path):
    args = [
        "--set",
        "clv.enabled=false",  # the CLV stage is tested elsewhere; this test is about resume
        "--set",
        "steps=300",
        "--set",
        "record_every=10",
        "--set",
        "chunk_steps=50",
        "--set",
        "replicas.seeds=[0]",
        "--set",
        "replicas.n_perturbed=2",
        "--set",
        "data.n_samples=40",
        "--set",
        "model.hidden=[8]",
        # resume of the tangent and curvature observers is what is tested; the post-run
        # stages read the stored results and are tested elsewhere
        *[x for s in ("landscape", "series", "instability") for x in ("--set", f"{s}.enabled=false")],
        "--quiet",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "chaosjax.cli", "run"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [*cmd, "--out", str(killed), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while (
        not (killed / "checkpoint.npz").exists() and time.time() < deadline and proc.poll() is None
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not (killed / "checkpoint.npz").exists():
        pytest.skip("the run finished before it could be killed")
    assert not (killed / "summary.md").exists()
    # the resumed run and the uninterrupted one run in this process (only the kill needs one)
    assert main(["run", "--out", str(killed), "--resume", *args]) == 0
    assert main(["run", "--out", str(whole), *args]) == 0
    a = ReplicaResults.load(killed / "results.zarr")
    b = ReplicaResults.load(whole / "results.zarr")
    assert a.attrs["resumed"] == 1
    np.testing.assert_array_equal(a.final_state, b.final_state)
    for k in b.records:
        np.testing.assert_array_equal(a.records[k], b.records[k])


def test_report_describes_the_recorded_trajectory(tmp_path):
    """Every table of a replica describes one trajectory: the Lyapunov and CLV groups carry the
    loss of the states their tangents were linearised at, equal to the recorded loss of the
    reference replica to the last bit — at a chaotic η, where a second integration would part
    from the recorded run within a few hundred steps."""
    from chaosjax.results import open_group

    out = tmp_path / "run"
    args = ["--set", "training.learning_rates=[4.0]", "--set", "steps=400",
            "--set", "lyapunov.k=3", "--set", "clv.steps=200", "--set", "clv.align=50",
            "--set", "clv.backward_transient=100", "--set", "chunk_steps=100",
            "--set", "curvature.enabled=false"]  # fmt: skip
    assert main(["run", "--out", str(out), "--quiet", *TINY[:12], *args]) == 0
    res = ReplicaResults.load(out / "results.zarr")
    refs = np.flatnonzero(res.coords["member"] == 0)
    for group in ("lyapunov", "clv"):
        ds = open_group(out / "results.zarr", group)
        np.testing.assert_array_equal(ds["loss"].values, res.records["loss"][refs])
        np.testing.assert_array_equal(ds["step"].values, res.steps)
    ly = open_group(out / "results.zarr", "lyapunov")
    assert ly["exponents"].shape == (1, 3) and float(ly["exponents"].values[0, 0]) > 0  # chaotic
    # the table's exponents are the stored tangents' log growth, averaged
    lg = res.records["log_growth"][refs][:, :, :3]
    np.testing.assert_allclose(ly["exponents"].values, lg.mean(axis=1), rtol=1e-12)
    assert np.isnan(res.records["log_growth"][res.coords["member"] > 0]).all()  # not tracked


def test_clv_stage_in_run(tmp_path):
    from chaosjax.results import open_group

    out = tmp_path / "run"
    extra = [
        "--set",
        "steps=80",
        "--set",
        "record_every=4",
        "--set",
        "chunk_steps=40",
        "--set",
        "clv.enabled=true",
        "--set",
        "clv.k=2",
        "--set",
        "clv.align=12",
        "--set",
        "clv.steps=40",
        "--set",
        "clv.backward_transient=20",
        "--set",
        "lyapunov.enabled=false",
        "--set",
        "instability.enabled=false",  # its phases need the Lyapunov stage
    ]
    assert main(["run", "--out", str(out), "--quiet", *TINY[6:14], *extra]) == 0
    ds = open_group(out / "results.zarr", "clv")
    assert ds["exponents"].shape == (4, 2) and ds["min_angle_deg"].shape == (4, 40)
    assert (out / "figures" / "clv_angles.png").exists()
    ov = ds["hessian_overlap"].values
    assert ov.shape == (4, 10, 2)
    assert np.all((ov[np.isfinite(ov)] >= 0) & (ov[np.isfinite(ov)] <= 1 + 1e-9))
    text = (out / "summary.md").read_text()
    assert "## Covariant Lyapunov vectors" in text and "## Lyapunov exponents" not in text
    # the window lies inside the run: a window that does not fit is refused with the numbers
    code = main(["run", "--out", str(tmp_path / "r2"), *TINY[6:14], *extra, "--set", "steps=60"])
    assert code == 2
    assert (tmp_path / "r2").exists() is False


def test_stage_dependencies_are_checked(capsys, tmp_path):
    code = main(["run", "--out", str(tmp_path / "o"), "--set", "lyapunov.enabled=false"])
    assert code == 2
    assert "instability.enabled: needs lyapunov.enabled = true" in capsys.readouterr().err


def test_devices_and_memory_flags(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--out", str(out), "--quiet", "--devices", "2", "--memory-limit", "1GiB"]
    assert main([*args, *BARE]) == 0
    text = (out / "config.toml").read_text()
    assert "devices = 2" in text and 'memory_limit = "1GiB"' in text
    res = ReplicaResults.load(out / "results.zarr")
    assert int(res.attrs["devices"]) == 2 and "2 device(s)" in res.attrs["memory_plan"]
    capsys.readouterr()
    # a limit below one replica's estimate is refused with the numbers, exit code 2
    code = main(["run", "--out", str(tmp_path / "r2"), "--memory-limit", "1KiB", *BARE])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("chaosjax: error: memory: one replica needs about")


def test_variant_and_size_choose_what_runs(capsys):
    assert main(["config", "cnn-batchnorm", "--variant", "bn-ce"]) == 0
    out = capsys.readouterr().out
    assert out.count("# variant:") == 1 and "# variant: bn-ce" in out
    assert main(["config", "cnn-batchnorm", "--variant", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--variant: unknown 'nope'; allowed: bn-mse, plain-mse, bn-ce, plain-ce" in err
    assert main(["config", "slingshot", "--set", "size=gpu"]) == 0
    out = capsys.readouterr().out
    assert "modulus = 97" in out and "steps = 20000" in out and 'size = "gpu"' in out
    # the overrides still win over the size
    assert main(["config", "slingshot", "--set", "size=gpu", "--set", "steps=100"]) == 0
    assert "steps = 100" in capsys.readouterr().out
    assert main(["config", "quickstart", "--set", "size=gpu"]) == 2
    assert "size: unknown 'gpu'; allowed: none" in capsys.readouterr().err


def test_a_preset_name_wins_over_a_folder_of_that_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "slingshot").mkdir()  # e.g. the output folder of an earlier run
    assert main(["config", "slingshot"]) == 0
    assert 'name = "slingshot"' in capsys.readouterr().out
