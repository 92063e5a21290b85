import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chaosjax import systems
from chaosjax._util import as_traceable

ALL = [
    systems.logistic(),
    systems.henon(),
    systems.standard_map(),
    systems.linear_map(),
    systems.lorenz63(),
    systems.lorenz96(n=8),
    systems.quadratic_gd(),
]


@pytest.mark.parametrize("system", ALL, ids=lambda s: s.name)
def test_step_keeps_shape_and_jits(system):
    x = system.x0
    y = system.step(x, 0)
    assert y.shape == x.shape and jnp.all(jnp.isfinite(y))
    f = jax.jit(lambda p, x, t: p(x, t))
    np.testing.assert_allclose(f(as_traceable(system.step), x, 0), y, rtol=1e-12)


def test_henon_jacobian_determinant_is_b():
    h = systems.henon(b=0.3)
    x = h.x0
    for t in range(50):
        assert abs(abs(np.linalg.det(jax.jacfwd(h.step)(x, t))) - 0.3) < 1e-12
        x = h.step(x, t)


def test_standard_map_area_preserving():
    s = systems.standard_map(k=6.0)
    x = s.x0
    for t in range(20):
        assert abs(np.linalg.det(jax.jacfwd(s.step)(x, t)) - 1.0) < 1e-12
        x = s.step(x, t)
        assert jnp.all((x >= 0) & (x < 2 * np.pi))


def test_lorenz63_rk4_is_fourth_order():
    def integrate(dt, n):
        sys_ = systems.lorenz63(dt=dt)
        x = sys_.x0
        for t in range(n):
            x = sys_.step(x, t)
        return x

    ref = integrate(0.0005, 400)  # t = 0.2
    e1 = np.linalg.norm(integrate(0.02, 10) - ref)
    e2 = np.linalg.norm(integrate(0.01, 20) - ref)
    assert 12 < e1 / e2 < 20  # 2^4 = 16 for a fourth-order method


def test_lorenz96_fixed_point_and_divergence():
    l96 = systems.lorenz96(n=10, forcing=8.0)
    np.testing.assert_allclose(l96.vector_field(jnp.full(10, 8.0)), 0.0, atol=1e-12)
    # vector field divergence is −n (sum of exponents per unit time is −n)
    tr = jnp.trace(jax.jacfwd(l96.vector_field)(l96.x0))
    assert abs(float(tr) + 10) < 1e-12


def test_quadratic_gd_exact_exponents():
    q = systems.quadratic_gd(eigenvalues=(1.0, 5.0, 12.0, 25.0), learning_rate=0.1)
    ev = np.linalg.eigvalsh(np.asarray(q.matrix))
    np.testing.assert_allclose(np.sort(ev), [1, 5, 12, 25], atol=1e-10)
    np.testing.assert_allclose(
        q.exact_exponents(), np.sort(np.log(np.abs(1 - 0.1 * ev)))[::-1], rtol=1e-12
    )
    x = q.x0
    np.testing.assert_allclose(q.step(x, 0), x - 0.1 * jax.grad(q.loss)(x), rtol=1e-12)


def test_linear_map_exponents():
    lm = systems.linear_map(matrix=jnp.array([[2.0, 1.0], [0.0, 0.5]]))
    np.testing.assert_allclose(lm.exact_exponents(), [np.log(2), np.log(0.5)])


def test_systems_are_pytrees_with_array_leaves():
    q = systems.quadratic_gd()
    leaves = jax.tree_util.tree_leaves(q)
    assert len(leaves) == 1 and leaves[0].shape == (4, 4)
    # vmap over replicas of the initial state
    xs = jnp.stack([q.x0, 2 * q.x0])
    np.testing.assert_allclose(jax.vmap(q.step, in_axes=(0, None))(xs, 0)[1], 2 * q.step(q.x0, 0))


@pytest.mark.parametrize(
    "make, msg",
    [
        (lambda: systems.logistic(r=5.0), "r:"),
        (lambda: systems.lorenz63(dt=0.0), "dt:"),
        (lambda: systems.lorenz96(n=2), "n:"),
        (lambda: systems.linear_map(matrix=jnp.ones((2, 3))), "matrix:"),
        (lambda: systems.quadratic_gd(matrix=jnp.array([[1.0, 2.0], [0.0, 1.0]])), "symmetric"),
        (lambda: systems.quadratic_gd(learning_rate=-1.0), "learning_rate:"),
    ],
)
def test_bad_parameters_are_named(make, msg):
    with pytest.raises(ValueError, match=msg):
        make()
