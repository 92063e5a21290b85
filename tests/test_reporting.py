"""The reporting rules (docs/architecture.md), each on constructed input whose answer is known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chaosjax as cj
from chaosjax import control, series
from chaosjax import curvature as cv
from chaosjax.lyapunov import best_window_fit


def test_window_fit_needs_ten_points_and_danovski_acceptance():
    """Records every 10 steps put 3–11 points in Danovski's windows: no fit on 3 points; the
    distances recorded every step give the early growth back."""
    t = np.arange(0, 201)
    d = 1e-8 * np.exp(0.76 * np.minimum(t, 20)) * (1 + 0.01 * np.sin(t))  # saturates at t = 20
    coarse = best_window_fit(t[::10], d[::10], starts=range(0, 101, 5), widths=range(20, 31, 5))
    assert np.isnan(coarse.slope) and not coarse.accepted
    assert "no window holds 10 finite points" in coarse.reason and coarse.n_points == 4
    fine = best_window_fit(t, d, starts=range(0, 101, 5), widths=range(10, 101, 5))
    assert fine.n_points >= 10 and fine.start == 0 and fine.stop <= 20
    assert abs(fine.slope - 0.76) < 0.02 and fine.accepted
    # a good straight line with a slope below 0.05 per step is not accepted
    slow = best_window_fit(t, 1e-3 * np.exp(7e-5 * t))
    assert slow.r2 > 0.99 and abs(slow.slope - 7e-5) < 1e-9 and not slow.accepted
    # a steep but poor fit is not accepted either
    noisy = best_window_fit(t, np.exp(0.1 * t + np.random.default_rng(0).normal(0, 3, t.size)))
    assert noisy.r2 < 0.9 and not noisy.accepted
    with pytest.raises(ValueError, match="min_points"):
        best_window_fit(t, d, min_points=3)


def test_zero_one_test_refuses_a_frozen_series():
    rng = np.random.default_rng(0)
    frozen = 0.49 + 1e-12 * rng.normal(size=2000)
    assert np.isnan(series.zero_one_test(frozen))
    assert "frozen plateau" in series.negligible_variation(frozen)
    # float32 round-off of a frozen value: about 1e-7 of its level
    f32 = np.float32(0.49) + np.float32(1e-7) * rng.integers(-1, 2, 2000).astype(np.float32)
    assert np.isfinite(series.zero_one_test(f32.astype(np.float64)))  # default rtol 1e-8
    assert np.isnan(
        series.zero_one_test(f32.astype(np.float64), rtol=10 * np.finfo(np.float32).eps)
    )
    # a series that moves is tested as before
    assert series.negligible_variation(np.sin(np.arange(2000))) == ""


def test_analogues_do_not_read_a_drift_as_expansion_and_rates_are_per_step():
    t = np.arange(2000)
    drift = series.expansion_rate(0.5 - 1e-6 * np.exp(0.03 * t))
    assert np.isnan(drift.slope) and not drift.expanding and "Theiler" in drift.reason
    line = series.expansion_rate(0.3 + 1e-3 * t)
    assert np.isnan(line.slope) and "straight line" in line.reason
    x = np.empty(10_000)
    x[0] = 0.3
    for i in range(1, x.size):
        x[i] = 4 * x[i - 1] * (1 - x[i - 1])
    per_sample = series.expansion_rate(x, e=1e-3)
    per_step = series.expansion_rate(x, e=1e-3, dt=10)  # a loss recorded every 10 steps
    assert per_sample.expanding and per_step.slope == pytest.approx(per_sample.slope / 10)


def test_recovered_spike_is_not_blamed_for_a_later_divergence():
    loss = np.exp(-np.arange(200) / 60)
    loss[20:25] *= 5.0  # a spike that recovers at step 25
    loss[180:] = np.inf  # a divergence much later
    eps = control.instability_episodes(loss, recovery=20)
    assert [(e.start, e.label) for e in eps] == [(20, "neutral"), (180, "harmful")]
    assert eps[0].numbers["recovered_step"] == 25
    assert "diverged at step 180" in eps[1].reason


def test_block_krylov_does_not_overshoot_an_exhausted_space():
    """A rank-1 operator exhausts the Krylov space after one block: the Ritz value is the
    eigenvalue, with a residual at round-off, not above the spectrum."""
    n = 40
    u = jax.random.normal(jax.random.PRNGKey(3), (n,))
    u = u / jnp.linalg.norm(u)
    lam = 257.67

    def mv(v):
        return lam * u * (u @ v)

    v0 = jax.random.normal(jax.random.PRNGKey(4), (n, 2))
    r = cv.block_krylov_eigs(mv, v0, n_blocks=3)
    assert abs(float(r.eigenvalues[0]) - lam) < 1e-9 * lam
    assert float(r.residuals[0]) < 1e-8 * lam and bool(r.converged[0])
    assert np.all(np.asarray(r.eigenvalues) <= lam * (1 + 1e-12))


def test_tracker_finds_an_eigenvalue_that_overtakes_the_tracked_one():
    """Between two records a lower eigenvalue overtakes the tracked one (the warm start is now
    an eigenvector of eigenvalue 1, the top is 6 along another direction): the block of each
    record holds a fresh random vector, so the tracker finds the new top."""
    from chaosjax import datasets
    from chaosjax.training import TrainingMap

    dim = 12
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(dim, dim)))

    def quadratic_map(a):  # MSE of x·θ with y = 0: H = XᵀX/n = Q diag(a) Qᵀ
        x = np.sqrt(dim) * np.diag(np.sqrt(a)) @ q.T
        ds = datasets.Dataset("quad", x, np.zeros((dim, 1)), x, np.zeros((dim, 1)), "regression")
        return TrainingMap(lambda p, x: x @ p, jnp.ones((dim, 1)), ds, learning_rate=1e-3)

    early = quadratic_map(np.r_[5.0, 4.0, np.full(dim - 2, 0.1)])
    late = quadratic_map(np.r_[1.0, 6.0, np.full(dim - 2, 0.1)])
    tr = cj.CurvatureTracker(k=1, cold_matvecs=dim)
    hp = {k: v[None] for k, v in early.hparams.items()}
    vals0, vecs = tr.init(early, early.init()[None], hp, 0)
    assert abs(float(vals0["sharpness"][0, 0]) - 5.0) < 1e-8
    assert abs(abs(float(np.asarray(vecs)[0, :, 0] @ q[:, 0])) - 1) < 1e-8
    vals, _ = tr.update(late, late.init()[None], hp, vecs, 10)
    assert abs(float(vals["sharpness"][0, 0]) - 6.0) < 1e-8


def test_regime_labels_from_ftle_windows():
    from chaosjax.experiments.analyses import regime

    w = 100
    hot, cold = 0.5, 1e-4  # λ·W = 50 (expanding) and 0.01
    assert regime(np.full(20, cold), w) == "regular"
    assert regime(np.full(20, hot), w) == "chaotic throughout"
    assert regime(np.r_[np.full(5, hot), np.full(15, cold)], w) == "transient chaos then frozen"
    assert regime(np.r_[np.full(15, cold), np.full(5, hot)], w) == "late onset"
    assert regime(np.r_[hot, cold, cold, hot, np.full(10, cold)], w) == "intermittent"
    assert regime(np.full(20, 0.04), w) == "regular"  # λ·W = 4 < 5: not expanding
    assert regime(np.full(20, hot), w, diverged_step=70) == "diverged (step 70)"


def test_sign_of_lambda1_needs_growth_and_three_seeds():
    from chaosjax.experiments.analyses import sign_of

    assert sign_of([0.447, 0.039], 2000).startswith("not claimed (2 seeds)")
    assert sign_of([9e-5, 8e-5, 1e-4], 2000) == "not resolved (|λ1|·T < 5)"  # λ1·T = 0.18
    assert sign_of([0.2, 0.21, 0.19], 2000) == "> 0"
    assert sign_of([-0.2, -0.21, -0.19], 2000) == "< 0"
    # seeds that differ (a plateau, a burst, chaos): beyond 5/T but within 3 SE over seeds
    assert sign_of([0.057, 0.347, 0.771], 2000) == "not resolved (within 3 SE over seeds)"


def test_seed_statistics_are_over_seeds():
    """η = 4 of the quickstart gave seeds 0.447 and 0.039: the spread between seeds is the
    error bar, not the within-run batch means pooled as √(Σse²)/n (0.05 there)."""
    from chaosjax.experiments.stats import over_seeds, seeds_cell

    s = over_seeds([0.447, 0.039])
    assert s.mean == pytest.approx(0.243) and s.sem == pytest.approx(0.204)
    assert seeds_cell([0.447, 0.039]) == "0.243 ± 0.2 (0.447, 0.039)"
    assert "12 seeds, range" in seeds_cell(np.arange(12.0))


def test_flat_plateau_is_its_own_verdict():
    from chaosjax.experiments.analyses import verdict

    n = 200
    ratio = np.r_[np.linspace(1.5, 3.0, 20), np.full(n - 20, 2e-5)]
    stalled = np.r_[np.linspace(0.6, 0.49, 50), np.full(n - 50, 0.49)]
    assert verdict(ratio, -1, stalled)[0] == "flat plateau"
    bursts = ratio.copy()
    bursts[-10] = 1.6
    assert verdict(bursts, -1, stalled)[0] == "flat plateau with bursts"
    converged = np.exp(-np.arange(n) / 10.0)  # the loss went to 0: not a plateau
    assert verdict(ratio, -1, converged)[0] == "stable after crossing"
    assert verdict(ratio, -1)[0] == "stable after crossing"  # no loss: not claimed


def test_threshold_and_eta_t_follow_a_learning_rate_schedule():
    """After a 10× drop the threshold is 2/η_t, not 2/η_peak (the ratio was 10× off)."""
    from chaosjax import datasets, models
    from chaosjax.replicas import make_replicas, run_replicas
    from chaosjax.training import TrainingMap

    net = models.PureMLP((2, 4, 2))
    tm = TrainingMap(
        net.apply,
        net.init_params(jax.random.PRNGKey(0)),
        datasets.two_moons(40),
        learning_rate=0.5,
        schedule="step",
        schedule_options={"boundaries": [30], "factor": 0.1},
    )
    assert tm.learning_rate_source == "schedule"
    eta, why = tm.learning_rates(np.arange(60))
    np.testing.assert_allclose(eta, np.r_[np.full(30, 0.5), np.full(30, 0.05)])
    res = run_replicas(tm, make_replicas(tm), steps=60, record_every=10, progress=False,
                       trackers=[cj.CurvatureTracker(k=1, cold_matvecs=8)])  # fmt: skip
    np.testing.assert_allclose(res.records["threshold"][0], [4, 4, 4, 40, 40, 40, 40])
    # a ready GradientTransformation does not expose η: NaN with the reason, not a guess
    import optax

    fixed = TrainingMap(net.apply, net.init_params(jax.random.PRNGKey(0)),
                        datasets.two_moons(40), optimizer=optax.sgd(0.1))  # fmt: skip
    assert fixed.learning_rate_source == "unknown"
    eta, why = fixed.learning_rates(np.arange(3))
    assert eta is None and "inject_hyperparams" in why
    assert np.isnan(float(fixed.learning_rate_at(fixed.init(), 0)))
    injected = TrainingMap(net.apply, net.init_params(jax.random.PRNGKey(0)),
                           datasets.two_moons(40),
                           optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))  # fmt: skip
    assert injected.learning_rate_source == "state"
    assert float(injected.learning_rate_at(injected.init(), 0)) == pytest.approx(0.1)


def test_grokking_rule_counts_enrichment_not_any_event_in_a_window():
    from chaosjax.experiments.grokking import _coincidence
    from chaosjax.series import spike_mask

    loss = np.array([3.0, 1.0, 0.5, 0.2, 0.1, 0.5, 0.15, 0.25, 0.3, 0.35, 0.4])
    # a sudden rise is a spike; the slow drift after it (weight decay lifting the loss) is not
    assert np.flatnonzero(spike_mask(loss, factor=2.0, lookback=2)).tolist() == [5]
    # against the running minimum the drift keeps firing
    assert np.flatnonzero(spike_mask(loss, factor=2.0)).tolist() == [5, 7, 8, 9, 10]
    yes = np.ones(3, bool)
    assert _coincidence(np.array([0.5, 0.4, 0.0]), np.array([0.1, 0.1, 0.1]), yes).startswith(
        "yes (2/3 enriched"
    )
    # an indicator as frequent before the jump as elsewhere does not coincide with it
    assert _coincidence(np.array([0.2, 0.2, 0.2]), np.array([0.2, 0.15, 0.2]), yes).startswith(
        "no (0/3"
    )
    assert _coincidence(np.array([1.0, 1.0]), np.array([0.6, 0.7]), yes[:2]).startswith("always on")
    assert _coincidence(np.array([0.5]), np.array([0.1]), np.zeros(1, bool)) == "n/a"
