import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chaosjax as cj
from chaosjax import response as rs
from chaosjax.training import mse_loss


@pytest.fixture(scope="module")
def net():
    n = cj.models.PureMLP((3, 7, 1), activation="tanh")
    p = n.init_params(jax.random.PRNGKey(0), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (9, 3))
    return n, p, x


def test_matrix_free_ntk_equals_jacobian_product():
    n = cj.models.PureMLP((3, 5, 2), activation="tanh")
    p = n.init_params(jax.random.PRNGKey(0), jnp.float64)
    x1 = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    x2 = jax.random.normal(jax.random.PRNGKey(2), (6, 3))
    flat, unravel = jax.flatten_util.ravel_pytree(p)
    j1 = jax.jacrev(lambda q: n.apply(unravel(q), x1))(flat)  # (4, 2, P)
    j2 = jax.jacrev(lambda q: n.apply(unravel(q), x2))(flat)
    explicit = np.einsum("iap,jbp->ijab", j1, j2)
    k = rs.ntk(n.apply, p, x1, x2, chunk_size=5)
    assert k.shape == (4, 6, 2, 2)
    np.testing.assert_allclose(k, explicit, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        rs.ntk(n.apply, p, x1, x2, trace=True), np.trace(explicit, axis1=2, axis2=3), rtol=1e-12
    )


def test_one_hidden_layer_terms_sum_to_the_ntk(net):
    n, p, x = net
    out_term, hid_term = rs.one_hidden_layer_ntk_terms(p, x, x[:4], "tanh")
    np.testing.assert_allclose(
        out_term + hid_term, rs.ntk(n.apply, p, x, x[:4]), rtol=1e-10, atol=1e-10
    )
    assert np.all(
        np.linalg.eigvalsh(np.asarray(rs.one_hidden_layer_ntk_terms(p, x, x, "tanh")[0])) > -1e-10
    )


def test_response_is_first_order_in_eta(net):
    n, p, x = net
    xs, ys = x[:1], jnp.array([[0.7]])
    probes = x[1:]
    resid = []
    for lr in (1e-2, 5e-3):
        r = rs.one_step_response(n.apply, mse_loss, p, xs, ys, probes, lr)
        resid.append(float(jnp.linalg.norm(r.delta_f - r.first_order)))
        theta = rs.ntk(n.apply, p, probes, xs)[:, 0]
        np.testing.assert_allclose(r.first_order[:, 0], -lr * theta * r.loss_grad[0, 0], rtol=1e-10)
        np.testing.assert_allclose(r.response, theta, rtol=0.05)  # R → Θ as η → 0
    assert abs(resid[0] / resid[1] - 4.0) < 0.4


def test_participation_ratio_of_a_known_spectrum():
    lam = np.array([4.0, 2.0, 1.0, 1.0, 0.5])
    n = 50
    q, _ = np.linalg.qr(np.column_stack([np.ones(n), np.random.default_rng(0).normal(size=(n, 5))]))
    x = np.sqrt(n - 1) * q[:, 1:] * np.sqrt(lam)  # mean zero, covariance exactly diag(λ)
    assert rs.participation_ratio(x) == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-12)
    p = lam / lam.sum()
    assert rs.effective_rank(x) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-12)
    assert rs.gram_participation_ratio(np.diag(lam)) == pytest.approx(
        lam.sum() ** 2 / (lam**2).sum()
    )
    assert rs.participation_ratio(np.outer(np.arange(10.0), np.ones(3))) == pytest.approx(1.0)


def test_power_law_and_shape_correlation():
    t = np.arange(1, 200)
    fit = rs.power_law_fit(t, 3.0 * t**-0.7)
    assert (
        fit.alpha == pytest.approx(0.7)
        and fit.prefactor == pytest.approx(3.0)
        and fit.r2 > 0.999999
    )
    k = np.random.default_rng(1).normal(size=(5, 5))
    assert rs.kernel_shape_correlation(2.5 * k, k) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        rs.kernel_shape_correlation(k, k[:2])


def test_fragility_of_a_scaled_identity():
    def apply(p, x):
        return p["c"] * x

    fr = rs.fragility(apply, {"c": jnp.asarray(3.0)}, jnp.ones((4, 2)), eps=1e-6)
    assert fr.input == pytest.approx(3.0, rel=1e-6)
    assert fr.weight == pytest.approx(np.sqrt(2.0), rel=1e-6)  # ‖δc·x_i‖/|δc| = ‖x_i‖


def test_response_tracker_in_a_replica_run():
    net = cj.models.PureMLP((5, 16, 1), activation="tanh")
    ds = cj.datasets.teacher_student(64, d_in=5, d_out=1, seed=0)
    p = net.init_params(jax.random.PRNGKey(0), jnp.float64)
    tm = cj.TrainingMap(
        net.apply, p, ds, optimizer="sgd", learning_rate=0.05, features_fn=net.features
    )
    res = cj.run_replicas(
        tm,
        cj.make_replicas(tm),
        steps=40,
        record_every=10,
        observables=("loss",),
        trackers=[rs.ResponseTracker(n_probes=12)],
        progress=False,
    )
    a = res.records["ntk_amplitude"][0]
    x = tm.data["x_train"][:12]
    theta0 = rs.ntk(net.apply, p, x)
    np.testing.assert_allclose(a[0], np.mean(np.diag(theta0)), rtol=1e-10)
    assert res.records["ntk_shape_corr"][0, 0] == pytest.approx(1.0)
    out_t, hid_t = rs.one_hidden_layer_ntk_terms(p, x, x, "tanh")
    lay = res.records["ntk_layer_amplitude"][0, 0]  # layer_0 = hidden term, layer_1 = output term
    np.testing.assert_allclose(lay, [np.mean(np.diag(hid_t)), np.mean(np.diag(out_t))], rtol=1e-10)
    assert 1.0 <= res.records["ntk_pr"][0, 0] <= 12 and 1.0 <= res.records["feature_pr"][0, 0] <= 16
