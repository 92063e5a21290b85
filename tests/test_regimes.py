"""Regime labels with orbits and the loss-series window (issue 27 item 4 and the η = 5 defect):
every column of the loss-series table on one stated window; end states (dead plateau, frozen,
periodic) with one precedence across the summary."""

import types

import numpy as np
import pytest

from chaosjax.experiments import load_config
from chaosjax.experiments.danovski import series_stage
from chaosjax.experiments.regimes import curvature_words, end_state, regime_of
from chaosjax.losses import constant_loss
from chaosjax.series import zero_one_test


def _batch(n_groups=1):
    coords = {"member": np.zeros(n_groups, int), "seed": np.arange(n_groups),
              "learning_rate": np.full(n_groups, 5.0)}  # fmt: skip
    return types.SimpleNamespace(coords=coords, hparams={"learning_rate": np.full(n_groups, 5.0)})


def test_every_loss_series_column_is_computed_on_the_stated_window():
    # chaotic until step ~737 (logistic map), then frozen at the class-prior entropy
    steps = 8000
    x = np.empty(steps + 1)
    x[0] = 0.3
    for t in range(steps):
        x[t + 1] = 4.0 * x[t] * (1.0 - x[t])
    rng = np.random.default_rng(0)
    loss = np.where(np.arange(steps + 1) < 737, 1.0 + 0.5 * x, 1.097779)
    loss[737:] += 1e-7 * rng.standard_normal(steps + 1 - 737)  # round-off-scale wandering
    cfg = load_config("quickstart", ["series.start=3000", "record_every=1", f"steps={steps}"])
    res = types.SimpleNamespace(
        records={"loss": loss[None]}, steps=np.arange(steps + 1), attrs={"dtype": "float64"}
    )
    ds = series_stage(cfg, _batch(), res)
    whole = zero_one_test(loss, rtol=1e-8)
    assert whole > 0.5  # over the whole series the chaotic transient reads as chaos
    assert np.isnan(ds["k01"].values[0]) and "stalled" in str(ds["k01_reason"].values[0])
    assert ds["frac_increasing"].values[0] == pytest.approx(
        np.mean(np.diff(loss[3000:]) > 0), abs=1e-12
    )
    assert int(ds["n_spikes"].values[0]) == 0
    assert ds.attrs["start"] == 3000


def test_end_states_take_precedence_in_the_regime_and_the_curvature_words():
    assert end_state(1, True) == "dead plateau"
    assert end_state(1, False) == "frozen (fixed point)"
    assert end_state(3, False) == "periodic (period 3)"
    assert end_state(0, False) == "" and end_state(float("nan"), False) == ""
    assert end_state(0, True) == "dead plateau"  # stalled at the prior: the weights may creep
    # dead plateau > frozen > periodic > flat plateau > FTLE regime
    assert regime_of("flat plateau", "intermittent", "dead plateau") == (
        "dead plateau (after: intermittent)"
    )
    assert regime_of("stable", "regular", "periodic (period 3)") == "periodic (period 3)"
    assert regime_of("flat plateau", "regular", "") == "flat plateau"
    assert regime_of("stable after crossing", "intermittent", "") == "intermittent"
    assert curvature_words("flat plateau", "intermittent", "frozen (fixed point)") == (
        "frozen (fixed point)"
    )
    assert curvature_words("stable after crossing", "chaotic throughout") == (
        "below threshold after crossing"
    )
    assert curvature_words("edge of stability", "chaotic throughout") == "edge of stability"
    assert curvature_words("unstable", "regular", "periodic (period 2)") == (
        "above threshold (on the period 2 orbit)"
    )
    assert curvature_words("unstable (diverged at step 3)", "regular", "") == (
        "unstable (diverged at step 3)"
    )


def test_the_cascade_table_keeps_the_doubling_points_in_order():
    from chaosjax.experiments.routes import doubling_points, feigenbaum_ratios

    pts = np.array([1.0, 2.0, 2.5, 2.6, 2.7])
    trans = np.array([[1, 2], [2, 4], [4, 8], [8, 0], [0, 3]])
    np.testing.assert_array_equal(doubling_points(pts, trans), [1.0, 2.0, 2.5])
    np.testing.assert_allclose(feigenbaum_ratios([1.0, 2.0, 2.5, 2.625]), [2.0, 4.0])
    assert doubling_points(pts[1:], trans[1:]).size == 0  # no 1→2 first: no cascade
    assert feigenbaum_ratios([1.0, 2.0]).size == 0


def test_the_dead_plateau_level_is_the_loss_of_the_best_constant_output():
    y = np.array([0, 0, 1, 2, 2, 2])
    p = np.array([2, 1, 3]) / 6
    assert constant_loss("cross_entropy", y) == pytest.approx(-np.sum(p * np.log(p)))
    onehot = np.eye(3)[y]
    assert constant_loss("cross_entropy", onehot) == pytest.approx(-np.sum(p * np.log(p)))
    assert constant_loss("mse", onehot) == pytest.approx(0.5 * np.sum(p * (1 - p)))
    assert np.isnan(constant_loss("custom", y))
