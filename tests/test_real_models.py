"""Real architectures (a ResNet with BatchNorm, a Transformer) through chaosjax, and the
replica strategies (vmap, lax.map, lax.map over vmap blocks)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import chaosjax as cj
from chaosjax import datasets, models
from chaosjax.datasets import Dataset
from chaosjax.engine import default_strategy


@pytest.fixture(scope="module")
def digits_images():
    ds = datasets.digits(images=True, n_test=32)
    return Dataset.from_arrays(ds.x_train[:64], ds.y_train[:64], ds.x_test, ds.y_test)


def assert_params_match(ours, model, bound, skip=None):
    """Every parameter of the map equals the user's model's to ``bound`` × its largest weight
    (leaves whose path contains ``skip`` left out)."""
    ours = dict(jax.tree_util.tree_leaves_with_path(ours))
    theirs = dict(jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)))
    assert ours.keys() == theirs.keys()
    scale = max(float(jnp.max(jnp.abs(b))) for b in theirs.values())
    for path, b in theirs.items():
        name = jax.tree_util.keystr(path)
        if skip is not None and skip in name:
            continue
        assert ours[path].shape == b.shape, name
        assert float(jnp.max(jnp.abs(ours[path] - b))) <= bound * scale, name


def resnet_map(ds, batch_norm=True, width=4, depth=2, **kw):
    def make(rngs):
        return models.ResNet(
            (8, 8, 1), 10, width=width, depth=depth, batch_norm=batch_norm, rngs=rngs,
            dtype=jnp.float64,
        )  # fmt: skip

    kw.setdefault("optimizer", "momentum")
    kw.setdefault("learning_rate", 0.05)
    return cj.TrainingMap.from_nnx(
        make(nnx.Rngs(0)), ds, loss="cross_entropy", batch_size=16, model_factory=make, **kw
    )


def test_resnet_with_batchnorm_equals_a_hand_written_loop(digits_images):
    model = models.ResNet((8, 8, 1), 10, width=4, depth=2, rngs=nnx.Rngs(0), dtype=jnp.float64)
    tm = cj.TrainingMap.from_nnx(
        model, digits_images, loss="cross_entropy", optimizer=optax.sgd(0.05, momentum=0.9),
        batch_size=16,
    )  # fmt: skip
    opt = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)
    x_all = jnp.asarray(digits_images.x_train, jnp.float64)
    y_all = jnp.asarray(digits_images.y_train)

    @nnx.jit
    def user_step(m, o, x, y):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        o.update(m, nnx.grad(loss_fn)(m))

    s = tm.init()
    for t in range(4):
        s = tm.step(s, t)
        idx = tm.batch_indices(t)
        user_step(model, opt, x_all[idx], y_all[idx])
    assert_params_match(tm.params(s), model, 1e-10)
    stats = jax.tree_util.tree_leaves(nnx.state(model, nnx.BatchStat))
    for a, b in zip(jax.tree_util.tree_leaves(s.carry[0]), stats):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-10 * float(jnp.max(jnp.abs(b)))
    # finite spectrum and curvature
    spec = cj.lyapunov_spectrum(tm.step, s, k=2, steps=6)
    assert np.all(np.isfinite(spec.exponents))
    top = cj.hessian_eigs(tm, s, k=2)
    assert np.all(np.isfinite(top.eigenvalues)) and top.eigenvalues[0] >= top.eigenvalues[1]


@pytest.mark.slow  # a Transformer from_nnx run is in test_your_training; this is its fidelity
def test_transformer_on_tokens_equals_the_users_loop_and_has_finite_curvature():
    p = 5
    a, b = np.meshgrid(np.arange(p), np.arange(p))
    x = np.stack([a.ravel(), b.ravel(), np.full(p * p, p)], 1).astype(np.int32)
    y = ((a + b) % p).ravel().astype(np.int32)
    ds = Dataset.from_arrays(x[:15], y[:15], x[15:], y[15:])

    def make(rngs):
        return models.Transformer(p + 1, 3, p, d_model=8, n_heads=2, rngs=rngs, dtype=jnp.float64)

    model = make(nnx.Rngs(0))
    tm = cj.TrainingMap.from_nnx(
        model, ds, loss="cross_entropy", optimizer=optax.adamw(1e-2), model_factory=make,
    )  # fmt: skip
    # fidelity: the user's own nnx.Optimizer loop on the same (full) batch
    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)

    @nnx.jit
    def user_step(m, o):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        o.update(m, nnx.grad(loss_fn)(m))

    s = s0 = tm.init()
    for t in range(3):
        s = tm.step(s, t)
        user_step(model, opt)
    assert float(tm.loss(s)) < float(tm.loss(s0))
    # Adam amplifies round-off: bound 1e-7 of the largest weight over 3 steps. Softmax is
    # invariant to the key bias: its gradient is round-off (~1e-10), which Adam normalises into
    # O(η) steps, so that leaf follows each program's rounding and is left out
    assert_params_match(tm.params(s), model, 1e-7, skip="['key']['bias']")
    top = cj.hessian_eigs(tm, s, k=2, n_matvecs=30)
    assert np.all(np.isfinite(top.eigenvalues)) and top.eigenvalues[0] >= top.eigenvalues[1]
    # replicas with tangents on a Transformer: the slingshot preset's tiny run (test_presets)


def test_replica_strategies_agree_and_are_recorded(digits_images, tmp_path):
    tm = resnet_map(digits_images, batch_norm=True, width=2, depth=1)  # three compilations
    batch = cj.make_replicas(tm, seeds=[0], n_perturbed=3, eps=1e-6)
    out = {}
    for strategy in ("vmap", "map", 2):
        res = cj.run_replicas(
            tm, batch, steps=4, record_every=2, strategy=strategy, devices=1,
            trackers=[cj.LyapunovTracker(k=2)], progress=False,
        )  # fmt: skip
        out[strategy] = res
        assert res.attrs["replica_strategy"] == str(strategy)
    for s in ("map", 2):
        np.testing.assert_allclose(
            out[s].final_state, out["vmap"].final_state, rtol=1e-10, atol=1e-12
        )
        np.testing.assert_allclose(
            out[s].records["ftle"][0, 1:], out["vmap"].records["ftle"][0, 1:], rtol=1e-7
        )
    # the default comes from the rule, never from timing
    assert default_strategy(tm, "cpu") == "map" and default_strategy(tm, "gpu") == "vmap"
    assert default_strategy(tm.step, "cpu") == "map"  # a map's bound step
    mlp = cj.TrainingMap(
        models.PureMLP((2, 4, 2)).apply,
        models.PureMLP((2, 4, 2)).init_params(jax.random.PRNGKey(0)),
        datasets.two_moons(20),
        learning_rate=0.1,
    )
    assert default_strategy(mlp, "cpu") == "vmap"
    # attention kernels are rank 3 but no convolution: vmap
    tr = cj.TrainingMap.from_nnx(
        models.Transformer(5, 3, 5, d_model=8, n_heads=2, rngs=nnx.Rngs(0)),
        Dataset.from_arrays(np.zeros((4, 3), np.int32), np.arange(4, dtype=np.int32)),
        loss="cross_entropy", learning_rate=0.1,
    )  # fmt: skip
    assert default_strategy(tr, "cpu") == "vmap"
    with pytest.raises(ValueError, match="strategy: must be"):
        cj.run_replicas(tm, batch, steps=2, strategy="loop")
    # a checkpoint of one strategy does not resume another (the fingerprint holds it)
    ck = tmp_path / "ck.npz"

    def stop(t):
        if t >= 2:
            raise KeyboardInterrupt

    kw = {"steps": 4, "record_every": 2, "chunk_steps": 2, "checkpoint": ck, "progress": False}
    kw["devices"] = 1  # one device: strategies, not sharding (tested in test_sharding)
    with pytest.raises(KeyboardInterrupt):
        cj.run_replicas(tm, batch, strategy="map", on_chunk=stop, **kw)
    assert ck.exists()
    with pytest.raises(ValueError, match="resume: checkpoint"):
        cj.run_replicas(tm, batch, strategy="vmap", resume=True, **kw)
    done = cj.run_replicas(tm, batch, strategy="map", resume=True, **kw)
    np.testing.assert_array_equal(done.final_state, out["map"].final_state)
