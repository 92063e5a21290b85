import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chaosjax as cj
from chaosjax import curvature as cv
from chaosjax._krylov import _tridiag
from chaosjax.optimizers import stability_threshold


@pytest.fixture(scope="module")
def quad():
    rng = np.random.default_rng(0)
    n = 40
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    ev = np.concatenate([[12.0, 9.0, 7.5, -4.0], rng.uniform(-1, 3, n - 4)])
    a = (q * ev) @ q.T
    return 0.5 * (a + a.T), ev, q


@pytest.fixture(scope="module")
def tiny():
    net = cj.models.PureMLP((3, 6, 2), activation="tanh")
    p = net.init_params(jax.random.PRNGKey(0), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (24, 3))
    y = jax.random.normal(jax.random.PRNGKey(2), (24, 2))

    def loss(p):
        return cj.training.mse_loss(net.apply(p, x), y)

    return net, p, x, y, loss


def test_quadratic_eigs_trace_density(quad):
    a, ev, q = quad
    loss = lambda th: 0.5 * th @ (a @ th)  # noqa: E731
    th = jnp.zeros(a.shape[0])
    r = cj.hessian_eigs(loss, th, 3)
    np.testing.assert_allclose(r.eigenvalues, [12.0, 9.0, 7.5], rtol=1e-10)
    for i, j in enumerate([0, 1, 2]):
        assert abs(r.eigenvectors[i] @ q[:, j]) > 1 - 1e-10
    assert bool(r.converged.all()) and r.eigenvectors.shape == (3, 40)
    small = cj.hessian_eigs(loss, th, 1, which="smallest")
    np.testing.assert_allclose(small.eigenvalues, [-4.0], rtol=1e-10)  # algebraic, not magnitude
    tr = cj.hessian_trace(loss, th, n_probes=200, key=jax.random.PRNGKey(3))
    assert abs(tr.estimate - ev.sum()) < 3 * tr.stderr
    hpp = cj.hessian_trace(loss, th, n_probes=60, key=jax.random.PRNGKey(3), method="hutch++")
    assert abs(hpp.estimate - ev.sum()) < 3 * hpp.stderr + 1e-8
    d = cj.hessian_density(loss, th, n_matvecs=40, n_runs=4, key=jax.random.PRNGKey(4))
    assert abs(float(d.weights.sum()) - 1) < 1e-12
    # with m = dim the nodes are the exact eigenvalues
    nodes = np.unique(np.round(np.asarray(d.nodes), 8))
    np.testing.assert_allclose(
        np.sort(ev), nodes[np.abs(nodes[:, None] - np.sort(ev)[None]).argmin(0)], atol=1e-7
    )


def test_tiny_mlp_against_dense_hessian(tiny):
    _, p, _, _, loss = tiny
    h = np.asarray(cv.dense_hessian(loss, p))
    ev, evec = np.linalg.eigh(h)
    ev, evec = ev[::-1], evec[:, ::-1]
    flat = jax.flatten_util.ravel_pytree(p)[0]
    np.testing.assert_allclose(
        h,
        np.asarray(jax.hessian(lambda v: loss(jax.flatten_util.ravel_pytree(p)[1](v)))(flat)),
        atol=1e-12,
    )
    r = cj.hessian_eigs(loss, p, 5)
    np.testing.assert_allclose(r.eigenvalues, ev[:5], rtol=1e-6)
    for i in range(5):
        assert abs(r.eigenvectors[i] @ evec[:, i]) > 1 - 1e-6
    hv = cj.hvp(loss, p, jax.tree_util.tree_map(jnp.ones_like, p))
    np.testing.assert_allclose(
        jax.flatten_util.ravel_pytree(hv)[0], h @ np.ones(h.shape[0]), rtol=1e-10
    )


def test_ggn_equals_hessian_for_linear_model():
    x = jax.random.normal(jax.random.PRNGKey(0), (30, 4))
    y = jax.random.normal(jax.random.PRNGKey(1), (30, 2))
    p = {"w": jax.random.normal(jax.random.PRNGKey(2), (4, 2)), "b": jnp.zeros(2)}

    def apply(p, x):
        return x @ p["w"] + p["b"]

    ggn, flat = cv.ggn_operator(apply, cj.training.mse_loss, p, x, y)
    hess, _ = cv.hessian_operator(lambda q: cj.training.mse_loss(apply(q, x), y), p)
    eye = jnp.eye(flat.shape[0])
    np.testing.assert_allclose(jax.vmap(ggn)(eye), jax.vmap(hess)(eye), atol=1e-12)


def test_ggn_is_psd_for_nonlinear_model(tiny):
    net, p, x, y, _ = tiny
    ggn, flat = cv.ggn_operator(net.apply, cj.training.mse_loss, p, x, y)
    g = np.asarray(jax.vmap(ggn)(jnp.eye(flat.shape[0])))
    assert np.linalg.eigvalsh(0.5 * (g + g.T)).min() > -1e-10


def test_preconditioned_operator_matches_dense():
    net = cj.models.PureMLP((2, 4, 2))
    tm = cj.TrainingMap(
        net.apply,
        net.init_params(jax.random.PRNGKey(0)),
        cj.datasets.two_moons(30),
        optimizer="adam",
        learning_rate=0.01,
    )
    s = tm.init()
    for t in range(7):
        s = tm.step(s, t)
    loss, p, _ = cv.training_loss(tm, s, 7)
    mv, _ = cv.hessian_operator(loss, p)
    pdiag = cv.training_preconditioner(tm, s, 7)
    nu = jax.flatten_util.ravel_pytree(tm.opt_state(s, 7)[0].nu)[0]
    np.testing.assert_allclose(pdiag, jnp.sqrt(nu / (1 - 0.999**7)) + 1e-8, rtol=1e-12)
    op = cv.preconditioned_operator(mv, pdiag)
    eye = jnp.eye(p.shape[0])
    h = np.asarray(jax.vmap(mv)(eye))
    s_half = np.diag(1 / np.sqrt(np.asarray(pdiag)))
    np.testing.assert_allclose(
        np.asarray(jax.vmap(op)(eye)), s_half @ h @ s_half, rtol=1e-9, atol=1e-9
    )


def test_vmapped_over_replicas_equals_loop(tiny):
    _, p, _, _, loss = tiny
    flat, unravel = jax.flatten_util.ravel_pytree(p)
    ps = flat[None] * (1 + 0.05 * jnp.arange(16)[:, None])

    def top(v):
        return cj.hessian_eigs(lambda u: loss(unravel(u)), v, 2, n_matvecs=30).eigenvalues

    batch = jax.vmap(top)(ps)
    for i in (0, 7, 15):
        np.testing.assert_allclose(batch[i], top(ps[i]), rtol=1e-10)


def test_warm_start_needs_fewer_matvecs(tiny):
    _, p, _, _, loss = tiny
    flat, unravel = jax.flatten_util.ravel_pytree(p)
    mv0, _ = cv.hessian_operator(lambda u: loss(unravel(u)), flat)
    prev = cv.lanczos_eigs(mv0, flat.shape[0], 1, n_matvecs=flat.shape[0])
    moved = flat + 1e-3 * jax.random.normal(jax.random.PRNGKey(5), flat.shape)
    mv1, _ = cv.hessian_operator(lambda u: loss(unravel(u)), moved)
    exact = np.linalg.eigvalsh(np.asarray(jax.vmap(mv1)(jnp.eye(flat.shape[0]))))[-1]
    warm = cv.block_krylov_eigs(mv1, prev.eigenvectors.T, n_blocks=3)
    err_warm = abs(float(warm.eigenvalues[0]) - exact) / exact
    assert err_warm < 1e-5 and warm.n_matvecs == 4

    # a cold Lanczos solve with the warm solve's matvecs is less accurate; with every matvec it
    # is more accurate (its Ritz value rises monotonically with the matvecs: two compiles, not
    # one per matvec count)
    def cold_err(m):
        cold = cv.lanczos_eigs(mv1, flat.shape[0], 1, n_matvecs=m)
        return abs(float(cold.eigenvalues[0]) - exact) / exact

    assert cold_err(warm.n_matvecs) > err_warm
    assert cold_err(flat.shape[0]) < err_warm


def test_stability_thresholds():
    assert stability_threshold("sgd", {"learning_rate": 0.1}) == (20.0, "hessian")
    assert stability_threshold("momentum", {"learning_rate": 0.1, "momentum": 0.9})[
        0
    ] == pytest.approx(38.0)
    assert stability_threshold("nesterov", {"learning_rate": 0.1, "momentum": 0.9})[
        0
    ] == pytest.approx(3.8 / 0.28)
    thr, op = stability_threshold("adam", {"learning_rate": 0.01, "b1": 0.9})
    assert thr == pytest.approx(3.8 / 0.001) and op == "preconditioned"
    assert np.isnan(stability_threshold("custom", {"learning_rate": 0.1})[0])


def test_smooth_density_mass():
    nodes = jnp.array([0.0, 1.0, 5.0])
    w = jnp.array([0.2, 0.3, 0.5])
    grid, dens = cv.smooth_density(nodes, w)
    assert abs(np.trapezoid(dens, grid) - 1.0) < 1e-3
    with pytest.raises(ValueError, match="width"):
        cv.smooth_density(nodes, w, width=0.0)


def test_tracker_in_replica_run_and_gd_quadratic_regime():
    """GD on linear regression: sharpness = largest eigenvalue of XᵀX/n, constant, ratio ηλ/2."""
    ds = cj.datasets.teacher_student(64, d_in=5, d_out=1, seed=2)
    params = {"kernel": jnp.zeros((5, 1)), "bias": jnp.zeros((1,))}
    tm = cj.TrainingMap(
        lambda p, x: x @ p["kernel"] + p["bias"], params, ds, optimizer="sgd", learning_rate=0.1
    )
    xa = np.concatenate([ds.x_train, np.ones((ds.x_train.shape[0], 1))], 1)
    lam = np.linalg.eigvalsh(xa.T @ xa / xa.shape[0])[::-1]
    rb = cj.make_replicas(tm, grid={"learning_rate": [0.1, 0.5]})
    res = cj.run_replicas(
        tm,
        rb,
        steps=20,
        record_every=5,
        observables=("loss",),
        trackers=[cj.CurvatureTracker(k=2, cold_matvecs=6)],
        progress=False,
    )
    np.testing.assert_allclose(res.records["sharpness"][:, :, 0], lam[0], rtol=1e-8)
    np.testing.assert_allclose(res.records["sharpness"][:, :, 1], lam[1], rtol=1e-6)
    np.testing.assert_allclose(res.records["sharpness_ratio"][1], 0.5 * lam[0] / 2, rtol=1e-8)
    assert np.isnan(res.records["rotation"][:, 0]).all()
    np.testing.assert_allclose(res.records["rotation"][:, 1:], 0.0, atol=1e-8)  # constant Hessian
    assert res.records["top_layer_mass"].shape == (2, 5, 2)  # leaves "bias" and "kernel"
    np.testing.assert_allclose(res.records["top_layer_mass"].sum(-1), 1.0, rtol=1e-12)
    overlap = res.records["grad_overlap"]
    assert np.all((overlap >= 0) & (overlap <= 1 + 1e-12))


def test_tracker_resume(tmp_path):
    ds = cj.datasets.two_moons(30)
    net = cj.models.PureMLP((2, 5, 2))
    tm = cj.TrainingMap(
        net.apply, net.init_params(jax.random.PRNGKey(0)), ds, optimizer="sgd", learning_rate=0.5
    )
    rb = cj.make_replicas(tm, grid={"learning_rate": [0.5, 1.0]})
    kw = dict(
        steps=40,
        record_every=5,
        chunk_steps=10,
        observables=("loss",),
        trackers=[cj.CurvatureTracker(k=1)],
        progress=False,
    )
    whole = cj.run_replicas(tm, rb, **kw)

    def stop(t):
        if t == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cj.run_replicas(tm, rb, checkpoint=tmp_path / "c.npz", on_chunk=stop, **kw)
    again = cj.run_replicas(tm, rb, checkpoint=tmp_path / "c.npz", resume=True, **kw)
    for k in ("sharpness", "rotation", "subspace_angle"):
        np.testing.assert_array_equal(again.records[k], whole.records[k])


def test_tracker_validation():
    ds = cj.datasets.two_moons(30)
    net = cj.models.PureMLP((2, 5, 2))
    tm = cj.TrainingMap(
        net.apply, net.init_params(jax.random.PRNGKey(0)), ds, optimizer="sgd", learning_rate=0.5
    )
    rb = cj.make_replicas(tm)
    for tr, msg in [
        (cj.CurvatureTracker(operator="preconditioned"), "preconditioned"),
        (cj.CurvatureTracker(mode="half"), "mode"),
        (cj.CurvatureTracker(k=0), "k:"),
    ]:
        with pytest.raises(ValueError, match=msg):
            cj.run_replicas(tm, rb, steps=5, trackers=[tr], progress=False)


def cohen_map(lr, loss="mse"):
    """Cohen et al.'s toy: Chebyshev-3 on 20 points, 1→100 tanh→1 without output bias."""
    ds = cj.datasets.chebyshev(3, 20)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    std1 = 1.9 * np.sqrt(2.0 / (1 + 100))
    p = {
        "w1": std1 * jax.random.normal(k1, (1, 100)),
        "b1": jnp.zeros(100),
        "w2": jax.random.uniform(k2, (100, 1), minval=-0.1, maxval=0.1),
    }

    def apply(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    return cj.TrainingMap(apply, p, ds, loss=loss, optimizer="sgd", learning_rate=lr)


@pytest.mark.slow
def test_edge_of_stability_cohen_toy():
    """Cohen et al.'s toy. Measured (see benchmarks/RESULTS.md): η = 0.1 and 0.2 stay in
    [0.85, 1.12]·2/η from 500 steps after the first crossing; at η = 0.4 the sharpness
    oscillates between about 0.77 and 1.35·2/η for ~2700 steps after crossing before settling
    near 1.05·2/η, so for η = 0.4 the band is asserted on the second half of the run."""
    tm = cohen_map(0.1)
    rb = cj.make_replicas(tm, grid={"learning_rate": [0.01, 0.1, 0.2, 0.4]})
    res = cj.run_replicas(
        tm,
        rb,
        steps=20_000,
        record_every=20,
        observables=("loss",),
        trackers=[cj.CurvatureTracker(k=1)],
        progress=False,
    )
    lr = res.coords["learning_rate"]
    for i in range(4):
        ratio = res.records["sharpness_ratio"][i]
        if lr[i] == 0.01:
            assert ratio.max() < 0.2
            assert np.all(np.diff(res.records["loss"][i]) <= 1e-12)
            continue
        assert ratio.max() >= 0.95
        first = int(np.argmax(ratio >= 0.95))
        after = ratio[first + 25 :] if lr[i] < 0.4 else ratio[len(ratio) // 2 :]
        assert np.all((after >= 0.85) & (after <= 1.12)), (lr[i], after.min(), after.max())


@pytest.mark.parametrize(
    "ratio, div, expected",
    [
        (np.linspace(0.1, 0.5, 40), -1, "stable"),
        (np.r_[np.linspace(0.2, 1.3, 20), np.full(20, 0.4)], -1, "stable after crossing"),
        (
            np.r_[np.linspace(0.2, 1.0, 20), 1.0 + 0.05 * np.sin(np.arange(20))],
            -1,
            "edge of stability",
        ),
        (np.r_[np.linspace(0.2, 1.0, 20), np.full(20, 1.5)], -1, "unstable"),
        (np.r_[0.5, 0.9, np.nan], 17, "unstable (diverged at step 17)"),
        (np.full(5, np.nan), -1, "unknown (no finite sharpness ratio)"),
    ],
)
def test_verdict_rule(ratio, div, expected):
    from chaosjax.experiments.analyses import verdict

    assert verdict(ratio, div)[0] == expected


def test_adam_preconditioner_undefined_before_first_update():
    net = cj.models.PureMLP((2, 8, 2), activation="relu")
    tm = cj.TrainingMap(
        net.apply,
        net.init_params(jax.random.PRNGKey(0)),
        cj.datasets.two_moons(60),
        optimizer="adam",
        learning_rate=1e-2,
    )
    s0 = tm.init()
    assert np.isnan(np.asarray(cv.training_preconditioner(tm, s0, 0))).all()
    res = cj.run_replicas(
        tm,
        cj.make_replicas(tm),
        steps=30,
        record_every=5,
        trackers=[cj.CurvatureTracker(k=1, n_blocks=3)],
        progress=False,
    )
    sh = res.records["sharpness"][0, :, 0]
    assert np.isnan(sh[0]) and np.all(np.isfinite(sh[1:]))  # recovers after the NaN record
    assert res.records["threshold"][0, 0] == pytest.approx(3.8 / (0.1 * 1e-2))


def _rank3_lanczos_checks(alphas, betas, q):
    """Rank-3 diagonal, m = 20: breakdown after three steps, then every step."""
    assert np.all(np.isfinite(np.asarray(q))) and np.all(np.isfinite(np.asarray(alphas)))
    np.testing.assert_allclose(np.asarray(q @ q.T), np.eye(q.shape[0]), atol=1e-13)
    theta = np.sort(np.linalg.eigvalsh(np.asarray(_tridiag(alphas, betas))))[::-1]
    np.testing.assert_allclose(theta[:4], [3.0, 2.0, 1.0, 0.0], atol=1e-12)
    assert np.count_nonzero(np.asarray(betas) == 0.0) >= 16  # the restarts carry β = 0


def test_lanczos_breakdown_single_and_vmapped():
    """A rank-3 operator exhausts the Krylov space after three steps: the iteration continues
    from random vectors orthogonal to the basis (also when vmapped, where the replacement
    must not cost a branch): eigenvalues right, basis orthonormal, no NaN."""
    d = jnp.zeros(40).at[:3].set(jnp.array([3.0, 2.0, 1.0]))

    def mv(v):
        return d * v

    def run(v0):
        return cv.lanczos(mv, v0, 20, jax.random.PRNGKey(1))

    v0s = jax.random.normal(jax.random.PRNGKey(0), (3, 40))
    _rank3_lanczos_checks(*jax.jit(run)(v0s[0]))
    batch = jax.jit(jax.vmap(run))(v0s)
    for i in range(3):
        _rank3_lanczos_checks(*(x[i] for x in batch))
    r = jax.vmap(lambda v: cv.lanczos_eigs(mv, 40, 3, n_matvecs=20, v0=v))(v0s)
    np.testing.assert_allclose(r.eigenvalues, np.tile([3.0, 2.0, 1.0], (3, 1)), atol=1e-12)
    assert bool(r.converged.all()) and float(r.residuals.max()) < 1e-12


def test_lanczos_agrees_with_matfree_eigh_partial():
    """Same start vector, same m, full reorthogonalisation: chaosjax's Ritz values equal
    matfree's ``eigh_partial(tridiag_sym(m))`` to round-off, single and vmapped."""
    pytest.importorskip("matfree")
    from matfree import decomp, eig

    n, m, k = 300, 40, 6
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    ev = np.concatenate([[50.0, 31.0, 30.0, 12.0, 11.5, 7.0], rng.uniform(-2.0, 5.0, n - 6)])
    a = jnp.asarray((q * ev) @ q.T)

    def mv(v):
        return a @ v

    def ours(v0):
        r = cv.lanczos_eigs(mv, n, k, n_matvecs=m, v0=v0)
        return r.eigenvalues, r.eigenvectors

    def theirs(v0):
        vals, vecs = eig.eigh_partial(decomp.tridiag_sym(m, custom_vjp=False))(mv, v0)
        return vals[::-1][:k], vecs[::-1][:k]

    v0s = jax.random.normal(jax.random.PRNGKey(2), (3, n))
    for f in (lambda v: v, jax.vmap):  # single (first start), then vmapped over three
        x = v0s[0] if f is not jax.vmap else v0s
        (t1, y1), (t2, y2) = jax.jit(f(ours))(x), jax.jit(f(theirs))(x)
        np.testing.assert_allclose(t1, t2, rtol=1e-12, atol=1e-12)
        # same Ritz vectors up to sign (the top six are converged and well separated)
        overlap = np.abs(np.sum(np.asarray(y1) * np.asarray(y2), axis=-1))
        np.testing.assert_allclose(overlap, 1.0, atol=1e-8)
