"""The stage registry (and a stage declared in one module), and the numbers of stages on small synthetic results whose answers are
known (no training run: a constructed ReplicaResults and replica batch)."""

import dataclasses
import tomllib
from types import SimpleNamespace

import numpy as np
import pytest
import xarray as xr

from chaosjax.experiments import load_plan
from chaosjax.experiments.config import ConfigError
from chaosjax.experiments.stages import (
    STAGES,
    ReportInputs,
    RunInputs,
    Stage,
    enabled_stages,
    observers_of,
    register_stage,
    render_stages,
    run_stages,
)
from chaosjax.results import ReplicaResults


def load_config(preset, overrides=()):
    """The config of a preset (its first variant)."""
    return load_plan(preset, list(overrides))[0][1]


def synthetic(records, *, seeds=(0, 1), lrs=(0.5,), eps=1e-8, n_perturbed=2, steps=None):
    """A batch and results of seeds × η × (1 reference + n_perturbed) replicas."""
    coords = {k: [] for k in ("seed", "learning_rate", "member", "reference", "eps")}
    for s in seeds:
        for lr in lrs:
            ref = len(coords["seed"])
            for m in range(n_perturbed + 1):
                coords["seed"].append(s)
                coords["learning_rate"].append(lr)
                coords["member"].append(m)
                coords["reference"].append(ref)
                coords["eps"].append(0.0 if m == 0 else eps)
    coords = {k: np.asarray(v) for k, v in coords.items()}
    n = len(coords["seed"])
    recs = {k: (v(coords) if callable(v) else v) for k, v in records.items()}
    n_t = next(iter(recs.values())).shape[1]
    steps = np.arange(n_t) if steps is None else np.asarray(steps)
    batch = SimpleNamespace(coords=coords, hparams={"learning_rate": coords["learning_rate"]})
    res = ReplicaResults(
        steps=steps,
        records=recs,
        final_state=np.zeros((n, 3)),
        diverged_step=np.full(n, -1),
        coords=coords,
    )
    return batch, res


def test_divergence_stage_recovers_a_known_exponent_and_applies_acceptance():
    t = np.arange(61)

    def distances(c):
        rate = np.where(c["seed"] == 0, 0.2, 0.0)[:, None]  # seed 0 separates, seed 1 does not
        return np.where(c["member"][:, None] > 0, 1e-8 * np.exp(rate * t), 0.0)

    batch, res = synthetic({"distance_l1": distances}, steps=t)
    cfg = load_config("lr-regimes", ["lyapunov.fit_starts=[0, 10, 5]",
                                     "lyapunov.fit_widths=[20, 40, 10]"])  # fmt: skip
    ds = STAGES["divergence"].run(RunInputs(cfg, None, batch, res, {}))
    np.testing.assert_allclose(ds["slope"].values[:, 0], [0.2, 0.0], atol=1e-9)
    assert ds["accepted"].values[:, 0].tolist() == [1, 0]  # slope 0 is below min_slope
    np.testing.assert_allclose(ds["max_growth"].values[0, 0], np.exp(0.2 * 60), rtol=1e-9)
    assert ds["points"].values[0, 0] >= 10
    text = "\n".join(STAGES["divergence"].markdown(ds, None))
    assert "1/2" in text  # accepted n/N over seeds


def test_target_stage_finds_the_first_step_at_the_target():
    def acc(c):
        ramp = np.linspace(0.0, 1.0, 11)[None, :] * np.where(c["seed"] == 0, 1.0, 0.5)[:, None]
        return ramp

    batch, res = synthetic({"test_accuracy": acc}, steps=np.arange(0, 110, 10))
    cfg = load_config("onset-of-chaos", ["target.test_accuracy=0.8"])
    ds = STAGES["target"].run(RunInputs(cfg, None, batch, res, {}))
    got = ds["steps_to_target"].values
    assert got[0] == 80 and np.isnan(got[1])  # seed 1 peaks at 0.5: never, NaN not a number
    np.testing.assert_allclose(ds["final_test_accuracy"].values, [1.0, 0.5])


def test_prediction_stage_correlates_early_exponents_with_final_loss():
    lam = np.array([0.1, 0.3, 0.2, 0.5, 0.4])

    def loss(c):
        final = np.repeat(2.0 * lam, 1)  # one replica per seed: final loss = 2 λ1
        return np.stack([np.ones_like(final), final], axis=1)

    batch, res = synthetic({"loss": loss}, seeds=range(5), n_perturbed=0)
    lyap = xr.Dataset({"exponents": (("group", "exponent"), lam[:, None])}, attrs={"steps": 100})
    cfg = load_config("weight-dynamics")
    ds = STAGES["prediction"].run(RunInputs(cfg, None, batch, res, {"lyapunov": lyap}))
    np.testing.assert_allclose([ds["pearson"].item(), ds["spearman"].item()], [1.0, 1.0])
    assert ds["auc"].item() == 1.0 and ds["n"].item() == 5


def test_phases_follow_the_rule():
    from chaosjax.experiments.protocols import phases

    t = np.arange(10) * 10.0
    f = np.array([1.0, 0.9, 0.6, 0.3, 0.2, 0.15, 0.05, 0.0, -0.02, 0.01])
    exp_end, ref_start = phases(f, t)
    assert exp_end == 20.0  # last of the leading run at ≥ half the peak
    assert ref_start == 50.0  # the trailing run with |λ| ≤ 0.1 × peak starts after step 50
    assert np.isnan(phases(np.full(4, np.nan), t[:4])[0])


# ---------------------------------------------------------------------------------------------
# the registry


@pytest.fixture
def scratch_stage():
    """The registry as it was, after the test (stages added and stages replaced)."""
    saved = dict(STAGES)
    yield
    STAGES.clear()
    STAGES.update(saved)


def _ds(value):
    return xr.Dataset({"v": ((), value)})


def test_registry_order_requires_observers_and_report(scratch_stage, tmp_path):
    seen = {}

    def first(inputs):
        return _ds(1.0)

    def second(inputs):
        seen["groups"] = sorted(inputs.groups)
        return _ds(float(inputs.groups["first_x"]["v"]) + 1)

    register_stage(Stage("first_x", lambda c: True, first, lambda ds, r: ["## first"],
                         observers=lambda c, m: [("obs", 1)]))  # fmt: skip
    register_stage(Stage("second_x", lambda c: True, second, lambda ds, r: ["## second"],
                         requires=("first_x",), observers=lambda c, m: [("obs", 1)]))  # fmt: skip
    with pytest.raises(ValueError, match="registered already"):
        register_stage(Stage("first_x", lambda c: True, first, lambda ds, r: []))
    with pytest.raises(ValueError, match="needs nope registered before it"):
        register_stage(Stage("third_x", lambda c: True, first, lambda d, r: [], requires=("nope",)))
    with pytest.raises(ValueError, match="identifier"):
        Stage("a-b", lambda c: True, first, lambda d, r: [])
    cfg = load_config("quickstart")
    assert observers_of(cfg, None).count(("obs", 1)) == 1  # asked twice, runs once
    inputs = RunInputs(cfg, None, None, None, {})
    only = {k: STAGES[k] for k in ("first_x", "second_x")}
    saved = dict(STAGES)
    STAGES.clear()
    STAGES.update(only)
    try:
        groups = run_stages(inputs)
        lines = render_stages(ReportInputs(None, groups, tmp_path))
    finally:
        STAGES.clear()
        STAGES.update(saved)
    assert seen["groups"] == ["first_x"] and float(groups["second_x"]["v"]) == 2.0
    assert lines == ["## first", "## second"]


def test_a_required_stage_that_is_off_is_a_config_error(scratch_stage):
    register_stage(Stage("needs_ly", lambda c: True, lambda i: _ds(0.0), lambda d, r: [],
                         requires=("lyapunov",)))  # fmt: skip
    cfg = load_config("quickstart", ["lyapunov.enabled=false", "instability.enabled=false"])
    with pytest.raises(ConfigError, match=r"needs_ly\.enabled: needs lyapunov\.enabled = true"):
        enabled_stages(cfg)


def test_instability_stage_finds_layer_separation_reconvergence_and_phases():
    cfg = load_config("quickstart")
    f, keep = cfg.instability.separation_factor, cfg.instability.reconverge_fraction
    t = np.arange(0, 110, 10)
    up = np.concatenate([np.geomspace(1.0, 10 * f, 6), np.full(5, 0.5 * keep * 10 * f)])

    def layer_distance(c):
        out = np.zeros((c["seed"].size, t.size, 2))
        out[c["member"] > 0, :, 0] = up  # separates (step 50 passes f×), then re-converges
        out[c["member"] > 0, :, 1] = 1.0  # never separates
        return out

    batch, res = synthetic({"layer_distance": layer_distance}, seeds=(0,), steps=t)
    res.layer_names = ("hidden", "output")
    ftle = np.array([1.0, 0.8, 0.3, 0.05, 0.0])[None, :, None]
    lyap = xr.Dataset(
        {"ftle": (("group", "window", "exponent"), ftle)},
        coords={"window_end": ("window", [20, 40, 60, 80, 100])},
        attrs={"ftle_window": 20},
    )
    ds = STAGES["instability"].run(RunInputs(cfg, None, batch, res, {"lyapunov": lyap}))
    first = t[np.argmax(up >= f * up[0])]
    assert ds["separation_step"].values[0, 0] == first
    assert np.isnan(ds["separation_step"].values[0, 1])
    assert ds["reconverged"].values[0].tolist() == [1, 0]
    np.testing.assert_allclose(ds["peak_distance"].values[0], [up.max(), 1.0])
    assert ds["exploration_end"].item() == 40.0 and ds["refining_start"].item() == 60.0


# ---------------------------------------------------------------------------------------------
# a stage is one module: its section, checks, observers, run and rendering

MY_STAGE = '''
import dataclasses

import xarray as xr

from chaosjax.experiments._sections import ConfigError, fld
from chaosjax.experiments.stages.base import Stage


@dataclasses.dataclass(frozen=True)
class MyStageConfig:
    """the final loss, scaled"""

    enabled: bool = fld(False, "report the scaled final loss")
    factor: float = fld(2.0, "the scale", positive=True)


def check(cfg):
    if cfg.my_stage.enabled and cfg.my_stage.factor > cfg.steps:
        raise ConfigError(f"my_stage.factor: must be <= steps={cfg.steps}, got {cfg.my_stage.factor}")


def run(inputs):
    final = float(inputs.results.records["loss"][:, -1].mean())
    return xr.Dataset({"scaled": ((), inputs.cfg.my_stage.factor * final)})


def markdown(ds, report):
    return ["## My stage", "", f"scaled final loss {float(ds['scaled']):.3g}", ""]


STAGE = Stage(
    "my_stage",
    enabled=lambda cfg: cfg.my_stage.enabled,
    run=run,
    markdown=markdown,
    section=MyStageConfig,
    check=check,
)
'''


def _module(tmp_path, name, text):
    import importlib.util

    path = tmp_path / f"{name}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_builtin_stage_is_declared_in_one_module():
    from chaosjax.experiments.config import ExperimentConfig
    from chaosjax.experiments.stages import BUILTIN_STAGES

    assert list(STAGES)[: len(BUILTIN_STAGES)] == [s.name for s in BUILTIN_STAGES]
    tables = {f.name: f.type for f in dataclasses.fields(ExperimentConfig)}
    for s in BUILTIN_STAGES:
        module = f"chaosjax.experiments.stages.{s.name}"
        assert s.section.__module__ == module and tables[s.name] is s.section, s.name
        for part in (s.run, s.markdown, s.check, s.figures, s.observers, s.validate):
            if part is not None and "<" not in part.__qualname__:  # not a lambda or a closure
                assert part.__module__ == module, (s.name, part)


def test_a_new_stage_module_with_a_section_composes_into_a_config_and_runs(tmp_path):
    """The built-in path: a module with a section and a check, added to the stage list, gives a
    config with its table (TOML, --set, to_toml, describe) and runs. (At run time a stage
    cannot bring a section: see the next test.)"""
    from chaosjax.experiments.config import (
        apply_overrides,
        config_class,
        describe,
        from_dict,
        to_toml,
    )
    from chaosjax.experiments.stages import BUILTIN_STAGES

    my = _module(tmp_path, "my_stage", MY_STAGE)
    Config = config_class([*BUILTIN_STAGES, my.STAGE])
    data = apply_overrides({"steps": 20, "record_every": 10}, ["my_stage.enabled=true",
                                                               "my_stage.factor=3"])  # fmt: skip
    cfg = from_dict(Config, data)
    assert cfg.my_stage.factor == 3.0
    text = to_toml(cfg)
    assert text.index("[my_stage]") > text.index("[control]")
    assert text.index("[my_stage]") < text.index("[scale]")
    assert from_dict(Config, tomllib.loads(text)) == cfg  # round trip
    assert ("my_stage.factor", "2.0", "the scale") in describe(Config)
    with pytest.raises(ConfigError, match=r"my_stage\.factor: must be <= steps=20, got 30\.0"):
        from_dict(Config, apply_overrides(data, ["my_stage.factor=30"]))
    with pytest.raises(ConfigError, match=r"my_stage\.factor: must be > 0"):
        from_dict(Config, apply_overrides(data, ["my_stage.factor=-1"]))
    with pytest.raises(ConfigError, match=r"lyapunov\.warmup: leaves no renormalisation"):
        from_dict(Config, apply_overrides(data, ["lyapunov.warmup=30"]))  # built-in checks run

    batch, res = synthetic({"loss": np.ones((6, 3))})
    saved = dict(STAGES)
    STAGES.clear()
    STAGES["my_stage"] = my.STAGE
    try:
        groups = run_stages(RunInputs(cfg, None, batch, res, {}))
        lines = render_stages(ReportInputs(res, groups, tmp_path))
    finally:
        STAGES.clear()
        STAGES.update(saved)
    assert float(groups["my_stage"]["scaled"]) == 3.0
    assert lines[0] == "## My stage" and "3" in lines[2]


def test_a_stage_registered_at_run_time_checks_and_runs_without_a_section(scratch_stage, tmp_path):
    my = _module(tmp_path, "my_stage_rt", MY_STAGE)
    with pytest.raises(ValueError, match="section: stage 'my_stage' brings a config section"):
        register_stage(my.STAGE)

    def check(cfg):
        if cfg.series.enabled and cfg.series.max_lag > 40:
            raise ConfigError(f"series.max_lag: my stage needs <= 40, got {cfg.series.max_lag}")

    stage = Stage("lag_x", lambda c: c.series.enabled, lambda i: _ds(float(i.cfg.series.max_lag)),
                  lambda ds, r: ["## lag"], check=check)  # fmt: skip
    register_stage(stage)
    with pytest.raises(ConfigError, match=r"series\.max_lag: my stage needs <= 40, got 50"):
        load_config("quickstart", ["series.enabled=true", "series.max_lag=50"])
    cfg = load_config("quickstart", ["series.enabled=true", "series.max_lag=30"])
    assert stage in enabled_stages(cfg)
    assert float(stage.run(RunInputs(cfg, None, None, None, {}))["v"]) == 30.0
    # a replacement of a built-in stage keeps its section
    register_stage(dataclasses.replace(STAGES["series"], check=check), replace=True)
    with pytest.raises(ConfigError, match="my stage needs <= 40"):
        load_config("quickstart", ["series.enabled=true", "series.max_lag=50"])


def test_config_choices_come_from_the_registries():
    from chaosjax.datasets import LOADERS
    from chaosjax.experiments._sections import DataConfig, ModelConfig, TrainingConfig
    from chaosjax.losses import LOSSES
    from chaosjax.models import ACTIVATIONS, INITS
    from chaosjax.optimizers import OPTIMIZERS

    def choices(cls, name):
        return next(f for f in dataclasses.fields(cls) if f.name == name).metadata["choices"]

    assert choices(DataConfig, "name") == tuple(LOADERS)
    assert choices(ModelConfig, "activation") == tuple(ACTIVATIONS)
    assert choices(ModelConfig, "init") == tuple(INITS)
    assert choices(TrainingConfig, "loss") == tuple(LOSSES)
    assert choices(TrainingConfig, "optimizer") == tuple(OPTIMIZERS)
    with pytest.raises(ConfigError, match=r"data\.name: unknown 'nope'; allowed: iris, digits"):
        load_config("quickstart", ["data.name=nope"])
