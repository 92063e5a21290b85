"""Instability control: controllers as optax transformations, and instability episodes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from chaosjax import TrainingMap, control, lyapunov_spectrum
from chaosjax.datasets import Dataset

A_DIAG = np.array([10.0, 6.0, 4.0, 2.0])


def quadratic_map(optimizer, **kw):
    """GD on ½ Σ a_i θ_i² as a TrainingMap: one example, outputs √a ⊙ θ, MSE to 0."""
    x = np.zeros((1, 1))
    ds = Dataset("quadratic", x, np.zeros((1, 4)), x, np.zeros((1, 4)), "regression")
    sa = jnp.asarray(np.sqrt(A_DIAG))
    return TrainingMap(
        lambda p, x: (sa * p["theta"])[None, :],
        {"theta": jnp.ones(4)},
        ds,
        optimizer=optimizer,
        **kw,
    )


@pytest.mark.parametrize("margin,smoothing", [(0.9, 1.0), (1.5, 0.5)])
def test_sharpness_margin_on_quadratic_sets_eta_and_lyapunov(margin, smoothing):
    factory = functools.partial(control.sharpness_margin, every=5, smoothing=smoothing)
    tmap = quadratic_map(factory, learning_rate=0.05, hparams={"margin": margin})
    lam = A_DIAG.max()
    x = tmap.init()
    x = jax.jit(lambda x: jax.lax.fori_loop(0, 60, lambda t, s: tmap.step(s, t), x))(x)
    ctl = control.controller_state(tmap.opt_state(x, 60))
    eta = float(ctl.learning_rate)
    assert abs(eta - margin * 2.0 / lam) / (margin * 2.0 / lam) < 0.01
    assert float(ctl.sharpness) == pytest.approx(lam, rel=1e-8)
    res = lyapunov_spectrum(tmap.step, x, k=1, steps=100, align=20, t0=60)
    expected = np.log(abs(1 - eta * lam))
    assert res.exponents[0] == pytest.approx(expected, abs=2e-3)


def test_ftle_controller_on_quadratic_reaches_target():
    """GD on a quadratic: FTLE = max log|1 − η a_i|, so target τ gives η = (1 + e^τ)/a_max."""
    tau = 0.1
    factory = functools.partial(control.ftle_target, window=20, every=5, k=2, gain=1.0)
    tmap = quadratic_map(factory, learning_rate=0.15, hparams={"target": tau})
    x = jax.jit(lambda x: jax.lax.fori_loop(0, 600, lambda t, s: tmap.step(s, t), x))(tmap.init())
    ctl = control.controller_state(tmap.opt_state(x, 600))
    assert float(ctl.ftle) == pytest.approx(tau, abs=5e-3)
    assert float(ctl.learning_rate) == pytest.approx((1 + np.exp(tau)) / A_DIAG.max(), rel=5e-3)


def chebyshev_map(factory, **kw):
    from chaosjax.experiments import build_dataset, build_training_map, load_plan

    cfg = dict(load_plan("edge-of-stability"))["chebyshev"]
    base = build_training_map(cfg)
    return TrainingMap(
        base.apply_fn, base.params(base.init()), build_dataset(cfg), optimizer=factory, **kw
    )


def test_sharpness_margin_on_chebyshev_holds_the_edge_and_stays_monotone():
    """Margins 1.0 and 0.5 as one vmapped batch; the sharpness is measured independently."""
    from chaosjax import hessian_eigs

    tmap = chebyshev_map(
        functools.partial(control.sharpness_margin, every=5),
        learning_rate=0.01,
        hparams={"margin": 1.0},
        loss="mse",
    )
    margins = jnp.array([1.0, 0.5])
    hp = {"learning_rate": jnp.full(2, 0.01), "margin": margins}

    @jax.jit
    def run(x0):
        def one(x, h):
            def body(x, t):
                lam = hessian_eigs(tmap.loss_of_params, tmap.params(x), 1, n_matvecs=30)
                eta = control.controller_state(tmap.opt_state(x, t)).learning_rate
                return tmap.step_with(x, t, h), (tmap.loss(x), lam.eigenvalues[0], eta)

            return jax.lax.scan(body, x, jnp.arange(600))[1]

        return jax.vmap(one)(x0, hp)

    x0 = jnp.stack([tmap.init()] * 2)
    loss, lam, eta = map(np.asarray, run(x0))
    ratio = eta[:, 201:] * lam[:, 200:-1]  # η of step t (set at t) times λmax before it
    assert 1.8 <= ratio[0].min() and ratio[0].max() <= 2.1, (ratio[0].min(), ratio[0].max())
    assert np.all(np.diff(loss[1]) <= 0), "margin 0.5: the loss must decrease at every step"
    assert loss[0, -1] < 0.2 * loss[0, 0]


def tiny_map(optimizer, **kw):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 2))
    y = np.sin(x.sum(1, keepdims=True))
    ds = Dataset("tiny", x, y, x, y, "regression")
    w = rng.normal(size=(2, 3)) * 0.8
    params = {"w1": jnp.asarray(w), "b1": jnp.zeros(3), "w2": jnp.asarray(rng.normal(size=(3, 1)))}

    def apply(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    return TrainingMap(apply, params, ds, optimizer=optimizer, **kw)


def fd_jacobian(step, x, t, rel=1e-6):
    """Central differences, step rel·max(|x_i|, 1e-3) per coordinate (Adam's ν entries are
    ~1e-7 and must stay positive)."""
    cols = []
    for i in range(x.shape[0]):
        h = rel * max(abs(float(x[i])), 1e-3)
        e = jnp.zeros_like(x).at[i].set(h)
        cols.append(np.asarray((step(x + e, t) - step(x - e, t)) / (2 * h)))
    return np.stack(cols, axis=1)


@pytest.mark.parametrize(
    "factory,hparams",
    [
        (
            functools.partial(control.sharpness_margin, optimizer="momentum", every=3),
            {"margin": 0.8},
        ),
        pytest.param(
            functools.partial(control.sharpness_margin, optimizer="adam", every=3),
            {"margin": 0.8},
            # Adam's preconditioned solve inside the step: a suite-sized test traces it three
            # times; the momentum and FTLE controllers keep the check in the suite
            marks=pytest.mark.slow,
        ),
        (
            functools.partial(
                control.ftle_target, optimizer="momentum", k=2, window=4, every=2, warmup=0
            ),
            {"target": 0.05},
        ),
    ],
    ids=["sharpness-momentum", "sharpness-adam", "ftle-momentum"],
)
def test_controlled_map_is_deterministic_and_its_jacobian_matches_finite_differences(
    factory, hparams
):
    tmap = tiny_map(factory, learning_rate=0.05, hparams=hparams)
    step = jax.jit(tmap.step)
    jacobian = jax.jit(jax.jacfwd(tmap.step))
    x = tmap.init()
    for t in range(7):
        x = step(x, t)
    again = tmap.init()
    for t in range(7):
        again = step(again, t)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(again))  # same seed, same arrays
    # all of the state: parameters, moments and the controller's η, estimate and vectors.
    # The sharpness solve takes its warm start as a constant (documented): the Jacobian leaves
    # out the solver's dependence on its start vector, which must be small (<= 1e-3).
    ctl = control.controller_state(tmap.opt_state(x, 7))
    exact = np.ones(tmap.dim, bool)
    if isinstance(ctl, control.SharpnessControlState):
        v = np.asarray(ctl.vector)
        xs = np.asarray(x)
        at = [o for o in range(tmap.dim - v.size + 1) if np.array_equal(xs[o : o + v.size], v)]
        assert len(at) == 1
        exact[at[0] : at[0] + v.size] = False
    for t in (9, 10):  # sharpness: step 9 measures (count % 3 == 0), step 10 does not
        jac = np.asarray(jacobian(x, t))
        fd = fd_jacobian(step, x, t)
        assert np.isfinite(jac).all()
        # column by column: entries span 1e-3 … 1e6 with Adam's 1/√ν
        err = np.abs(jac - fd).max(axis=0)
        scale = np.maximum(np.abs(jac).max(axis=0), 1.0)
        worst = int(np.argmax(np.where(exact, err / scale, 0)))
        assert np.all(err[exact] <= 1e-5 * scale[exact]), (t, worst, err[worst], scale[worst])
        assert np.all(err[~exact] <= 1e-3 * scale[~exact])


def test_gradient_noise_is_deterministic_shared_and_calibrated():
    tx = control.gradient_noise(0.5, seed=3, relative=True)
    g = {"a": jnp.ones((400,)), "b": jnp.full((100,), 2.0)}
    s0 = tx.init(g)
    u1, s1 = tx.update(g, s0)
    u1b, _ = tx.update(g, s0)
    u2, _ = tx.update(g, s1)
    np.testing.assert_array_equal(u1["a"], u1b["a"])  # same step, same noise (replicas share it)
    assert not np.allclose(u1["a"], u2["a"])  # the next step draws anew
    noise = jnp.concatenate([u1["a"] - 1.0, u1["b"] - 2.0])
    gnorm = float(jnp.sqrt(400 + 100 * 4.0))
    assert float(jnp.linalg.norm(noise)) == pytest.approx(0.5 * gnorm, rel=0.1)
    sched = control.gradient_noise(lambda c: 0.0 * c, seed=0)  # a schedule: σ = 0 adds nothing
    u, _ = sched.update(g, sched.init(g))
    np.testing.assert_array_equal(u["a"], g["a"])
    # inside a training map: the integer counter comes from t, so the map is deterministic
    tmap = tiny_map(optax.chain(control.gradient_noise(0.1), optax.sgd(0.1)))
    x = tmap.init()
    np.testing.assert_array_equal(tmap.step(x, 5), tmap.step(x, 5))
    assert not np.allclose(tmap.step(x, 5), tmap.step(x, 6))


def test_controller_errors_name_the_field():
    with pytest.raises(ValueError, match="margin"):
        control.sharpness_margin(-1.0)
    with pytest.raises(ValueError, match="optimizer: unknown 'lbfgs'; allowed: sgd"):
        control.sharpness_margin(1.0, optimizer="lbfgs")
    with pytest.raises(ValueError, match="hparams: \\['b1'\\] not used by 'momentum'"):
        control.sharpness_margin(1.0, optimizer="momentum", b1=0.9)
    with pytest.raises(ValueError, match="smoothing"):
        control.sharpness_margin(1.0, smoothing=0.0)
    with pytest.raises(ValueError, match="every: must be an integer"):
        control.ftle_target(0.0, every=2.5)
    with pytest.raises(ValueError, match="max_change"):
        control.ftle_target(0.0, max_change=0.5)
    with pytest.raises(ValueError, match="scale"):
        control.gradient_noise(-0.1)
    tx = control.sharpness_margin(1.0)
    p = jnp.ones(3)
    with pytest.raises(TypeError, match="value_fn"):
        tx.update(p, tx.init(p), p)
    assert control.stability_constant("adam", b1=0.9) == pytest.approx(38.0)
    assert control.stability_constant("momentum", momentum=0.5) == pytest.approx(3.0)


# ---------------------------------------------------------------------------------------------
# episodes on constructed series


def catapult_series(n=200):
    """Loss decreasing, a catapult at record 80 (×6 spike) into a flatter region, then lower."""
    t = np.arange(n, dtype=float)
    loss = 1.0 * np.exp(-t / 60)
    loss[80:90] = loss[79] * np.array([3, 6, 5, 3, 2, 1.2, 0.9, 0.8, 0.75, 0.7])
    loss[90:] = loss[89] * np.exp(-(t[90:] - 90) / 60)
    sharp = np.where(t < 80, 1.8 + 0.4 * t / 80, 1.2)  # rises to 2.2 > 2/η, falls to 1.2
    sharp[80:86] = [2.3, 2.4, 2.1, 1.8, 1.5, 1.3]
    return loss, sharp


def test_episode_labels_on_constructed_series():
    loss, sharp = catapult_series()
    steps = np.arange(200) * 10
    # matched stable run: keeps sharpening slowly, never spikes
    ref_sharp = 1.8 + 0.3 * np.arange(200) / 200
    eps = control.instability_episodes(
        loss, steps=steps, sharpness=sharp, threshold=2.0, reference_sharpness=ref_sharp
    )
    assert len(eps) == 1, eps
    e = eps[0]
    assert e.label == "helpful", e
    assert set(e.kinds) == {"loss_spike", "sharpness"}
    assert e.start <= 800 and e.peak == 810 and e.end > e.peak
    assert e.numbers["sharpness_after"] < e.numbers["reference_sharpness"]
    # the same spike without a matched run: judged against the sharpness just before it
    e2 = control.instability_episodes(loss, steps=steps, sharpness=sharp, threshold=2.0)[0]
    assert e2.label == "helpful"

    # divergence: the loss blows up and becomes non-finite
    div = np.exp(-np.arange(100) / 30)
    div[60:] = div[59] * 10.0 ** np.arange(1, 41)
    div[80:] = np.inf
    d = control.instability_episodes(div)
    assert [x.label for x in d] == ["harmful"]
    assert "diverged at step" in d[0].reason

    # a spike without recovery: the loss jumps ×5 and stays there
    stuck = np.exp(-np.arange(200) / 50)
    stuck[100:] = stuck[99] * 5.0
    s = control.instability_episodes(stuck, recovery=50)
    assert [x.label for x in s] == ["harmful"] and "no recovery" in s[0].reason
    assert s[0].end == -1

    # a spike that recovers but ends neither flatter nor better: neutral
    flat = np.exp(-np.arange(100) / 50)
    flat[50:53] *= 4.0
    n = control.instability_episodes(flat, sharpness=np.full(100, 1.0), threshold=2.0)
    assert [x.label for x in n] == ["neutral"]
    # a spike a few records before the end: too late to judge
    late = np.exp(-np.arange(100) / 50)
    late[95:] *= 4.0
    u = control.instability_episodes(late, recovery=20)
    assert [x.label for x in u] == ["unresolved"] and "before the recovery window" in u[0].reason
    counts = control.count_labels(eps + d + s + n + u)
    assert counts == {"helpful": 1, "harmful": 2, "neutral": 1, "unresolved": 1}


def test_divergence_burst_is_an_episode():
    loss = np.exp(-np.arange(120) / 40)
    dist = np.full(120, 1e-8)
    dist[50:70] = 1e-8 * 10.0 ** (0.3 * np.arange(1, 21))  # six decades in 20 records
    dist[70:] = dist[69]
    eps = control.instability_episodes(loss, distance=dist, test_loss=loss * 1.1)
    assert len(eps) == 1 and eps[0].kinds == ("divergence_burst",)
    assert eps[0].peak == 69
    # the loss kept falling: without a matched run that is not evidence of help
    assert eps[0].label == "neutral"
    better = control.instability_episodes(
        loss, distance=dist, test_loss=loss * 1.1, reference_test_loss=loss * 1.5
    )
    assert better[0].label == "helpful" and "held-out loss" in better[0].reason
    with pytest.raises(ValueError, match="sharpness: expected 120 records"):
        control.instability_episodes(loss, sharpness=np.ones(5), threshold=2.0)


# ---------------------------------------------------------------------------------------------
# the preset's config: bad values exit 2 with one line, before any run folder exists


@pytest.mark.parametrize(
    "setting,message",
    [
        ("control.margins=[-1.0]", "control.margins"),
        ("training.optimizer=adam", "control.enabled: the comparison runs need training.optimizer"),
        ("curvature.enabled=false", "needs curvature.enabled"),
        ("control.smoothing=0", "control.smoothing"),
        ("control.max_change=0.5", "control.max_change"),
    ],
)
def test_controlled_preset_rejects_bad_settings(setting, message, tmp_path, capsys):
    from chaosjax.cli import main

    out = tmp_path / "run"
    code = main(["run", "controlled-instability", "--out", str(out), "--quiet", "--set", setting])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_verdict_rule_excludes_diverged_and_incomplete_settings():
    from chaosjax.experiments.controlled import verdict

    def row(label, kind, steps, diverged=0):
        return {"label": label, "kind": kind, "steps": steps, "diverged": diverged}

    rows = [
        row("fixed η = 0.4", "fixed", 20.0),
        row("fixed η = 0.8", "fixed", float("nan"), 2),
        row("margin 1.5", "sharpness", 10.0, 3),  # fastest, but it diverged: not a winner
        row("margin 1", "sharpness", 40.0),
    ]
    assert verdict(rows).startswith("No: the best controller (margin 1, 40 steps")
    rows[3]["steps"] = 15.0
    assert verdict(rows).startswith("Yes: margin 1 reached the target in 15 steps")
    assert verdict(rows[:1]).startswith("No controller qualified")
