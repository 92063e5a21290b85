import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from chaosjax import datasets, models, systems
from chaosjax.lyapunov import (
    best_window_fit,
    ensemble_log_distance,
    local_growth_rates,
    lyapunov_spectrum,
    max_lyapunov,
    qr_renormalize,
    tangent_step,
    twin_lyapunov,
)
from chaosjax.training import TrainingMap


def test_qr_renormalize_fixes_signs():
    y = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
    q, r = qr_renormalize(y)
    assert np.all(np.diag(r) > 0)
    np.testing.assert_allclose(q @ r, y, atol=1e-12)
    np.testing.assert_allclose(q.T @ q, np.eye(3), atol=1e-12)


def test_tangent_step_equals_jacobian_product():
    h = systems.henon()
    x = jnp.array([0.3, -0.2])
    basis = jnp.eye(2)
    y, jq = tangent_step(h.step, x, basis, 0)
    np.testing.assert_allclose(jq, jax.jacfwd(h.step)(x, 0), rtol=1e-14)
    np.testing.assert_allclose(y, h.step(x, 0))


def test_gd_quadratic_exact_spectrum():
    q = systems.quadratic_gd(
        eigenvalues=(0.5, 3.0, 9.0, 14.0, 21.0, 31.0), learning_rate=0.075, seed=3
    )
    res = lyapunov_spectrum(q.step, q.x0, k=4, steps=300, align=200)
    np.testing.assert_allclose(res.exponents, q.exact_exponents()[:4], atol=1e-8)


def test_training_map_linear_regression_exact_spectrum():
    """optax.sgd on ½‖Xw + b − y‖² mean: the map is affine with Jacobian I − ηH."""
    ds = datasets.teacher_student(64, d_in=5, d_out=1, seed=2)
    params = {"kernel": jnp.zeros((5, 1)), "bias": jnp.zeros((1,))}

    def apply(p, x):
        return x @ p["kernel"] + p["bias"]

    tm = TrainingMap(apply, params, ds, loss="mse", optimizer="sgd", learning_rate=0.9)
    xa = np.concatenate([ds.x_train, np.ones((ds.x_train.shape[0], 1))], axis=1)
    h = xa.T @ xa / xa.shape[0]
    exact = np.sort(np.log(np.abs(1 - 0.9 * np.linalg.eigvalsh(h))))[::-1]
    res = lyapunov_spectrum(tm.step, tm.init(), k=3, steps=200, align=300)
    np.testing.assert_allclose(res.exponents, exact[:3], atol=1e-8)
    np.testing.assert_allclose(res.per_eta_t(0.9), exact[:3] / 0.9, atol=1e-8)


def test_diagonal_linear_map():
    lm = systems.linear_map(matrix=jnp.diag(jnp.array([3.0, 0.5, 1.2, 0.1])))
    res = lyapunov_spectrum(lm.step, lm.x0, k=4, steps=50, align=50)
    np.testing.assert_allclose(res.exponents, np.log([3.0, 1.2, 0.5, 0.1]), atol=1e-8)
    np.testing.assert_allclose(res.sum_check, 0.0, atol=1e-10)


def test_logistic_ln2():
    lg = systems.logistic()
    res = max_lyapunov(lg.step, lg.x0, steps=100_000, warmup=100)
    assert abs(res.exponent - np.log(2)) < 1e-3


def test_henon_literature_values():
    h = systems.henon()
    res = lyapunov_spectrum(h.step, h.x0, k=2, steps=100_000, warmup=1000)
    np.testing.assert_allclose(res.exponents, [0.4194, -1.6234], atol=2e-3)
    assert abs(res.exponents.sum() - np.log(0.3)) < 1e-8
    assert abs(res.log_det - np.log(0.3)) < 1e-12
    assert np.all(res.stderr > 0) and np.all(res.stderr < 5e-3)
    assert res.running.shape == (100_000, 2)
    assert abs(res.running[-1, 0] - res.exponents[0]) < 1e-14


def test_lorenz63_literature_values():
    lz = systems.lorenz63()
    res = lyapunov_spectrum(lz.step, lz.x0, k=3, steps=200_000, warmup=2000, renorm_every=10)
    lam = res.per_time(lz.dt)
    assert 0.88 <= lam[0] <= 0.93
    assert abs(lam[1]) < 0.01
    assert abs(lam.sum() + 13.667) < 1e-3


@pytest.mark.slow
def test_lorenz96_literature_values():
    l96 = systems.lorenz96(n=40, forcing=8.0)
    res = lyapunov_spectrum(l96.step, l96.x0, k=40, steps=200_000, warmup=10_000, renorm_every=5)
    lam = res.per_time(l96.dt)
    assert 1.64 <= lam[0] <= 1.74
    assert (lam > 0).sum() == 13
    assert abs(lam.sum() + 40) < 1e-2


def test_lorenz96_sum_short_run():
    l96 = systems.lorenz96(n=12, forcing=8.0)
    res = lyapunov_spectrum(l96.step, l96.x0, k=12, steps=5000, warmup=1000, renorm_every=5)
    assert abs(res.per_time(l96.dt).sum() + 12) < 1e-3
    assert abs(res.sum_check) < 1e-8


def test_standard_map_sum_zero():
    sm = systems.standard_map(k=6.0)
    res = lyapunov_spectrum(sm.step, sm.x0, k=2, steps=20_000)
    assert abs(res.exponents.sum()) < 1e-10
    assert res.exponents[0] > 1.0


@pytest.mark.parametrize(
    "system, steps, renorm, warmup",
    [
        (systems.henon(), 100_000, 1, 1000),
        (systems.lorenz63(), 200_000, 10, 2000),
    ],
)
def test_twin_agrees_with_tangent_estimate(system, steps, renorm, warmup):
    qr = max_lyapunov(system.step, system.x0, steps=steps, renorm_every=renorm, warmup=warmup)
    tw = twin_lyapunov(system.step, system.x0, steps=steps, renorm_every=renorm, warmup=warmup)
    assert abs(tw.exponent / qr.exponent - 1) < 0.05
    assert tw.method == "twin"


def test_batched_equals_loop():
    h = systems.henon()
    x0s = jnp.stack([h.x0 * (1 + 0.01 * i) for i in range(64)])
    res = lyapunov_spectrum(h.step, x0s, k=2, steps=300, warmup=50, batched=True)
    assert res.exponents.shape == (64, 2) and res.log_growth.shape == (64, 300, 2)
    for i in (0, 17, 63):
        one = lyapunov_spectrum(h.step, x0s[i], k=2, steps=300, warmup=50)
        np.testing.assert_allclose(res.log_growth[i], one.log_growth, rtol=1e-12, atol=1e-12)
    tw = twin_lyapunov(h.step, x0s[:4], steps=100, batched=True)
    assert tw.exponents.shape == (4, 1)


def test_batched_learning_rate_grid_through_args():
    net = models.PureMLP((2, 5, 2))
    tm = TrainingMap(
        net.apply,
        net.init_params(jax.random.PRNGKey(0)),
        datasets.two_moons(30),
        optimizer="momentum",
        learning_rate=0.1,
    )
    lrs = jnp.array([0.05, 0.5])
    states = jnp.stack([tm.init()] * 2)
    hp = {"learning_rate": lrs, "momentum": jnp.full(2, 0.9)}
    res = lyapunov_spectrum(tm.step_with, states, k=3, steps=40, batched=True, args=hp)
    for i, lr in enumerate([0.05, 0.5]):
        one = lyapunov_spectrum(tm.replace(learning_rate=lr).step, tm.init(), k=3, steps=40)
        np.testing.assert_allclose(res.exponents[i], one.exponents, rtol=1e-9, atol=1e-12)
    assert res.per_eta_t(np.asarray(lrs)).shape == (2, 3)


def test_float32_state_with_float64_accumulation():
    h = systems.henon()
    r64 = lyapunov_spectrum(h.step, h.x0, k=2, steps=50_000, warmup=100)
    r32 = lyapunov_spectrum(h.step, h.x0.astype(jnp.float32), k=2, steps=50_000, warmup=100)
    assert r32.info["dtype"] == "float32" and r32.log_growth.dtype == np.float64
    np.testing.assert_allclose(r32.exponents, r64.exponents, rtol=1e-2)


def test_pytree_state_with_integer_counter():
    """Integer leaves ride along; tangents only cover the float leaves."""
    h = systems.henon()

    def step(s, t):
        return {"x": h.step(s["x"], t), "n": s["n"] + 1}

    res = lyapunov_spectrum(step, {"x": h.x0, "n": jnp.int32(0)}, k=2, steps=20_000, warmup=100)
    ref = lyapunov_spectrum(h.step, h.x0, k=2, steps=20_000, warmup=100)
    np.testing.assert_allclose(res.exponents, ref.exponents, rtol=1e-12)


def test_training_map_with_adam_moments_in_tangent():
    net = models.PureMLP((2, 4, 2))
    tm = TrainingMap(
        net.apply,
        net.init_params(jax.random.PRNGKey(0)),
        datasets.two_moons(30),
        optimizer="adam",
        learning_rate=0.01,
    )
    res = lyapunov_spectrum(tm.step, tm.init(), k=4, steps=30, warmup=5)
    assert res.final_basis.shape == (tm.dim, 4) and np.all(np.isfinite(res.exponents))
    # momentum β enters: with optax.sgd(momentum=β) on a quadratic the spectrum is the
    # log-moduli of the 2×2 heavy-ball blocks
    a, lr, beta = 1.0, 0.1, 0.1  # real, distinct eigenvalues of the heavy-ball matrix
    ds = datasets.Dataset(
        "one", np.ones((1, 1)), np.zeros((1, 1)), np.ones((1, 1)), np.zeros((1, 1)), "regression"
    )
    tm2 = TrainingMap(
        lambda p, x: x * p["w"] * np.sqrt(a),
        {"w": jnp.ones(())},
        ds,
        optimizer=lambda learning_rate: optax.sgd(learning_rate, momentum=beta),
        learning_rate=lr,
    )
    res2 = lyapunov_spectrum(tm2.step, tm2.init(), k=2, steps=200, align=100)
    # heavy ball: θ' = θ − η(βm + aθ), m' = βm + aθ → companion matrix [[1 − ηa, −ηβ], [a, β]]
    ev = np.linalg.eigvals(np.array([[1 - lr * a, -lr * beta], [a, beta]]))
    np.testing.assert_allclose(np.sort(res2.exponents), np.sort(np.log(np.abs(ev))), atol=1e-8)


def test_ftle_windows_and_nan_reasons():
    h = systems.henon()
    res = lyapunov_spectrum(h.step, h.x0, k=2, steps=1000, renorm_every=2, warmup=10)
    f = res.ftle(100)
    assert f.shape == (10, 2)
    np.testing.assert_allclose(f.mean(0), res.exponents, rtol=1e-12)
    np.testing.assert_array_equal(res.ftle_times(100), res.t_start + 100 * np.arange(1, 11))
    with pytest.raises(ValueError, match="window"):
        res.ftle(3)
    blow = lyapunov_spectrum(lambda x, t: x * 1e200, jnp.ones(2), k=1, steps=5)
    assert np.isnan(blow.exponent) or not np.isfinite(blow.exponent)
    assert "non-finite" in blow.reasons


def test_renorm_spread_warning():
    lm = systems.linear_map(matrix=jnp.diag(jnp.array([np.e**10, np.e**-10])))
    with pytest.warns(UserWarning, match="renorm_every"):
        lyapunov_spectrum(lm.step, lm.x0, k=2, steps=4, renorm_every=2)


def test_twin_warns_below_resolution():
    h = systems.henon()
    with pytest.warns(UserWarning, match="d0"):
        twin_lyapunov(h.step, h.x0.astype(jnp.float32), d0=1e-10, steps=10)


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"k": 3}, "k: must be an integer in"),
        ({"k": 1, "steps": 10, "renorm_every": 3}, "multiple of renorm_every"),
        ({"k": 1, "warmup": -1}, "warmup"),
        ({"k": 1, "steps": 0}, "steps"),
    ],
)
def test_bad_arguments(kwargs, msg):
    h = systems.henon()
    kw = {"steps": 10, **kwargs}
    with pytest.raises(ValueError, match=msg):
        lyapunov_spectrum(h.step, h.x0, **kw)
    with pytest.raises(TypeError, match="step"):
        lyapunov_spectrum(lambda x: x, h.x0, k=1, steps=2)


def test_ensemble_log_distance_and_window_fit():
    t = np.arange(0, 200)
    rng = np.random.default_rng(0)
    d = 1e-8 * np.exp(0.25 * np.minimum(t, 120))[None, :] * np.exp(0.01 * rng.normal(size=(5, 200)))
    mean, slope = ensemble_log_distance(d, t)
    assert mean.shape == (200,) and abs(mean[0] - np.log(1e-8)) < 0.05
    assert abs(np.median(slope[10:110]) - 0.25) < 0.01
    fit = best_window_fit(t, d)
    assert abs(fit.slope - 0.25) < 0.005 and fit.r2 > 0.999 and fit.stop <= 120
    flat = best_window_fit(t, np.full(200, 3.0))
    assert abs(flat.slope) < 1e-12


def test_local_growth_rates_linear_map():
    lm = systems.linear_map(matrix=jnp.diag(jnp.array([2.0, 0.5])))
    rates = local_growth_rates(lm.step, jnp.ones((3, 2)), n_perturbed=8, eps=1e-6, delta_t=40)
    assert rates.shape == (3, 8)
    # after 40 steps almost every perturbation grows like 2^t
    assert np.median(rates) == pytest.approx(np.log(2), abs=0.05)


@pytest.mark.slow
def test_danovski_iris_regimes():
    from chaosjax.replicas import make_replicas, run_replicas

    ds = datasets.iris()
    net = models.PureMLP((4, 10, 3), activation="sigmoid", init="normal")
    for lr in (0.01, 1.0):
        slopes, lams = [], []
        for seed in range(6):
            tm = TrainingMap(
                net.apply,
                net.init_params(jax.random.PRNGKey(seed), jnp.float64),
                ds,
                loss="cross_entropy",
                optimizer="sgd",
                learning_rate=lr,
            )
            lams.append(max_lyapunov(tm.step, tm.init(), steps=1000).exponent)
            res = run_replicas(
                tm,
                make_replicas(tm, n_perturbed=5, eps=1e-8),
                steps=200,
                observables=("distance_l1",),
                progress=False,
            )
            d = res.records["distance_l1"][1:]
            slopes.append(best_window_fit(res.steps, d).slope)
            growth = d.mean(0).max() / d.mean(0)[0]
            if lr == 0.01:
                assert growth < 10  # no exponential separation
            else:
                assert growth > 1e5
        if lr == 0.01:
            assert all(-1e-3 <= lam <= 2e-3 for lam in lams)
        else:
            assert 0.1 <= np.median(slopes) <= 0.4
            assert np.median(lams) > 0.01


def _interrupt_engine(monkeypatch, at_call: int):
    """Make the engine's 4th chunk call raise KeyboardInterrupt; returns the undo."""
    import chaosjax._engine_pass as eng

    real = eng._chunk_jit
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(eng, "_chunk_jit", flaky)
    return lambda: monkeypatch.setattr(eng, "_chunk_jit", real)


@pytest.mark.parametrize("driver", ["spectrum", "twin", "clv"])
def test_interrupted_drivers_resume_to_the_same_arrays(tmp_path, monkeypatch, driver):
    """Every driver runs on the engine: its checkpoint resumes bitwise (twin and CLV had no
    resume before)."""
    from chaosjax.clv import covariant_lyapunov_vectors

    h = systems.henon()
    if driver == "spectrum":
        kw = dict(k=2, steps=600, warmup=10, chunk_steps=100)
        run = lyapunov_spectrum
    elif driver == "twin":
        kw = dict(steps=600, warmup=10, chunk_steps=100)
        run = twin_lyapunov
    else:
        kw = dict(k=2, steps=400, warmup=10, align=50, backward_transient=100, keep_every=40,
                  chunk_steps=100)  # fmt: skip
        run = covariant_lyapunov_vectors
    whole = run(h.step, h.x0, **kw)
    undo = _interrupt_engine(monkeypatch, 4)
    ck = tmp_path / "ly.npz"
    with pytest.raises(KeyboardInterrupt):
        run(h.step, h.x0, checkpoint=ck, **kw)
    undo()
    assert ck.exists()
    resumed = run(h.step, h.x0, checkpoint=ck, resume=True, **kw)
    if driver == "clv":
        np.testing.assert_array_equal(resumed.vectors, whole.vectors)
        np.testing.assert_array_equal(resumed.local_growth, whole.local_growth)
    else:
        np.testing.assert_array_equal(resumed.log_growth, whole.log_growth)
        np.testing.assert_array_equal(resumed.final_state, whole.final_state)
    if driver == "spectrum":
        np.testing.assert_array_equal(resumed.final_basis, whole.final_basis)
        with pytest.raises(ValueError, match="different run"):
            run(h.step, h.x0, checkpoint=ck, resume=True, **{**kw, "k": 1})


def test_adam_on_relu_network_has_finite_tangents():
    """ReLU leaves exact zero gradients; Adam's sqrt(ν) has no derivative at 0. The named
    optimizers use a tiny eps_root; with optax's eps_root = 0 chaosjax differentiates √ with
    its limit at 0 (the true derivative of the update exists there), so both are finite."""
    net = models.PureMLP((2, 8, 2), activation="relu")
    params = net.init_params(jax.random.PRNGKey(0))
    params["layer_0"]["bias"] = params["layer_0"]["bias"].at[0].set(-100.0)  # a dead unit
    tm = TrainingMap(
        net.apply, params, datasets.two_moons(60), optimizer="adam", learning_rate=1e-2
    )
    assert float(tm.hparams["eps_root"]) == 1e-20
    res = lyapunov_spectrum(tm.step, tm.init(), k=3, steps=20)
    assert np.all(np.isfinite(res.exponents)) and res.reasons == ""
    bare = tm.replace(eps_root=0.0)
    res0 = lyapunov_spectrum(bare.step, bare.init(), k=3, steps=20)
    assert np.all(np.isfinite(res0.exponents)) and res0.reasons == ""
    # the dead unit's gradient entries are exactly 0 and its tangents finite
    g = jax.grad(lambda p: bare.loss_of_params(bare.unravel_params(p)))(bare.flat_params(tm.init()))
    assert int(jnp.sum(g == 0)) > 0


def test_batched_needs_a_batch_axis():
    h = systems.henon()
    with pytest.raises(ValueError, match=r"x0: with batched=True x0 needs shape \(batch, dim\)"):
        lyapunov_spectrum(h.step, h.x0, k=1, steps=10, batched=True)
