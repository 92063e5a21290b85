import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chaosjax import datasets, models, systems
from chaosjax.clv import clv_layer_mass, clv_memory_bytes, covariant_lyapunov_vectors
from chaosjax.training import TrainingMap


def unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def test_non_normal_map_clvs_are_not_gram_schmidt():
    lm = systems.linear_map(matrix=jnp.array([[2.0, 1.0], [0.0, 0.5]]))
    res = covariant_lyapunov_vectors(
        lm.step, lm.x0, k=2, steps=40, align=40, backward_transient=40, keep_every=10
    )
    v1, v2 = unit([1.0, 0.0]), unit([1.0, -1.5])
    for vs in res.vectors:
        assert abs(vs[:, 0] @ v1) > 1 - 1e-8
        assert abs(vs[:, 1] @ v2) > 1 - 1e-8
    np.testing.assert_allclose(
        np.degrees(res.angles), math.degrees(math.acos(abs(v1 @ v2))), atol=1e-6
    )
    assert abs(np.degrees(res.angles[0]) - 56.3) < 0.05
    # the second Gram–Schmidt (backward) vector is orthogonal to the first: not a CLV
    gs2 = res.vectors_at(0)[:, 0] @ np.array([[0.0, 1.0], [-1.0, 0.0]])  # ⟂ to CLV1 = GS1
    assert abs(gs2 @ v2) < 0.9
    np.testing.assert_allclose(res.exponents, [np.log(2), np.log(0.5)], atol=1e-10)


def test_upper_triangular_map_clvs_are_eigenvectors():
    rng = np.random.default_rng(4)
    a = np.triu(rng.normal(size=(5, 5)))
    a[np.diag_indices(5)] = [2.5, -1.7, 1.2, 0.6, -0.3]
    lm = systems.linear_map(matrix=jnp.asarray(a))
    res = covariant_lyapunov_vectors(
        lm.step, lm.x0, k=5, steps=60, align=200, backward_transient=200, keep_every=20
    )
    ev, evec = np.linalg.eig(a)
    order = np.argsort(-np.abs(ev))
    for vs in res.vectors:
        for i, j in enumerate(order):
            assert abs(vs[:, i] @ unit(evec[:, j].real)) > 1 - 1e-8
    np.testing.assert_allclose(res.exponents, np.log(np.abs(ev[order])), atol=1e-9)


@pytest.fixture(scope="module")
def henon_clv():
    h = systems.henon()
    res = covariant_lyapunov_vectors(
        h.step, h.x0, k=2, steps=20_000, warmup=100, align=200, backward_transient=200, keep_every=1
    )
    return h, res


def test_henon_clv1_is_first_backward_vector(henon_clv):
    _, res = henon_clv
    for n in (5, 1234, 19_999):
        gs = res.backward_vectors_at(n)
        np.testing.assert_allclose(gs.T @ gs, np.eye(2), atol=1e-12)
        assert abs(gs[:, 0] @ res.vectors[n][:, 0]) > 1 - 1e-12
        # the second backward vector is orthogonal to the first, the second CLV is not
        assert abs(gs[:, 1] @ res.vectors[n][:, 1]) < 1 - 1e-6
        np.testing.assert_allclose(res.vectors_at(n), res.vectors[n], atol=1e-12)


def test_henon_covariance_and_growth(henon_clv):
    h, res = henon_clv
    for n in (10, 500, 7000, 15000):
        x = jnp.asarray(res.states[n])
        j = np.asarray(jax.jacfwd(h.step)(x, int(res.times[n])))
        for i in range(2):
            jv = j @ res.vectors[n][:, i]
            assert abs(unit(jv) @ res.vectors[n + 1][:, i]) > 1 - 1e-8
    # time averages of log‖J v_i‖ reproduce the exponents
    growth = []
    for n in range(0, 20_000 - 1):
        j = np.array([[-2.8 * res.states[n][0], 1.0], [0.3, 0.0]])
        growth.append(np.log(np.linalg.norm(j @ res.vectors[n], axis=0)))
    np.testing.assert_allclose(np.mean(growth, axis=0), res.qr_exponents, atol=1e-2)
    np.testing.assert_allclose(res.exponents, [0.4194, -1.6234], atol=1e-2)


def test_henon_angles(henon_clv):
    _, res = henon_clv
    med = np.degrees(np.median(res.angles))
    assert 45 <= med <= 65
    assert res.near_tangencies > 0 and np.degrees(res.angles.min()) < 1.0
    assert res.angle_matrix.shape == (20_000, 2, 2)
    np.testing.assert_allclose(res.angle_matrix[:, 0, 1], res.angles)


def test_lorenz63_zero_exponent_clv_is_the_flow_direction():
    lz = systems.lorenz63()
    res = covariant_lyapunov_vectors(
        lz.step,
        lz.x0,
        k=3,
        steps=2000,
        warmup=2000,
        align=5000,
        backward_transient=5000,
        keep_every=200,
    )
    for x, vs in zip(res.states, res.vectors):
        f = unit(lz.vector_field(jnp.asarray(x)))
        assert abs(vs[:, 1] @ f) > 1 - 1e-6
    assert abs(res.exponents[1] / lz.dt) < 0.1  # finite-time value over 20 time units


def test_gd_quadratic_clvs_are_eigenvectors():
    q = systems.quadratic_gd(eigenvalues=(0.5, 3.0, 9.0, 21.0), learning_rate=0.075, seed=1)
    res = covariant_lyapunov_vectors(
        q.step, q.x0, k=4, steps=50, align=300, backward_transient=300, keep_every=25
    )
    ev, evec = np.linalg.eigh(np.asarray(q.matrix))
    order = np.argsort(-np.abs(1 - 0.075 * ev))
    for vs in res.vectors:
        for i, j in enumerate(order):
            assert abs(vs[:, i] @ evec[:, j]) > 1 - 1e-8


def test_batched_equals_single():
    h = systems.henon()
    x0s = jnp.stack([h.x0, h.x0 * 1.1, h.x0 * 0.9])
    kw = dict(k=2, steps=300, warmup=50, align=50, backward_transient=60, keep_every=100)
    res = covariant_lyapunov_vectors(h.step, x0s, batched=True, **kw)
    assert res.vectors.shape == (3, 3, 2, 2) and res.angles.shape == (3, 300)
    one = covariant_lyapunov_vectors(h.step, x0s[1], **kw)
    np.testing.assert_allclose(res.vectors[1], one.vectors, atol=1e-10)
    np.testing.assert_allclose(res.exponents[1], one.exponents, atol=1e-12)


def test_training_map_clvs_and_layer_mass():
    net = models.PureMLP((2, 5, 2))
    tm = TrainingMap(
        net.apply,
        net.init_params(jax.random.PRNGKey(0)),
        datasets.two_moons(30),
        optimizer="momentum",
        learning_rate=0.3,
    )
    res = covariant_lyapunov_vectors(
        tm.step, tm.init(), k=4, steps=40, align=20, backward_transient=40, keep_every=20
    )
    assert res.vectors.shape == (2, tm.dim, 4)
    np.testing.assert_allclose(np.linalg.norm(res.vectors, axis=1), 1.0, atol=1e-10)
    np.testing.assert_allclose(res.exponents, res.qr_exponents, atol=0.05)
    mass = clv_layer_mass(res.vectors, tm.layers, tm.n_params)
    assert set(mass) == {"layer_0", "layer_1", "optimizer"}
    np.testing.assert_allclose(sum(mass.values()), 1.0, atol=1e-10)


def test_host_memory_limit_refused_before_running():
    h = systems.henon()
    need = clv_memory_bytes(2, 2, 1_000_000 + 100, 1_000_000)
    with pytest.raises(ValueError, match="host_memory_limit"):
        covariant_lyapunov_vectors(
            h.step,
            h.x0,
            k=2,
            steps=1_000_000,
            backward_transient=100,
            keep_every=1,
            host_memory_limit=need - 1,
        )


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"backward_transient": -1}, "backward_transient"),
        ({"backward_transient": 10, "keep_every": 3, "renorm_every": 2}, "keep_every"),
        ({"backward_transient": 10, "k": 5}, "k:"),
    ],
)
def test_bad_arguments(kwargs, msg):
    h = systems.henon()
    kw = {"k": 2, "steps": 10, **kwargs}
    with pytest.raises(ValueError, match=msg):
        covariant_lyapunov_vectors(h.step, h.x0, **kw)
