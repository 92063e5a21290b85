"""Every preset runs end to end at a reduced size and produces every file; report reproduces
the summary from the stored results."""

import tomllib

import pytest

from chaosjax.cli import main
from chaosjax.experiments import load_plan, preset_names
from chaosjax.experiments.stages import enabled_stages
from chaosjax.results import open_group

TINY = {
    "steps": 40,
    "record_every": 5,
    "chunk_steps": 20,
    "replicas.seeds": "[0, 1]",
    "replicas.n_perturbed": 1,
    "lyapunov.steps": 20,
    "lyapunov.ftle_window": 10,
    "lyapunov.fit_starts": "[0, 10, 5]",
    "lyapunov.fit_widths": "[10, 20, 5]",
    "clv.steps": 20,
    "clv.align": 4,
    "clv.backward_transient": 10,
    "curvature.cold_matvecs": 8,
    # no restarts at tiny size (the restarted, converged path is tested in test_trust and run
    # end to end by the default preset in test_cli)
    "curvature.max_matvecs": 8,
    "curvature.density_matvecs": 8,
    "curvature.trace_probes": 4,
    "series.start": 0,
    "series.n_surrogates": 20,
    "marginal.before_end": 10,
    # the CLV and landscape stages are run end to end by tests/test_cli.py (the default
    # preset) and their numbers tested in test_clv / test_landscape: here each preset's own
    # stages run, which keeps the suite under 10 minutes on 2 cores
    "clv.enabled": "false",
    "landscape.enabled": "false",
}
EXTRA = {
    "weight-dynamics": {"replicas.seeds": "[0, 1, 2, 3]"},
    "edge-of-stability": {"model.hidden": "[8]"},
    # the config path of a ResNet (model.kind = "resnet"): tangents and curvature through
    # BatchNorm run in test_real_models and test_config_factories (the NNX case, every stage)
    "cnn-batchnorm": {
        "model.width": 2,
        "model.depth": 1,
        "data.test_fraction": 0.95,
        "lyapunov.enabled": "false",
        "instability.enabled": "false",
        "curvature.enabled": "false",
    },
    # the grokking stage without curvature (its crossing column says n/a; the preconditioned
    # Hessian of a Transformer is compiled in test_your_training and test_real_models)
    "slingshot": {
        "model.d_model": 8,
        "model.n_heads": 2,
        "data.modulus": 7,
        "curvature.enabled": "false",
        "instability.enabled": "false",
    },
    # the uv variant's diagram on a coarse grid (full size: 211 values, RESULTS.md)
    "routes-to-chaos": {
        "lyapunov.enabled": "false",  # the stages of this preset's run are covered elsewhere
        "curvature.enabled": "false",
        "bifurcation.values": "[0.9, 1.3, 21]",
        "bifurcation.steps": 1000,
        "bifurcation.n_samples": 16,
        "bifurcation.max_period": 16,
        "bifurcation.refine_tol": 1e-3,
    },
    "controlled-instability": {
        "model.hidden": "[8]",
        "replicas.seeds": "[0]",
        "control.lyapunov_steps": 10,
        "control.margins": "[1.0]",
        "control.ftle_window": 10,
    },
}


def overrides(name):
    values = {**TINY, **EXTRA.get(name, {})}
    return [x for k, v in values.items() for x in ("--set", f"{k}={v}")]


#: presets that run two variants at tiny size (the per-variant folders and the index); the
#: others run their first variant only (the same stages on other data, losses and models), to
#: keep the suite under 10 minutes on 2 cores
ALL_VARIANTS = {"lr-regimes"}

#: presets whose tiny run is too slow for CI (compiling the controlled maps' tangents takes
#: minutes on 2 cores), or whose stages the suite runs elsewhere at a smaller cost (slingshot
#: and instability-generalization: the grokking and instability stages are tested on
#: synthetic results in tests/test_stages.py and the engine's observers everywhere;
#: training-response: notebook 05 runs the protocol): they run with `pytest -m slow`, to keep
#: the suite under 10 minutes on 2 cores; their full size is in RESULTS.md
SLOW = {"controlled-instability", "slingshot", "instability-generalization", "training-response"}

#: the default preset runs end to end, every stage and the report, in tests/test_cli.py
COVERED = {"quickstart"}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
        for n in preset_names()
        if n not in COVERED
    ],
)
def test_preset_runs_tiny(name, tmp_path):
    out = tmp_path / name
    plan = load_plan(name)
    chosen = []
    if plan[0][0] is not None:
        keep = 2 if name in ALL_VARIANTS else 1  # two variants: the folders and the index
        plan = plan[:keep]
        chosen = [v for v, _ in plan]
    flags = [x for v in chosen for x in ("--variant", v)]
    assert main(["run", name, "--out", str(out), "--quiet", *overrides(name), *flags]) == 0
    folders = [out] if plan[0][0] is None else [out / v for v, _ in plan]
    for f in folders:
        for file in ("config.toml", "results.zarr", "summary.md", "figures/loss.png"):
            assert (f / file).exists(), (f, file)
        cfg = tomllib.loads((f / "config.toml").read_text())
        assert cfg["steps"] == 40
        # every stage the config enables stored its dataset and wrote its section
        sub_summary = (f / "summary.md").read_text()
        for stage in enabled_stages(load_plan(str(f / "config.toml"))[0][1]):
            ds = open_group(f / "results.zarr", stage.name)
            assert ds is not None and ds.data_vars, (f, stage.name)
        assert "## Results per learning rate" in sub_summary
    summary = (out / "summary.md").read_text()
    (out / "summary.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "summary.md").read_text() == summary
