"""Numbers outside the toy regime: converged sharpness or a flag, the batch a record is of,
states with non-array leaves, unknown thresholds, summaries that describe their run."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import chaosjax as cj
from chaosjax import datasets, models
from chaosjax.curvature import training_loss


def _mlp_map(lr=0.2, widths=(2, 32, 32, 2)):
    net = models.PureMLP(widths, activation="tanh")
    params = net.init_params(jax.random.PRNGKey(0))
    return cj.TrainingMap(
        net.apply, params, datasets.two_moons(), loss="mse", optimizer="sgd", learning_rate=lr
    )


def test_default_curvature_tracker_is_converged_against_a_dense_hessian_or_flagged():
    tmap = _mlp_map()
    every, steps = 50, 100
    res = cj.run_replicas(
        tmap, cj.make_replicas(tmap), steps=steps, record_every=every,
        trackers=[cj.CurvatureTracker(k=1)], progress=False, observables=("loss",),
    )  # fmt: skip
    conv = res.records["sharpness_converged"][0, :, 0]
    rel_res = res.records["sharpness_residual"][0, :, 0]
    assert conv.mean() >= 0.75  # most records converged
    np.testing.assert_array_equal(conv > 0.5, rel_res <= 1e-3)
    x = tmap.init()
    for t in range(steps + 1):
        if t % every == 0:
            loss, p, _ = training_loss(tmap, x, t)
            exact = float(jnp.linalg.eigvalsh(jax.jit(jax.hessian(loss))(p))[-1])
            got = res.records["sharpness"][0, t // every, 0]
            ok = conv[t // every] > 0.5
            assert (abs(got - exact) <= 1e-3 * exact) or not ok, (t, got, exact)
        x = tmap.step(x, t)


def test_an_unconverged_record_is_flagged_and_left_out_of_the_verdict():
    from chaosjax.experiments.analyses import converged_ratio

    tmap = _mlp_map(widths=(2, 8, 2))
    # a 4-step cold Lanczos with no room to restart cannot reach 1e-10 on 42 parameters
    tight = cj.CurvatureTracker(k=1, tol=1e-10, max_matvecs=4, cold_matvecs=4)
    res = cj.run_replicas(
        tmap, cj.make_replicas(tmap), steps=20, record_every=10, trackers=[tight],
        progress=False, observables=("loss",),
    )  # fmt: skip
    conv = res.records["sharpness_converged"][0, :, 0] > 0.5
    assert not conv[0] and res.records["sharpness_matvecs"][0, 0] == 4
    np.testing.assert_array_equal(conv, res.records["sharpness_residual"][0, :, 0] <= 1e-10)
    ratio, ok = converged_ratio(res, 0)
    np.testing.assert_array_equal(ok, conv)
    assert np.isnan(ratio[~conv]).all() and np.isfinite(ratio[conv]).all()
    with pytest.raises(ValueError, match="tol: must lie in"):
        cj.run_replicas(tmap, cj.make_replicas(tmap), steps=2,
                        trackers=[cj.CurvatureTracker(tol=0.0)], progress=False)  # fmt: skip


def _minibatch_step_map(**kw):
    x = jnp.linspace(-1.0, 1.0, 64).reshape(32, 2)
    y = jnp.sin(3 * x[:, :1]) + x[:, 1:]
    params = {"w": jnp.full((2, 1), 0.3), "b": jnp.zeros(1)}

    def loss_fn(p, batch):
        xb, yb = batch
        return jnp.mean((xb @ p["w"] + p["b"] - yb) ** 2)

    def train_step(state, batch):
        return jax.tree_util.tree_map(
            lambda a, g: a - 0.1 * g, state, jax.grad(loss_fn)(state, batch)
        )

    def batch_fn(t, data):
        xs, ys = data
        i = (t % 4) * 8
        return jax.lax.dynamic_slice_in_dim(xs, i, 8), jax.lax.dynamic_slice_in_dim(ys, i, 8)

    tmap = cj.TrainingMap.from_step(
        train_step, params, batch_fn=batch_fn, data=(x, y), loss_fn=loss_fn,
        params=lambda s: s, **kw,
    )  # fmt: skip
    return tmap, loss_fn, batch_fn, (x, y)


def test_from_step_minibatch_records_are_of_the_batch_of_step_t_or_the_eval_batch():
    tmap, loss_fn, batch_fn, data = _minibatch_step_map()
    assert "batch_fn(t, data)" in repr(tmap)
    res = cj.run_replicas(tmap, cj.make_replicas(tmap), steps=8, progress=False,
                          observables=("loss",))  # fmt: skip
    state = tmap.init()
    want = []
    for t in range(9):
        want.append(float(loss_fn(tmap.params(state), batch_fn(jnp.int32(t), data))))
        state = tmap.step(state, t)
    np.testing.assert_allclose(res.records["loss"][0], want, rtol=1e-12)
    assert len(set(np.round(want, 12))) > 4  # not batch 0 for every t
    full, loss_fn, _, data = _minibatch_step_map(eval_batch=None)[:4]
    ev, *_ = _minibatch_step_map(eval_batch=data)
    assert "eval_batch" in repr(ev)
    res = cj.run_replicas(ev, cj.make_replicas(ev), steps=4, progress=False,
                          observables=("loss",))  # fmt: skip
    state = ev.init()
    for t in range(5):
        assert res.records["loss"][0, t] == pytest.approx(
            float(loss_fn(ev.params(state), data)), rel=1e-12
        )
        state = ev.step(state, t)
    with pytest.raises(ValueError, match="t: this map's loss is of the batch of step t"):
        full.loss(full.init())


def test_an_equinox_module_is_a_from_step_state_and_its_loop_is_followed():
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(2, 1, 8, 1, key=jax.random.PRNGKey(0), activation=jax.nn.tanh)
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))
    x = jnp.linspace(-1, 1, 32).reshape(16, 2)
    y = jnp.sin(x.sum(1, keepdims=True))

    def loss_fn(m, b):
        return jnp.mean((jax.vmap(m)(b[0]) - b[1]) ** 2)

    @eqx.filter_jit
    def train_step(state, b):
        m, s = state
        g = eqx.filter_grad(loss_fn)(m, b)
        u, s = tx.update(g, s, eqx.filter(m, eqx.is_array))
        return eqx.apply_updates(m, u), s

    tmap = cj.TrainingMap.from_step(
        train_step, (model, opt_state), batch_fn=lambda t, d: d, data=(x, y),
        loss_fn=loss_fn, params=lambda s: s[0],
    )  # fmt: skip
    s, state = tmap.init(), (model, opt_state)
    for t in range(4):
        s, state = tmap.step(s, t), train_step(state, (x, y))
    mine = jax.tree_util.tree_leaves(eqx.filter(tmap.user_state(s), eqx.is_array))
    theirs = jax.tree_util.tree_leaves(eqx.filter(state, eqx.is_array))
    assert all(jnp.array_equal(a, b) for a, b in zip(mine, theirs))
    assert tmap.user_state(s)[0].activation is model.activation
    r = cj.lyapunov_spectrum(tmap.step, tmap.init(), k=2, steps=10)
    assert np.isfinite(r.exponents).all()


def test_a_threshold_that_cannot_be_known_warns_once_naming_the_fix():
    net = models.PureMLP((2, 4, 2), activation="tanh")
    p = net.init_params(jax.random.PRNGKey(0))
    ds = datasets.two_moons(n=20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tmap = cj.TrainingMap(net.apply, p, ds, optimizer=optax.sgd(0.3), optimizer_kind="sgd")
        cj.TrainingMap(net.apply, p, ds, optimizer=optax.sgd(0.3))  # no threshold asked for
        cj.TrainingMap(net.apply, p, ds, optimizer="sgd", learning_rate=0.3)
    msgs = [str(w.message) for w in caught if "learning_rate:" in str(w.message)]
    assert len(msgs) == 1 and "inject_hyperparams" in msgs[0]
    assert caught[0].filename == __file__
    assert np.isnan(float(tmap.threshold_at(tmap.init(), 0)))


def test_a_summary_after_overrides_names_the_overridden_values_only():
    from chaosjax.experiments import load_config

    base = load_config("quickstart")
    assert "0.05, 0.5, 2 and 4" in base.description
    cfg = load_config("quickstart", ["training.learning_rates=[0.1,1.0]", "steps=500"])
    assert "0.05" not in cfg.description and "training.learning_rates=[0.1,1.0]" in cfg.description
    assert load_config("quickstart", ["scale.devices=1"]).description == base.description
