"""Orbits and bifurcations: periods of series, periodic orbits by Newton–Krylov with their
Floquet multipliers against closed forms, and bifurcation points found by one batched run.

Everything in float64. Closed forms are derived here, never taken from chaosjax's output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chaosjax as cj
from chaosjax import orbits, systems

jax.config.update("jax_enable_x64", True)


def logistic(x, t, r):
    return r * x * (1.0 - x)


def _series(step, x0, n):
    out = [np.asarray(x0, np.float64)]
    for t in range(n - 1):
        out.append(np.asarray(step(out[-1], t), np.float64))
    return np.stack(out)


# ---------------------------------------------------------------------------------------------
# detect_period


def test_detect_period_on_known_series():
    three = np.tile([[0.1, 1.0], [0.7, -2.0], [0.4, 0.5]], (40, 1))
    assert orbits.detect_period(three) == 3
    assert orbits.detect_period(np.full((50, 4), 0.25)) == 1
    chaos = _series(lambda x, t: 4.0 * x * (1.0 - x), [0.3], 4000)
    assert orbits.detect_period(chaos) == 0
    # a settled logistic 4-cycle at r = 3.5 (the 4-cycle multiplier is -0.87...)
    four = _series(lambda x, t: 3.5 * x * (1.0 - x), [0.3], 3000)
    assert orbits.detect_period(four) == 4
    # a window too short for two cycles of the period: not reported
    assert orbits.detect_period(three[:10], window=5) == 0
    assert orbits.detect_period(three, window=6, max_period=2) == 0
    # NaN in the window: no period
    bad = np.array(three, float)
    bad[-1, 0] = np.nan
    assert orbits.detect_period(bad) == 0


def test_detect_period_tolerance_is_relative_to_the_states_scale():
    rng = np.random.default_rng(0)
    base = np.tile([[1.0], [3.0]], (50, 1)) * 1e6
    noisy = base * (1 + 1e-9 * rng.normal(size=base.shape))
    assert orbits.detect_period(noisy, tol=1e-7) == 2
    assert orbits.detect_period(noisy, tol=1e-12) == 0
    decay = 0.5 ** np.arange(200.0)[:, None]  # geometric decay to the origin
    assert orbits.detect_period(decay) == 0
    assert orbits.detect_period(decay, scale=1.0) == 1


def test_period_tracker_observes_the_running_run():
    """The same rule inside the engine's chunks: period at every record, NaN until the window
    is full, beside a LyapunovTracker on the same run."""
    from chaosjax.lyapunov import _prepare

    rs = jnp.array([2.9, 3.2, 3.5, 4.0])
    step, batch, _ = _prepare(logistic, jnp.full((4, 1), 0.3), True, rs)
    res = cj.run_replicas(
        step, batch, steps=2000, record_every=100, progress=False,
        trackers=[orbits.PeriodTracker(window=64), cj.LyapunovTracker(rows="all")],
    )  # fmt: skip
    period = res.records["period"]
    assert np.all(np.isnan(period[:, 0]))
    np.testing.assert_array_equal(period[:, -1], [1, 2, 4, 0])
    # the host rule on the same trajectory's last 64 states agrees
    tail = _series(lambda x, t: 3.5 * x * (1 - x), [0.3], 2001)[-64:]
    assert orbits.detect_period(tail, window=64) == 4
    assert res.records["ftle"][3, -1, 0] > 0.3
    with pytest.raises(ValueError, match=r"^window: must be an integer >= 2"):
        cj.run_replicas(step, batch, steps=10, trackers=[orbits.PeriodTracker(window=1)])


# ---------------------------------------------------------------------------------------------
# periodic orbits against closed forms


def test_henon_fixed_points_and_two_cycle_with_their_multipliers():
    a, b = 1.4, 0.3
    h = systems.Henon(a, b)
    # fixed points: a x² + (1 − b) x − 1 = 0, y = b x; J = [[−2a x, 1], [b, 0]]
    for sign in (+1, -1):
        x = (-(1 - b) + sign * np.sqrt((1 - b) ** 2 + 4 * a)) / (2 * a)
        guess = jnp.array([x + 0.05, b * x - 0.02])
        o = orbits.find_periodic_orbit(h.step, guess, 1)
        assert o.converged and o.residual <= 1e-10
        np.testing.assert_allclose(o.points[0], [x, b * x], atol=1e-12)
        mu = np.sort(
            np.real([-a * x + np.sqrt(a * a * x * x + b), -a * x - np.sqrt(a * a * x * x + b)])
        )
        np.testing.assert_allclose(np.sort(o.multipliers.real), mu, atol=1e-10)
        assert not o.stable  # both fixed points of (1.4, 0.3) are saddles
    # 2-cycle: x1 + x2 = (1 − b)/a, x1² + x2² = (2 − (1 − b)²/a)/a, y1 = b x2, y2 = b x1
    s = (1 - b) / a
    q = (2 - (1 - b) ** 2 / a) / a
    p = (s * s - q) / 2
    x1, x2 = (s + np.sqrt(s * s - 4 * p)) / 2, (s - np.sqrt(s * s - 4 * p)) / 2
    o = orbits.find_periodic_orbit(h.step, jnp.array([x1 + 0.03, b * x2 - 0.01]), 2)
    assert o.converged and o.residual <= 1e-10 and o.points.shape == (2, 2)
    pts = o.points[np.argsort(-o.points[:, 0])]
    np.testing.assert_allclose(pts, [[x1, b * x2], [x2, b * x1]], atol=1e-12)
    # J(x2) J(x1): det b², trace 4a² x1 x2 + 2b
    tr, det = 4 * a * a * x1 * x2 + 2 * b, b * b
    mu = np.sort([(tr + np.sqrt(tr * tr - 4 * det)) / 2, (tr - np.sqrt(tr * tr - 4 * det)) / 2])
    np.testing.assert_allclose(np.sort(o.multipliers.real), mu, atol=1e-9)
    np.testing.assert_allclose(o.multipliers.imag, 0, atol=1e-12)
    assert not o.stable


def test_gd_on_a_quadratic_fixed_point_with_multipliers_one_minus_eta_a():
    eig = (1.0, 5.0, 12.0, 25.0)
    for eta, stable in ((0.05, True), (0.1, False)):  # 1 − 0.1·25 = −1.5: unstable
        q = systems.QuadraticGD(learning_rate=eta, eigenvalues=eig, seed=3)
        o = orbits.find_periodic_orbit(q.step, q.x0, 1)
        assert o.converged and o.residual <= 1e-10
        np.testing.assert_allclose(o.points[0], 0.0, atol=1e-12)
        want = sorted(1 - eta * np.asarray(eig), key=lambda m: -abs(m))
        np.testing.assert_allclose(o.multipliers.real, want, atol=1e-12)
        assert o.stable is stable


def test_period_three_orbit_of_a_constructed_map():
    """(x, y) ↦ (r x(1 − x), ½ y) just inside the logistic period-3 window (opened by a
    saddle-node at r = 1 + √8): a stable 3-cycle whose multipliers are ∏ r(1 − 2x_i) and ⅛."""
    r = 1 + np.sqrt(8) + 2e-3

    def step(z, t):
        return jnp.stack([r * z[0] * (1 - z[0]), 0.5 * z[1]])

    x = 0.3
    for _ in range(2000):
        x = r * x * (1 - x)
    o = orbits.find_periodic_orbit(step, jnp.array([x + 1e-3, 0.7]), 3)
    assert o.converged and o.residual <= 1e-10 and o.points.shape == (3, 2)
    for i in range(3):
        np.testing.assert_allclose(
            np.asarray(step(o.points[i], 0)), o.points[(i + 1) % 3], atol=1e-12
        )
    assert min(abs(o.points[i, 0] - o.points[i - 1, 0]) for i in range(3)) > 0.1  # period 3
    np.testing.assert_allclose(o.points[:, 1], 0.0, atol=1e-12)
    mu = np.prod(r * (1 - 2 * o.points[:, 0]))
    np.testing.assert_allclose(sorted(o.multipliers.real), sorted([mu, 0.125]), atol=1e-10)
    assert abs(mu) < 1 and o.stable


def test_arnoldi_multipliers_above_the_dense_size_match_the_dense_ones():
    q = systems.QuadraticGD(learning_rate=0.05, eigenvalues=(1.0, 5.0, 12.0, 25.0, 30.0, 38.0))
    dense = orbits.find_periodic_orbit(q.step, q.x0, 2, n_multipliers=3)
    krylov = orbits.find_periodic_orbit(q.step, q.x0, 2, n_multipliers=3, dense_max=0)
    np.testing.assert_allclose(krylov.multipliers, dense.multipliers, atol=1e-10)
    np.testing.assert_allclose(dense.multipliers.real, (1 - 0.05 * np.array([1.0, 38.0, 5.0])) ** 2)


# ---------------------------------------------------------------------------------------------
# a training map that locks


def _square_model(eta):
    """GD on ½(w² − 1)² (one example, f = w² x): λ = L''(1) = 4, so 2/λ = 0.5; the step
    w ↦ w − 2ηw(w² − 1) has f'(w) = 1 − 2η(3w² − 1)."""
    ds = cj.Dataset.from_arrays(np.ones((1, 1)), np.ones((1, 1)))
    return cj.TrainingMap(
        lambda p, x: p["w"] ** 2 * x, {"w": jnp.asarray([1.2])}, ds, loss="mse",
        optimizer="sgd", learning_rate=eta,
    )  # fmt: skip


def test_training_map_locks_onto_a_fixed_point_and_a_two_cycle():
    for eta in (0.45, 0.55):
        tm = _square_model(eta)
        s = tm.init()
        for t in range(300):
            s = tm.step(s, t)
        k = 1 if eta < 0.5 else 2
        o = orbits.find_periodic_orbit(tm, s, k)
        assert o.converged and o.residual <= 1e-10 and o.stable
        w = o.points[:, 0]
        deriv = np.prod(1 - 2 * eta * (3 * w**2 - 1))
        np.testing.assert_allclose(o.multipliers[0].real, deriv, atol=1e-10)
        if k == 1:
            np.testing.assert_allclose(w, [1.0], atol=1e-12)
            np.testing.assert_allclose(deriv, 1 - 4 * eta, atol=1e-12)
        else:
            assert abs(w[0] - w[1]) > 0.1
        # the unstable fixed point beyond 2/λ is found from the cycle too
    o1 = orbits.find_periodic_orbit(tm.step, s, 1)
    assert o1.converged and not o1.stable
    np.testing.assert_allclose(o1.multipliers[0].real, 1 - 4 * 0.55, atol=1e-10)


def test_bifurcation_of_a_training_map_at_two_over_lambda():
    tm = _square_model(0.45)
    etas = np.linspace(0.4, 0.6, 41)
    b = cj.bifurcation(tm, tm.init(), etas, steps=600, n_samples=16, refine_tol=1e-4)
    assert b.samples.shape == (41, 16) and b.periods.shape == (41,)
    assert np.all(b.periods[etas < 0.48] == 1) and np.all(b.periods[etas > 0.52] == 2)
    assert b.points.size == 1 and abs(b.points[0] - 0.5) <= 1e-4
    assert b.transitions.tolist() == [[1, 2]]
    # λ1 below 2/λ is log|1 − 4η| (the fixed point's multiplier)
    low = etas < 0.47
    np.testing.assert_allclose(b.lyapunov[low], np.log(np.abs(1 - 4 * etas[low])), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the logistic cascade


def test_logistic_period_doubling_points_by_one_batched_run():
    """r1 = 3, r2 = 1 + √6, r3 = 3.5440904, r4 = 3.5644073 (8 → 16), each to refine_tol.

    Settings: 150 values in [2.9, 3.567], 2000 steps, max_period 16 (window 1024 steps, the
    transient the first 976), refine_tol 1e-4: the simulated period near a doubling does not
    settle (multiplier → −1), the bisection classifies by the orbit's own stability."""
    exact = np.array([3.0, 1 + np.sqrt(6), 3.5440903596, 3.5644072661])
    values = np.linspace(2.9, 3.567, 150)
    b = cj.bifurcation(logistic, jnp.array([0.3]), values, steps=2000, refine_tol=1e-4)
    assert b.info["transient"] == 976 and b.info["window"] == 1024
    assert b.points.size == 4
    np.testing.assert_array_less(np.abs(b.points - exact), 1e-4)
    assert b.transitions.tolist() == [[1, 2], [2, 4], [4, 8], [8, 16]]
    # periods, λ1 and samples of settled values
    i = np.argmin(np.abs(values - 3.2))
    r = values[i]
    assert b.periods[i] == 2 and b.certified[i] == 2
    # the 2-cycle: x = (r + 1 ± √((r + 1)(r − 3))) / 2r; λ1 = ½ log|f'(x1) f'(x2)| = ½ log|4 + 2r − r²|
    cycle = (r + 1 + np.array([-1, 1]) * np.sqrt((r + 1) * (r - 3))) / (2 * r)
    np.testing.assert_allclose(np.unique(np.round(b.samples[i], 9)), cycle, atol=1e-9)
    np.testing.assert_allclose(b.lyapunov[i], 0.5 * np.log(abs(4 + 2 * r - r * r)), atol=1e-6)
    j = np.argmin(np.abs(values - 2.95))
    assert b.periods[j] == 1
    np.testing.assert_allclose(b.lyapunov[j], np.log(abs(2 - values[j])), atol=1e-4)
    fig = orbits.plot_bifurcation(b)
    assert len(fig.axes) == 2
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_bifurcation_falls_back_on_the_runs_period_where_no_orbit_certifies():
    """(x, y) ↦ (r x(1 − x), y): the neutral y (multiplier exactly 1) keeps every orbit from
    being "stable", so the points come from the run's own periods, with its unsettled zone
    around r = 3 (the documented bias: within about ln(1/tol)/(window·|1 − |μ||))."""

    def step(z, t, r):
        return jnp.stack([r * z[0] * (1 - z[0]), z[1]])

    b = cj.bifurcation(step, jnp.array([0.3, 0.5]), np.linspace(2.8, 3.2, 41), refine_tol=1e-4)
    assert b.points.size >= 1 and np.all(np.abs(b.points - 3.0) < 0.02)
    assert b.transitions[0, 0] == 1 and b.transitions[-1, 1] == 2
    assert np.all(b.periods[:15] == 1) and np.all(b.periods[-15:] == 2)


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs_raise_one_line_value_errors():
    h = systems.Henon()
    for period in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match=r"^period: must be an integer >= 1"):
            orbits.find_periodic_orbit(h.step, h.x0, period)
    with pytest.raises(ValueError, match=r"^x0: must be finite"):
        orbits.find_periodic_orbit(h.step, jnp.array([np.nan, 0.0]), 1)
    for tol in (0.0, -1e-3, np.nan):
        with pytest.raises(ValueError, match=r"^tol: must be a positive finite number"):
            orbits.find_periodic_orbit(h.step, h.x0, 1, tol=tol)
        with pytest.raises(ValueError, match=r"^tol: must be a positive finite number"):
            orbits.detect_period(np.ones((10, 2)), tol=tol)
    with pytest.raises(ValueError, match=r"^states: need at least 2 rows"):
        orbits.detect_period(np.ones((1, 3)))
    with pytest.raises(ValueError, match=r"^window: must be an integer in \[2, 10\]"):
        orbits.detect_period(np.ones((10, 2)), window=11)
    with pytest.raises(ValueError, match=r"^window: must be an integer in \[2, 10\]"):
        orbits.detect_period(np.ones((10, 2)), window=1)
    with pytest.raises(ValueError, match=r"^max_period: must be an integer >= 1"):
        orbits.detect_period(np.ones((10, 2)), max_period=0)
    for values in ([2.9, np.nan], [3.0, np.inf], []):
        with pytest.raises(ValueError, match=r"^values: must be a 1-D sequence of finite"):
            cj.bifurcation(logistic, jnp.array([0.3]), values, steps=100)
    with pytest.raises(ValueError, match=r"^refine_tol: must be a positive finite number"):
        cj.bifurcation(logistic, jnp.array([0.3]), [3.0, 3.1], steps=100, refine_tol=0)
    with pytest.raises(ValueError, match=r"^x0: must be finite"):
        cj.bifurcation(logistic, jnp.array([np.inf]), [3.0, 3.1], steps=100)
    with pytest.raises(ValueError, match=r"^param: unknown 'momentum'"):
        tm = _square_model(0.45)
        cj.bifurcation(tm, tm.init(), [0.4, 0.5], steps=100, param="momentum")
    for e in (ValueError,):
        try:
            orbits.detect_period(np.ones((10, 2)), window=11)
        except e as err:
            assert "\n" not in str(err)


def test_a_scalar_state_is_a_map_of_one_coordinate():
    r = 3.2
    orbit = orbits.find_periodic_orbit(lambda x, t: r * x * (1 - x), 0.5, 2)
    root = np.sqrt((r + 1) * (r - 3))
    want = np.sort([(r + 1 - root) / (2 * r), (r + 1 + root) / (2 * r)])
    np.testing.assert_allclose(np.sort(np.asarray(orbit.points).ravel()), want, atol=1e-10)
    np.testing.assert_allclose(orbit.multipliers[0].real, 4 + 2 * r - r**2, atol=1e-9)
    diagram = cj.bifurcation(lambda x, t, p: p * x * (1 - x), 0.3, [2.8, 3.2], steps=3000,
                             refine_tol=1e-3)  # fmt: skip
    assert diagram.periods.tolist() == [1, 2] and abs(diagram.points[0] - 3.0) < 1e-2


def test_detect_period_finds_period_3_on_a_training_orbit_and_none_on_a_chaotic_one():
    # GD with η = 1 on L(w) = (1 − r)w²/2 + r w³/3 is the logistic map w ↦ r w (1 − w)
    def run(r):
        ds = cj.Dataset.from_arrays(np.zeros((1, 1)), np.zeros((1, 1)), name="none")

        def loss(out, y):
            w = out[0, 0]
            return (1.0 - r) * w**2 / 2 + r * w**3 / 3

        tmap = cj.TrainingMap(lambda p, x: p["w"] * jnp.ones((1, 1)), {"w": jnp.asarray(0.3)}, ds,
                              loss=loss, optimizer="sgd", learning_rate=1.0)  # fmt: skip
        res = cj.run_replicas(tmap, cj.make_replicas(tmap), steps=600, progress=False,
                              observables=(), trackers=[orbits.PeriodTracker(window=128)])  # fmt: skip

        def one(s, t):
            s = tmap.step(s, t)
            return s, tmap.flat_params(s)

        traj = jax.lax.scan(one, tmap.init(), jnp.arange(600))[1]
        return orbits.detect_period(np.asarray(traj)), res.records["period"][0, -1]

    assert run(3.83) == (3, 3.0)  # the period-3 window of the logistic map
    assert run(4.0) == (0, 0.0)  # chaos
