"""Loss landscapes: slices against closed forms, filter normalisation, trajectory planes,
directions on training maps (BatchNorm, your train step)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import chaosjax as cj
from chaosjax import landscape, models
from chaosjax.datasets import Dataset


@pytest.fixture(scope="module")
def quadratic():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a = q @ np.diag([5.0, 2.0, 1.0, 0.5, -0.3, 0.1]) @ q.T
    theta = rng.normal(size=6)
    A = jnp.asarray(a)

    def loss(p):
        return 0.5 * p @ A @ p

    return loss, jnp.asarray(theta), a, q


def test_1d_slice_is_the_quadratic_form(quadratic):
    loss, theta, a, q = quadratic
    for u in (q[:, 0], np.random.default_rng(1).normal(size=6)):
        s = landscape.slice(loss, theta, u, span=2.0, num=41)
        np.testing.assert_array_equal(s.alphas, np.linspace(-2.0, 2.0, 41))
        pts = np.asarray(theta)[None] + s.alphas[:, None] * u[None]
        expect = 0.5 * np.einsum("ni,ij,nj->n", pts, a, pts)
        np.testing.assert_allclose(s.values, expect, rtol=1e-12, atol=1e-12)
        assert s.betas is None and s.center == pytest.approx(float(loss(theta)), rel=1e-14)
    # along an eigenvector u_i: L(θ) + a_i⟨θ, u_i⟩α + ½ a_i α²
    s = landscape.slice(loss, theta, q[:, 1], span=1.0, num=11)
    ai, proj = 2.0, float(np.asarray(theta) @ q[:, 1])
    np.testing.assert_allclose(
        s.values, s.center + ai * proj * s.alphas + 0.5 * ai * s.alphas**2, rtol=1e-12
    )


def test_2d_slice_is_the_quadratic_form_in_any_chunking(quadratic):
    loss, theta, a, q = quadratic
    u, v = q[:, 0], q[:, 2] + 0.3 * q[:, 3]
    full = landscape.slice(loss, theta, [u, v], span=1.5, num=9)
    alpha, beta = np.meshgrid(full.alphas, full.betas, indexing="ij")
    pts = np.asarray(theta) + alpha[..., None] * u + beta[..., None] * v
    expect = 0.5 * np.einsum("abi,ij,abj->ab", pts, a, pts)
    np.testing.assert_allclose(full.values, expect, rtol=1e-12, atol=1e-12)
    chunked = landscape.slice(loss, theta, np.stack([u, v]), span=1.5, num=9, chunk_size=7)
    np.testing.assert_allclose(chunked.values, full.values, rtol=1e-14)


def test_slice_refuses_bad_input(quadratic):
    loss, theta, _, q = quadratic
    for kw, msg in (
        ({"num": 1}, "num: must be an integer >= 2"),
        ({"span": 0.0}, "span: must be a positive number"),
    ):
        with pytest.raises(ValueError, match=msg):
            landscape.slice(loss, theta, q[:, 0], **kw)
    with pytest.raises(ValueError, match="directions: one or two directions of dimension 6"):
        landscape.slice(loss, theta, np.ones(5))
    with pytest.raises(ValueError, match="directions: one or two"):
        landscape.slice(loss, theta, np.ones((3, 6)))
    with pytest.raises(ValueError, match="directions: contain NaN"):
        landscape.slice(loss, theta, np.full(6, np.nan))
    with pytest.raises(ValueError, match="kind: unknown 'pca'"):
        landscape.directions("pca", loss, theta)


def test_filter_normalisation_matches_each_filter_of_theta():
    rng = np.random.default_rng(2)
    params = {
        "conv": {"kernel": rng.normal(size=(3, 3, 2, 4)), "bias": rng.normal(size=4)},
        "dense": {"kernel": rng.normal(size=(5, 3)), "bias": rng.normal(size=3)},
    }
    d = jax.tree_util.tree_map(lambda w: rng.normal(size=w.shape), params)
    out = landscape.filter_normalize(d, params)
    for name, axes in (("conv", (0, 1, 2)), ("dense", (0,))):
        got = np.sqrt((np.asarray(out[name]["kernel"]) ** 2).sum(axis=axes))
        want = np.sqrt((params[name]["kernel"] ** 2).sum(axis=axes))
        np.testing.assert_allclose(got, want, rtol=1e-12)
        assert not np.asarray(out[name]["bias"]).any()  # Li et al.: biases zeroed
    kept = landscape.filter_normalize(d, params, bias="filter")
    np.testing.assert_allclose(
        np.linalg.norm(kept["dense"]["bias"]), np.linalg.norm(params["dense"]["bias"])
    )

    # through directions(): flat rows in the parameters' own layout
    def loss(p):
        return jnp.sum(p["dense"]["kernel"] ** 2)

    rows = landscape.directions("filter", loss, params, k=2, key=jax.random.PRNGKey(3))
    assert rows.shape == (2, 3 * 3 * 2 * 4 + 4 + 5 * 3 + 3)
    assert not np.allclose(rows[0], rows[1])


def test_trajectory_plane_recovers_a_known_plane():
    rng = np.random.default_rng(4)
    basis, _ = np.linalg.qr(rng.normal(size=(50, 2)))
    t = np.linspace(0, 3, 60)
    coords = np.stack([np.cos(t) * (3 - t), 0.5 * np.sin(2 * t)], 1)
    end = rng.normal(size=50)
    states = end + (coords - coords[-1]) @ basis.T
    plane = landscape.trajectory_plane(states, k=2)
    assert plane.explained.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(plane.directions.T @ plane.directions @ basis, basis, atol=1e-10)
    np.testing.assert_allclose(landscape.project(states, plane), plane.coordinates, atol=1e-12)
    with pytest.raises(ValueError, match="states: contain NaN"):
        landscape.trajectory_plane(np.full((3, 4), np.nan))


def test_training_maps_hessian_direction_batchnorm_and_train_step():
    jax.config.update("jax_enable_x64", True)
    ds = cj.datasets.digits(images=True, n_test=32)
    ds = Dataset.from_arrays(ds.x_train[:32], ds.y_train[:32], ds.x_test, ds.y_test)
    model = models.ResNet((8, 8, 1), 10, width=2, depth=1, rngs=nnx.Rngs(0), dtype=jnp.float64)
    tm = cj.TrainingMap.from_nnx(model, ds, loss="cross_entropy", learning_rate=0.1)
    s = tm.init()
    u = landscape.directions("hessian", tm, s, k=1, n_matvecs=60)
    lam = float(cj.hessian_eigs(tm, s, k=1, n_matvecs=60).eigenvalues[0])
    sl = landscape.slice(tm, s, u[0], span=1e-4, num=5)
    h = sl.alphas[1] - sl.alphas[0]
    second = (sl.values[3] - 2 * sl.values[2] + sl.values[1]) / h**2  # curvature along u
    assert second == pytest.approx(lam, rel=1e-3)  # ReLU kinks and round-off
    assert sl.center == pytest.approx(float(tm.loss_of_params(tm.params(s))), rel=1e-12)
    # the separation of a perturbed replica, unit norm
    other = tm.with_params(s, tm.flat_params(s) + 1e-3 * u[0])
    sep = landscape.directions("separation", tm, s, other=other)
    np.testing.assert_allclose(sep[0], u[0], atol=1e-8)
    filt = landscape.directions("filter", tm, s, k=1)
    assert filt.shape == (1, tm.n_params) and np.isfinite(filt).all()

    # your own train step (loss_fn given): the slice is of loss_fn on eval_batch
    x = jnp.asarray(ds.x_train.reshape(32, -1), jnp.float64)
    y = jnp.asarray(ds.y_train)
    tx = optax.sgd(0.1)

    def loss_fn(p, batch):
        return optax.softmax_cross_entropy_with_integer_labels(batch[0] @ p["w"], batch[1]).mean()

    def train_step(state, batch):
        g = jax.grad(loss_fn)(state["params"], batch)
        u_, o = tx.update(g, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], u_), "opt": o}

    p0 = {"w": 0.01 * jax.random.normal(jax.random.PRNGKey(0), (64, 10), jnp.float64)}
    smap = cj.TrainingMap.from_step(
        train_step, {"params": p0, "opt": tx.init(p0)}, batch_fn=lambda t, d: d,
        data=(x, y), loss_fn=loss_fn,
    )  # fmt: skip
    ss = smap.init()
    d2 = landscape.directions("random", smap, ss, k=2)
    sl2 = landscape.slice(smap, ss, d2, span=0.5, num=5)
    assert sl2.values.shape == (5, 5)
    assert sl2.values[2, 2] == pytest.approx(float(loss_fn(p0, (x, y))), rel=1e-12)


def test_clv_directions_are_the_parameter_part_of_the_vectors():
    jax.config.update("jax_enable_x64", True)
    ds = cj.datasets.two_moons(40)
    net = models.PureMLP((2, 6, 2))
    tm = cj.TrainingMap(
        net.apply, net.init_params(jax.random.PRNGKey(0), jnp.float64), ds,
        optimizer="momentum", learning_rate=0.5,
    )  # fmt: skip
    clv = cj.covariant_lyapunov_vectors(
        tm.step, tm.init(), k=2, steps=8, backward_transient=4, keep_every=4
    )
    d = landscape.directions("clv", tm, tm.init(), k=2, clv=clv, index=0)
    assert d.shape == (2, tm.n_params)  # momentum buffers dropped: a slice is in θ
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, rtol=1e-12)
    v = np.asarray(clv.vectors[0, : tm.n_params, 0])
    np.testing.assert_allclose(d[0], v / np.linalg.norm(v), rtol=1e-12)
    with pytest.raises(ValueError, match="k: the CLVResult holds 2 vectors"):
        landscape.directions("clv", tm, tm.init(), k=3, clv=clv)
    with pytest.raises(TypeError, match="kind 'clv' needs clv="):
        landscape.directions("clv", tm, tm.init())
