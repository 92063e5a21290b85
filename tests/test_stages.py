"""The stage registry, and the numbers of stages on small synthetic results whose answers are
known (no training run: a constructed ReplicaResults and replica batch)."""

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
    names = list(STAGES)
    yield
    for n in list(STAGES):
        if n not in names:
            STAGES.pop(n)


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
