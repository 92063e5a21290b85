import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from chaosjax import datasets, models
from chaosjax.training import TrainingMap


def small_map(optimizer="momentum", **kw):
    net = models.PureMLP((2, 6, 2), activation="tanh")
    ds = datasets.two_moons(40, seed=1)
    kw.setdefault("learning_rate", 0.3)
    return TrainingMap(
        net.apply,
        net.init_params(jax.random.PRNGKey(0), jnp.float64),
        ds,
        loss="mse",
        optimizer=optimizer,
        init_fn=lambda k: net.init_params(k, jnp.float64),
        **kw,
    )


def run(tm, state, steps, t0=0):
    step = jax.jit(tm.step)
    for t in range(t0, t0 + steps):
        state = step(state, t)
    return state


def test_state_layout_parameters_and_moments():
    tm = small_map("momentum")
    assert tm.n_params == 2 * 6 + 6 + 6 * 2 + 2
    assert tm.dim == 2 * tm.n_params  # parameters + momentum trace
    adam = small_map("adam", learning_rate=0.01)
    assert adam.dim == 3 * adam.n_params  # parameters + mu + nu; the int count is not in the state
    assert len(adam.counters0) == 1
    s = run(adam, adam.init(), 7)
    assert int(adam.opt_state(s, 7)[0].count) == 7


def test_determinism_same_seed_identical():
    tm = small_map()
    a = run(tm, tm.init_from_key(3), 30)
    b = run(tm, tm.init_from_key(3), 30)
    np.testing.assert_array_equal(a, b)
    c = run(tm, tm.init_from_key(4), 30)
    assert not np.array_equal(a, c)


def test_jacobian_with_momentum_matches_finite_differences():
    tm = small_map("momentum", learning_rate=0.2, hparams={"momentum": 0.9})
    s = run(tm, tm.init(), 5)  # non-zero momentum buffer
    assert float(jnp.abs(s[tm.n_params :]).max()) > 1e-4
    t = 5
    jac = jax.jacfwd(tm.step)(s, t)
    h = 1e-6
    eye = np.eye(tm.dim)
    fd = np.stack(
        [
            (tm.step(s + h * eye[i], t) - tm.step(s - h * eye[i], t)) / (2 * h)
            for i in range(tm.dim)
        ],
        axis=1,
    )
    np.testing.assert_allclose(jac, fd, atol=1e-7, rtol=1e-6)
    # momentum enters the tangent: ∂θ'/∂m and ∂m'/∂m are β-scaled blocks
    P = tm.n_params
    np.testing.assert_allclose(jac[P:, P:], 0.9 * np.eye(P), atol=1e-12)


def test_learning_rate_grid_in_one_batch_equals_separate_runs():
    tm = small_map("sgd")
    lrs = jnp.array([0.01, 0.3, 0.8])
    s0 = tm.init()
    states = jnp.stack([s0] * 3)

    @jax.jit
    def batch_step(states, t):
        return jax.vmap(lambda s, lr: tm.step_with(s, t, {"learning_rate": lr}))(states, lrs)

    for t in range(20):
        states = batch_step(states, t)
    for i, lr in enumerate(lrs):
        alone = run(tm.replace(learning_rate=float(lr)), s0, 20)
        np.testing.assert_allclose(states[i], alone, rtol=1e-12, atol=1e-14)


def test_minibatches_depend_on_t_only():
    tm = small_map("sgd", batch_size=8, batch_seed=5)
    i3 = np.asarray(tm.batch_indices(3))
    assert len(set(i3.tolist())) == 8
    np.testing.assert_array_equal(i3, tm.batch_indices(3))
    assert not np.array_equal(i3, tm.batch_indices(4))
    # two different states at the same t use the same batch: their step equals manual SGD on it
    s = tm.init_from_key(9)
    x, y = tm.data["x_train"][i3], tm.data["y_train"][i3]
    g = jax.grad(tm.loss_of_params)(tm.params(s), x, y)
    manual = jax.tree_util.tree_map(lambda p, gg: p - 0.3 * gg, tm.params(s), g)
    np.testing.assert_allclose(
        tm.flat_params(tm.step(s, 3)), tm.init(manual)[: tm.n_params], rtol=1e-12
    )


def test_step_schedule_drops_learning_rate():
    tm = small_map(
        "sgd",
        learning_rate=0.5,
        schedule="step",
        schedule_options={"boundaries": [10], "factor": 0.1},
    )
    s = tm.init()
    g = jax.grad(tm.loss_of_params)(tm.params(s))
    for t, lr in [(3, 0.5), (12, 0.05)]:
        expect = jax.tree_util.tree_map(lambda p, gg, lr=lr: p - lr * gg, tm.params(s), g)
        np.testing.assert_allclose(
            tm.step(s, t)[: tm.n_params], tm.init(expect)[: tm.n_params], rtol=1e-12
        )


def test_nnx_model_and_pure_function_agree():
    ds = datasets.two_moons(40, seed=1)
    m = models.MLP((2, 6, 2), rngs=nnx.Rngs(0), dtype=jnp.float64)
    tm_nnx = TrainingMap.from_nnx(m, ds, loss="mse", optimizer="sgd", learning_rate=0.3)
    pure = models.PureMLP((2, 6, 2))
    p = {
        f"layer_{i}": {"bias": m.layers[i].bias[...], "kernel": m.layers[i].kernel[...]}
        for i in range(2)
    }
    tm_pure = TrainingMap(pure.apply, p, ds, loss="mse", optimizer="sgd", learning_rate=0.3)
    a, b = run(tm_nnx, tm_nnx.init(), 10), run(tm_pure, tm_pure.init(), 10)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    assert list(tm_nnx.layers) == ["layers/0", "layers/1"]


def test_evaluation_and_metrics():
    tm = small_map("sgd", learning_rate=0.5)
    s = run(tm, tm.init(), 200)
    assert float(tm.loss(s)) < float(tm.loss(tm.init()))
    assert 0.5 < float(tm.accuracy(s)) <= 1.0
    ev = tm.evaluate(s, "test")
    assert set(ev) == {"loss", "accuracy"}
    with pytest.raises(ValueError, match="split"):
        tm.loss(s, "validation")


def test_weight_mask_and_layers():
    tm = small_map("sgd")
    assert tm.weight_mask.sum() == 2 * 6 + 6 * 2
    assert tm.layers == {"layer_0": (0, 18), "layer_1": (18, 32)}


def test_custom_factory_and_ready_transformation():
    ds = datasets.two_moons(40, seed=1)
    net = models.PureMLP((2, 6, 2))
    p = net.init_params(jax.random.PRNGKey(0))
    tm = TrainingMap(
        net.apply,
        p,
        ds,
        optimizer=lambda learning_rate, decay: optax.chain(
            optax.add_decayed_weights(decay), optax.sgd(learning_rate)
        ),
        learning_rate=0.1,
        hparams={"decay": 1e-3},
    )
    assert sorted(tm.hparams) == ["decay", "learning_rate"]
    tm2 = TrainingMap(net.apply, p, ds, optimizer=optax.adam(1e-2))
    assert tm2.hparams == {} and tm2.dim == 3 * tm2.n_params
    run(tm2, tm2.init(), 3)


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        ({"optimizer": "sgdd"}, ValueError, "optimizer: unknown 'sgdd'"),
        ({"loss": "hinge"}, ValueError, "loss: unknown 'hinge'"),
        ({"learning_rate": None}, ValueError, "learning_rate: required"),
        ({"hparams": {"beta": 0.5}}, ValueError, "hparams"),
        ({"batch_size": 1000}, ValueError, "batch_size"),
        ({"schedule": "wavy"}, ValueError, "schedule: unknown"),
        ({"optimizer": 3}, TypeError, "optimizer"),
    ],
)
def test_bad_arguments_are_named(kwargs, exc, msg):
    ds = datasets.two_moons(40, seed=1)
    net = models.PureMLP((2, 4, 2))
    args = {"optimizer": "sgd", "learning_rate": 0.1, **kwargs}
    with pytest.raises(exc, match=msg):
        TrainingMap(net.apply, net.init_params(jax.random.PRNGKey(0)), ds, **args)


def test_dataset_type_checked():
    net = models.PureMLP((2, 4, 2))
    with pytest.raises(TypeError, match="dataset"):
        TrainingMap(net.apply, net.init_params(jax.random.PRNGKey(0)), (1, 2), learning_rate=0.1)


def test_fields_are_declared_once_and_survive_replace_and_flattening(iris_map):
    """Every attribute of a map (and one added later) survives replace, jit and vmap
    flattening: the static fields are read from the instance, not from a hand-kept list."""
    import jax

    tmap = iris_map.replace(learning_rate=0.5)
    assert vars(tmap).keys() == vars(iris_map).keys()
    assert float(tmap.hparams["learning_rate"]) == 0.5
    assert float(iris_map.hparams["learning_rate"]) == 1.0
    object.__setattr__(tmap, "extra_note", ("a", 1))
    leaves, treedef = jax.tree_util.tree_flatten(tmap)
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert back.extra_note == ("a", 1) and vars(back).keys() == vars(tmap).keys()
    assert back.replace(learning_rate=0.1).extra_note == ("a", 1)
    # equal maps flatten to equal treedefs (jit caches on them)
    assert jax.tree_util.tree_structure(iris_map) == jax.tree_util.tree_structure(
        iris_map.replace(learning_rate=2.0)
    )
