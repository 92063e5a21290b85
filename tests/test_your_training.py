"""A user's own training as a chaosjax map: NNX models with BatchNorm, Dropout, attention;
any optax transformation; a hand-written ``train_step``; the user's own data."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import chaosjax
from chaosjax import datasets
from chaosjax.datasets import Dataset
from chaosjax.training import TrainingMap, split_state

# ------------------------------------------------------------------------------------------
# models written the way the Flax NNX tutorials write them


class CNN(nnx.Module):
    """Two convolutions, average pooling, dense layers (optionally BatchNorm, Dropout)."""

    def __init__(self, rngs, *, bn=False, dropout=0.0, width=4):
        self.c1 = nnx.Conv(1, width, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(width, rngs=rngs) if bn else None
        self.c2 = nnx.Conv(width, width, (3, 3), rngs=rngs)
        self.do = nnx.Dropout(dropout, rngs=rngs) if dropout else None
        self.l1 = nnx.Linear(width * 16, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.c1(x))
        if self.bn is not None:
            x = self.bn(x)
        x = nnx.avg_pool(x, (2, 2), (2, 2))
        x = nnx.relu(self.c2(x)).reshape(x.shape[0], -1)
        if self.do is not None:
            x = self.do(x)
        return self.l2(nnx.relu(self.l1(x)))


class TinyTransformer(nnx.Module):
    """One attention block on token ids: Embed, MultiHeadAttention, LayerNorm."""

    def __init__(self, rngs, vocab=8, d=8, out=7):
        self.emb = nnx.Embed(vocab, d, rngs=rngs)
        self.att = nnx.MultiHeadAttention(2, d, d, dropout_rate=0.1, decode=False, rngs=rngs)
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.out = nnx.Linear(d, out, rngs=rngs)

    def __call__(self, x):
        h = self.emb(x)
        h = self.ln(h + self.att(h))
        return self.out(h[:, -1])


@pytest.fixture(scope="module")
def digits_small():
    ds = datasets.digits(images=True, n_test=64)
    return Dataset.from_arrays(
        ds.x_train[:96], ds.y_train[:96], ds.x_test, ds.y_test, name="digits-96"
    )


def modular_addition(p=7):
    a, b = np.meshgrid(np.arange(p), np.arange(p))
    a, b = a.ravel(), b.ravel()
    x = np.stack([a, b, np.full_like(a, p)], 1).astype(np.int32)
    y = ((a + b) % p).astype(np.int32)
    return Dataset.from_arrays(x[:35], y[:35], x[35:], y[35:], name="modadd")


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def xs(state):
    return split_state(state)[0]


# ------------------------------------------------------------------------------------------
# from_nnx: fidelity with the user's own loop


def test_from_nnx_batchnorm_adamw_schedule_equals_the_users_optimizer_loop(digits_small):
    """Mid-training start from the user's model and nnx.Optimizer; T steps of the map equal T
    steps of the user's loop on the same batches. Bound: 1e-9 relative (an Adam map amplifies
    round-off; the map and the loop are different XLA programs)."""
    model = CNN(nnx.Rngs(0), bn=True)
    nnx.update(model, jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), nnx.state(model)))
    sched = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 4, 40)
    opt = nnx.Optimizer(model, optax.adamw(sched), wrt=nnx.Param)
    x_all = jnp.asarray(digits_small.x_train, jnp.float64)
    y_all = jnp.asarray(digits_small.y_train)

    def loss_fn(m, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    @nnx.jit
    def user_step(m, o, x, y):
        grads = nnx.grad(loss_fn)(m, x, y)
        o.update(m, grads)

    for t in range(3):  # the user trains a little first
        user_step(model, opt, x_all[t * 32 : t * 32 + 32], y_all[t * 32 : t * 32 + 32])
    tm = TrainingMap.from_nnx(
        model, digits_small, loss="cross_entropy", optimizer=opt, batch_size=32, dtype=jnp.float64
    )
    assert tm.has_carry  # BatchNorm statistics are carried
    state = tm.init()
    step = jax.jit(tm.step)
    for t in range(5):
        state = step(state, t)
        idx = tm.batch_indices(t)
        user_step(model, opt, x_all[idx], y_all[idx])
    params = nnx.state(model, nnx.Param)
    ours = tm.params(state)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(params)):
        assert rel(a, b) <= 1e-9
    stats = nnx.state(model, nnx.BatchStat)
    carried = state.carry[0]
    for a, b in zip(jax.tree_util.tree_leaves(carried), jax.tree_util.tree_leaves(stats)):
        assert rel(a, b) <= 1e-9
    # the schedule continued from the optimizer's step count (3 + 5 steps)
    assert int(tm.opt_state(state, 5)[0].count) == 8 or int(opt.step.value) == 8
    # eval-mode test loss equals the user's model.eval() loss
    model.eval()
    xt = jnp.asarray(digits_small.x_test, jnp.float64)
    user = loss_fn(model, xt, jnp.asarray(digits_small.y_test))
    assert rel(tm.loss(state, "test"), user) <= 1e-9


def test_from_nnx_transformer_on_token_ids_and_dropout_masks():
    ds = modular_addition()
    assert ds.x_train.dtype.kind == "i"  # token ids stay integers
    tm = TrainingMap.from_nnx(
        TinyTransformer(nnx.Rngs(0)),
        ds,
        loss="cross_entropy",
        optimizer=optax.adam(1e-2),
        dtype=jnp.float64,
        model_factory=lambda r: TinyTransformer(r),
    )
    s = tm.init()
    a, b, c = tm.step(s, 3), tm.step(s, 3), tm.step(s, 4)
    np.testing.assert_array_equal(xs(a), xs(b))  # the same t: the same masks
    # a different t: a different dropout mask (the same batch: full batch, same state)
    f3 = tm._forward(tm.params(s), tm._model_carry0, tm.data["x_train"], train=True,
                     key=tm.step_key(3))[0]  # fmt: skip
    f4 = tm._forward(tm.params(s), tm._model_carry0, tm.data["x_train"], train=True,
                     key=tm.step_key(4))[0]  # fmt: skip
    assert not np.allclose(f3, f4)
    assert not np.array_equal(xs(a), xs(c))
    # replicas share the masks: perturbed by 1e-12 they stay within 1e-6
    batch = chaosjax.make_replicas(tm, seeds=[0], n_perturbed=2, eps=1e-12)
    res = chaosjax.run_replicas(tm, batch, steps=6, record_every=3, progress=False)
    d = res.records["distance_l2"][1:]
    assert np.all(np.isfinite(d)) and d.max() < 1e-6
    assert np.all(np.isfinite(res.records["loss"]))


def test_dropout_map_jacobian_at_fixed_t_matches_finite_differences(digits_small):
    tm = TrainingMap.from_nnx(
        CNN(nnx.Rngs(1), bn=True, dropout=0.3, width=2),
        digits_small,
        loss="cross_entropy",
        optimizer="momentum",
        learning_rate=0.05,
        batch_size=16,
        dtype=jnp.float64,
    )
    # two steps first: at initialisation the conv biases are exactly 0, so on the digits'
    # blank borders pre-activations sit exactly on ReLU's kink (no derivative there)
    s = tm.step(tm.step(tm.init(), 0), 1)
    x0, carry = split_state(s)
    t = 2

    def f(x):
        return xs(tm.step(tm.pack(x, carry), t))

    v = jax.random.normal(jax.random.PRNGKey(0), x0.shape, x0.dtype)
    v = v / jnp.linalg.norm(v)
    jv = jax.jvp(f, (x0,), (v,))[1]
    h = 1e-6
    fd = (f(x0 + h * v) - f(x0 - h * v)) / (2 * h)
    assert float(jnp.linalg.norm(jv - fd) / jnp.linalg.norm(jv)) < 1e-6


class ReluMLP(nnx.Module):
    """64 pixels → 16 ReLU → 10."""

    def __init__(self, rngs, width=16):
        self.l1 = nnx.Linear(64, width, rngs=rngs)
        self.l2 = nnx.Linear(width, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x.reshape(x.shape[0], -1))))


def optax_loop_step(tm, tx):
    """A user's plain optax step on the map's batch loss, compiled (op by op every primitive
    would compile on its own): ``(params, opt_state, xb, yb) -> (params, opt_state)``."""

    @jax.jit
    def step(params, o, xb, yb):
        grads = jax.grad(lambda p: tm.batch_loss(p, (xb, yb)))(params)
        u, o = tx.update(grads, o, params)
        return optax.apply_updates(params, u), o

    return step


def test_adamw_with_optax_defaults_gives_finite_exponents_on_a_relu_network(digits_small):
    """optax.adamw's eps_root = 0: √ν has no derivative where a gradient entry is exactly 0
    (weights from pixels that are 0 in every image of the batch, inactive ReLU units);
    chaosjax differentiates it with the limit and leaves the trajectory unchanged."""
    sched = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 50)
    tm = TrainingMap.from_nnx(
        ReluMLP(nnx.Rngs(0)), digits_small, loss="cross_entropy", optimizer=optax.adamw(sched),
        batch_size=32, dtype=jnp.float64,
    )  # fmt: skip
    s = tm.init()
    # exactly-zero gradient entries exist, so the guard is exercised
    g = jax.jit(jax.grad(lambda p: tm.loss_of_params(tm.unravel_params(p))))(tm.flat_params(s))
    assert int(jnp.sum(g == 0)) > 0
    r = chaosjax.lyapunov_spectrum(tm.step, s, k=2, steps=12)
    assert np.all(np.isfinite(r.exponents))
    # the trajectory is optax's own: a plain optax loop gives the same parameters
    params = tm.params(s)
    opt = optax.adamw(sched)
    o = opt.init(params)

    user_step = optax_loop_step(tm, opt)
    for t in range(4):
        params, o = user_step(params, o, *tm._batch(t))
        s = tm.step(s, t)
    # two compiled programs: Adam divides round-off in near-zero gradient entries by their tiny
    # second moment, so agreement is ~1e-8, not 1e-15
    for a, b in zip(jax.tree_util.tree_leaves(tm.params(s)), jax.tree_util.tree_leaves(params)):
        assert rel(a, b) <= 1e-7


# ------------------------------------------------------------------------------------------
# any optax transformation


@pytest.mark.parametrize(
    "make",
    [
        lambda: optax.MultiSteps(optax.sgd(0.1), 3).gradient_transformation(),
        lambda: optax.apply_if_finite(optax.adam(1e-2), 3),
        lambda: optax.chain(
            optax.clip_by_global_norm(0.5),
            optax.add_decayed_weights(1e-3),
            optax.sgd(optax.exponential_decay(0.2, 5, 0.5), momentum=0.9),
        ),
    ],
    ids=["multisteps", "apply_if_finite", "chain"],
)
def test_any_optax_transformation_equals_an_optax_loop(make, request):
    net = chaosjax.models.PureMLP((2, 6, 2), activation="tanh")
    ds = datasets.two_moons(40, seed=1)
    p0 = net.init_params(jax.random.PRNGKey(0), jnp.float64)
    tm = TrainingMap(net.apply, p0, ds, optimizer=make(), batch_size=10)
    s = tm.init()
    tx = make()
    params, o = p0, tx.init(p0)
    step = jax.jit(tm.step)

    user_step = optax_loop_step(tm, tx)
    for t in range(7):
        params, o = user_step(params, o, *tm._batch(t))
        s = step(s, t)
    for a, b in zip(jax.tree_util.tree_leaves(tm.params(s)), jax.tree_util.tree_leaves(params)):
        assert rel(a, b) <= 1e-12
    # integer optimizer leaves (MultiSteps' mini-step, apply_if_finite's counts) are carried
    x = split_state(s)[0]
    assert x.dtype == jnp.float64 and x.shape == (tm.dim,)
    assert tm.has_carry == (request.node.callspec.id != "chain")


def test_inject_hyperparams_learning_rate_grid_and_thresholds():
    net = chaosjax.models.PureMLP((2, 6, 2), activation="tanh")
    ds = datasets.two_moons(40, seed=1)
    tm = TrainingMap(
        net.apply,
        net.init_params(jax.random.PRNGKey(0), jnp.float64),
        ds,
        optimizer=optax.inject_hyperparams(optax.sgd),
        learning_rate=0.1,
        init_fn=lambda k: net.init_params(k, jnp.float64),
    )
    assert tm.learning_rate_source == "state"
    batch = chaosjax.make_replicas(tm, seeds=[0], grid={"learning_rate": [0.05, 0.4]})
    res = chaosjax.run_replicas(
        tm, batch, steps=4, record_every=2, trackers=[chaosjax.CurvatureTracker(k=1)],
        progress=False,
    )  # fmt: skip
    thr = res.records["threshold"]
    # η is read from the state: 2/η per grid point after the first step
    np.testing.assert_allclose(thr[:, -1], [2 / 0.05, 2 / 0.4], rtol=1e-12)


def test_per_seed_learning_rates_from_each_seeds_initial_sharpness():
    net = chaosjax.models.PureMLP((2, 6, 2), activation="tanh")
    ds = datasets.two_moons(40, seed=1)
    tm = TrainingMap(
        net.apply, net.init_params(jax.random.PRNGKey(0), jnp.float64), ds,
        learning_rate=0.1, init_fn=lambda k: net.init_params(k, jnp.float64),
    )  # fmt: skip
    lam0 = {}
    for seed in (0, 1):
        s = tm.init_from_key(seed)
        lam0[seed] = float(chaosjax.hessian_eigs(tm, s, k=1).eigenvalues[0])
    grid = {"learning_rate": {s: [c / lam0[s] for c in (0.5, 1.5)] for s in (0, 1)}}
    batch = chaosjax.make_replicas(tm, seeds=[0, 1], grid=grid)
    eta = batch.coords["learning_rate"]
    np.testing.assert_allclose(eta * np.asarray([lam0[s] for s in batch.coords["seed"]]),
                               [0.5, 1.5, 0.5, 1.5])  # fmt: skip
    np.testing.assert_array_equal(batch.coords["grid_index"], [0, 1, 0, 1])
    np.testing.assert_allclose(batch.hparams["learning_rate"], eta)
    with pytest.raises(ValueError, match=r"grid.learning_rate: per-seed values need"):
        chaosjax.make_replicas(tm, seeds=[0, 2], grid=grid)


# ------------------------------------------------------------------------------------------
# from_step: the user's own train_step


def _user_setup(tx):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3))
    y = np.sin(x.sum(1, keepdims=True))

    def apply(p, xx):
        return jnp.tanh(xx @ p["w1"] + p["b1"]) @ p["w2"]

    p0 = {
        "w1": jnp.asarray(rng.normal(size=(3, 8)) * 0.5),
        "b1": jnp.zeros(8),
        "w2": jnp.asarray(rng.normal(size=(8, 1)) * 0.3),
    }

    def loss_fn(p, b):
        return jnp.mean((apply(p, b[0]) - b[1]) ** 2)

    @jax.jit
    def train_step(s, b):
        loss, g = jax.value_and_grad(loss_fn)(s.params, b)
        return s.apply_gradients(grads=g), {"loss": loss}

    def batch_fn(t, data):
        idx = jax.random.choice(jax.random.fold_in(jax.random.key(0), t), 64, (16,), False)
        return data[0][idx], data[1][idx]

    st = train_state.TrainState.create(apply_fn=apply, params=p0, tx=tx)
    return st, train_step, batch_fn, loss_fn, (jnp.asarray(x), jnp.asarray(y))


def test_from_step_equals_a_python_loop_of_the_users_train_step():
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 100)),
    )
    st, train_step, batch_fn, loss_fn, data = _user_setup(tx)
    for t in range(3):  # mid-training
        st, _ = train_step(st, batch_fn(t, data))
    tm = TrainingMap.from_step(train_step, st, batch_fn=batch_fn, data=data, loss_fn=loss_fn)
    s = tm.init()
    user = st
    step = jax.jit(tm.step)
    for t in range(10):
        s = step(s, t)
        user, _ = train_step(user, batch_fn(t, data))
    mine = tm.user_state(s)
    assert int(mine.step) == int(user.step) == 13
    for a, b in zip(jax.tree_util.tree_leaves(mine), jax.tree_util.tree_leaves(user)):
        if jnp.issubdtype(jnp.result_type(a), jnp.floating):
            assert rel(a, b) <= 1e-10
    # the step counter and the optimizer counts are carried, not dynamical
    assert tm.dim == 3 * tm.n_params
    # metrics are recordable; loss records, curvature and Lyapunov work on it
    batch = chaosjax.make_replicas(tm, base=s, n_perturbed=1, eps=1e-8)
    res = chaosjax.run_replicas(
        tm, batch, steps=6, record_every=3, custom_observables=tm.metric_observables(),
        trackers=[chaosjax.LyapunovTracker(k=2), chaosjax.CurvatureTracker(k=1)],
        progress=False,
    )  # fmt: skip
    assert np.all(np.isfinite(res.records["metric_loss"]))  # s is after 10 steps
    assert np.all(np.isnan(tm.metrics(tm.init())["loss"]))  # no step taken yet: NaN
    assert np.all(np.isfinite(res.records["sharpness"][0]))
    assert np.all(np.isnan(res.records["threshold"]))  # the optimizer is not declared
    assert np.all(np.isfinite(res.records["ftle"][0, 1:]))
    # CLVs and Hessian eigenvalues of the user's step
    clv = chaosjax.covariant_lyapunov_vectors(tm.step, s, k=2, steps=6, backward_transient=4)
    assert np.all(np.isfinite(clv.exponents)) and clv.vectors.shape[1] == tm.dim
    top = chaosjax.hessian_eigs(tm, s, k=1)
    np.testing.assert_allclose(top.eigenvalues[0], res.records["sharpness"][0, 0, 0], rtol=1e-6)


def test_from_step_jacobian_with_a_counter_matches_finite_differences():
    st, train_step, batch_fn, loss_fn, data = _user_setup(
        optax.sgd(optax.exponential_decay(0.1, 3, 0.5), momentum=0.9)
    )
    tm = TrainingMap.from_step(
        train_step, st, batch_fn=batch_fn, data=data, loss_fn=loss_fn,
        optimizer_kind="momentum", learning_rate=0.1,
    )  # fmt: skip
    s = tm.step(tm.step(tm.init(), 0), 1)
    x0, carry = split_state(s)

    def f(x):
        return xs(tm.step(tm.pack(x, carry), 2))

    jac = jax.jacfwd(f)(x0)
    h = 1e-6
    eye = jnp.eye(x0.shape[0], dtype=x0.dtype)
    fd = jax.vmap(lambda e: (f(x0 + h * e) - f(x0 - h * e)) / (2 * h))(eye).T
    assert float(jnp.max(jnp.abs(jac - fd))) < 1e-6
    thr = tm.threshold_at(s, 2)
    np.testing.assert_allclose(float(thr), (2 + 2 * 0.9) / 0.1)


# ------------------------------------------------------------------------------------------
# refusals: one line, the field named


class Holder(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(64, 10, rngs=rngs)
        self.tag = nnx.Variable("a string")

    def __call__(self, x):
        return self.lin(x.reshape(x.shape[0], -1))


class Growing(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(64, 10, rngs=rngs)
        self.seen = nnx.BatchStat(jnp.zeros((0,)))

    def __call__(self, x):
        self.seen.set_value(jnp.concatenate([self.seen.get_value(), jnp.ones((1,))]))
        return self.lin(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize(
    "cls, msg",
    [(Holder, "model: variable 'tag'"), (Growing, "model: variable 'seen' changes")],
)
def test_models_chaosjax_cannot_carry_are_refused_naming_the_variable(digits_small, cls, msg):
    with pytest.raises(TypeError, match=msg) as e:
        TrainingMap.from_nnx(cls(nnx.Rngs(0)), digits_small, learning_rate=0.1)
    assert "\n" not in str(e.value)


def test_from_step_refusals():
    st, train_step, batch_fn, _, data = _user_setup(optax.sgd(0.1))

    def not_jittable(t, data):
        return data[0][int(t) : int(t) + 4], data[1][int(t) : int(t) + 4]

    with pytest.raises(ValueError, match="batch_fn: must be jittable in t") as e:
        TrainingMap.from_step(train_step, st, batch_fn=not_jittable, data=data)
    assert "\n" not in str(e.value)
    with pytest.raises(TypeError, match=r"params: leaf 'step'.*must be floats"):
        TrainingMap.from_step(train_step, st, batch_fn=batch_fn, data=data, params=lambda s: s.step)
    with pytest.raises(ValueError, match="params: params\\(state\\) must return a part"):
        TrainingMap.from_step(
            train_step, st, batch_fn=batch_fn, data=data,
            params=lambda s: jax.tree_util.tree_map(lambda a: a * 2.0, s.params),
        )  # fmt: skip
    tm = TrainingMap.from_step(train_step, st, batch_fn=batch_fn, data=data)
    with pytest.raises(
        ValueError, match=r"observables: 'loss' needs a map with a 'loss' capability.*loss_fn"
    ):
        chaosjax.run_replicas(tm, chaosjax.make_replicas(tm), steps=2, observables=["loss"])
    res = chaosjax.run_replicas(tm, chaosjax.make_replicas(tm), steps=2, progress=False)
    assert "loss" not in res.records  # without loss_fn: no loss records by default


# ------------------------------------------------------------------------------------------
# your data


def test_dataset_from_arrays_checks_and_infers(tmp_path):
    x = np.random.default_rng(0).normal(size=(10, 4, 4, 1))
    ds = Dataset.from_arrays(x, np.arange(10) % 3)
    assert ds.task == "classification" and ds.n_classes == 3 and ds.input_shape == (4, 4, 1)
    assert not ds.has_test
    reg = Dataset.from_arrays(x[:, :, 0, 0], np.linspace(0, 1, 10))
    assert reg.task == "regression" and reg.y_train.shape == (10, 1)
    one = Dataset.from_arrays(np.ones((1, 2)), np.ones((1, 1)), name="catapult")
    assert one.x_train.shape == (1, 2) and not one.has_test
    cases = [
        ((x, np.arange(9)), ValueError, "y_train: 9 targets for 10 inputs"),
        ((np.full((3, 2), np.nan), np.arange(3)), ValueError, "x_train: contains NaN"),
        ((x, np.linspace(0, 1, 10)), TypeError, "y_train: a classification task needs integer"),
        ((np.array([["a", "b"]] * 3), np.arange(3)), TypeError, "x_train: inputs must be numbers"),
    ]
    for args, exc, msg in cases:
        kw = {"task": "classification"} if "classification" in msg else {}
        with pytest.raises(exc, match=msg):
            Dataset.from_arrays(*args, **kw)
    path = tmp_path / "data.npz"
    np.savez(path, x_train=x, y_train=np.arange(10) % 3)
    assert Dataset.from_npz(path).n_classes == 3
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=x)
    with pytest.raises(ValueError, match="y_train"):
        Dataset.from_npz(bad)
    digits = datasets.digits(n_test=497)
    assert digits.x_train.shape[0] == 1300 and digits.x_test.shape[0] == 497
