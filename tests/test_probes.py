"""The monitor's probes on cases with closed forms (DESIGN.md, "Watching your own loop")."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import chaosjax as cj
from chaosjax import probes as P

RNG = np.random.default_rng(0)
_M = RNG.normal(size=(8, 8))
A = _M @ _M.T / 8 + np.diag(np.linspace(0.0, 3.0, 8))  # SPD, distinct eigenvalues
EIG = np.sort(np.linalg.eigvalsh(A))[::-1]


def quad(p, batch):
    return 0.5 * p @ (batch @ p)


def _gd_state(eta=0.1, steps=2):
    tx = optax.sgd(eta)
    p = jnp.asarray(RNG.normal(size=8))
    s = tx.init(p)
    for _ in range(steps):
        u, s = tx.update(jax.grad(quad)(p, jnp.asarray(A)), s, p)
        p = optax.apply_updates(p, u)
    return tx, p, s


def test_quadratic_sharpness_critical_and_directional_are_exact():
    tx, p, s = _gd_state()
    mon = cj.Monitor(
        quad,
        probes=[
            P.Sharpness(k=2, tol=1e-12),
            P.CriticalSharpness(rtol=1e-6),
            P.DirectionalSharpness(),
            P.GradientNorm(),
        ],
        params=lambda st: st[0],
        optimizer=tx,
        opt_state=lambda st: st[1],
        learning_rate=0.1,
    )
    out = mon(0, (p, s), jnp.asarray(A))
    assert all(isinstance(v, float) for v in out.values())
    np.testing.assert_allclose(out["sharpness"], EIG[0], rtol=1e-10)
    np.testing.assert_allclose(out["sharpness/1"], EIG[1], rtol=1e-10)
    assert out["sharpness/residual"] <= 1e-12
    g = A @ np.asarray(p)
    rq = g @ A @ g / (g @ g)
    np.testing.assert_allclose(out["directional_sharpness"], rq, rtol=1e-12)
    # λ_c from the bracket's upper end: within rtol above the Rayleigh quotient's η_c
    assert rq * (1 - 1e-6) <= out["critical_sharpness"] <= rq * (1 + 1e-12)
    np.testing.assert_allclose(out["critical_sharpness/step_scale"], 2 / (0.1 * rq), rtol=1e-6)
    np.testing.assert_allclose(out["gradient_norm"], np.linalg.norm(g), rtol=1e-12)
    for name in ("sharpness", "critical_sharpness", "directional_sharpness", "gradient_norm"):
        assert out[f"{name}/seconds"] >= 0 and out[f"{name}/matvecs"] >= 0


def test_sharpness_is_warm_started_and_never_recompiles():
    d = 300
    q = np.linalg.qr(RNG.normal(size=(d, d)))[0]
    big = jnp.asarray(q @ np.diag(np.linspace(0.0, 10.0, d)) @ q.T)  # gaps of 1/30
    p = jnp.asarray(RNG.normal(size=d))
    mon = cj.Monitor(quad, probes=[P.Sharpness(tol=1e-6)], params=lambda st: st)
    first = mon(0, p, big)
    second = mon(1, p * 0.999, big)  # the same Hessian: the warm start is already converged
    for out in (first, second):
        np.testing.assert_allclose(out["sharpness"], 10.0, rtol=1e-10)
        assert out["sharpness/residual"] <= 1e-6
    assert second["sharpness/matvecs"] == 2 * 5  # one round: b = k + 1 vectors, 5 blocks
    assert first["sharpness/matvecs"] > 3 * second["sharpness/matvecs"]
    assert mon.traces == {"sharpness": 1}


def test_batch_sharpness_over_all_batches_is_the_enumerated_mean():
    n, d, nb = 24, 5, 6
    x = RNG.normal(size=(n, d))
    y = RNG.normal(size=n)
    theta = RNG.normal(size=d)
    batches = [(jnp.asarray(x[i::nb]), jnp.asarray(y[i::nb])) for i in range(nb)]

    def ls(p, b):
        return 0.5 * jnp.mean((b[0] @ p - b[1]) ** 2)

    expect = []
    for xb, yb in batches:
        xb, yb = np.asarray(xb), np.asarray(yb)
        h = xb.T @ xb / len(yb)
        g = xb.T @ (xb @ theta - yb) / len(yb)
        expect.append(g @ h @ g / (g @ g))
    expect = np.asarray(expect)

    mon = cj.Monitor(ls, probes=[P.BatchSharpness(n=nb, sampler=lambda t, i: batches[i])])
    out = mon(0, jnp.asarray(theta), batches[0])
    np.testing.assert_allclose(out["batch_sharpness"], expect.mean(), rtol=1e-12)
    np.testing.assert_allclose(
        out["batch_sharpness/stderr"], expect.std(ddof=1) / np.sqrt(nb), rtol=1e-10
    )
    assert out["batch_sharpness/batches"] == nb

    # the history the loop passed: the last n batches, fewer before n steps, one program
    hist = cj.Monitor(ls, probes=[P.BatchSharpness(n=4)], every=5)
    for t in range(nb):
        out = hist(t, jnp.asarray(theta), batches[t])
        if t == 0:
            np.testing.assert_allclose(out["batch_sharpness"], expect[0], rtol=1e-12)
            assert np.isnan(out["batch_sharpness/stderr"])
    np.testing.assert_allclose(out["batch_sharpness"], expect[2:6].mean(), rtol=1e-12)
    assert hist.traces == {"batch_sharpness": 1}


def test_self_stabilization_matches_the_closed_form_on_a_cubic():
    w = RNG.normal(size=8)
    theta = RNG.normal(size=8) * 0.5

    def cubic(p, b):
        return 0.5 * p @ (b @ p) + (jnp.asarray(w) @ p) ** 3 / 6

    h = A + (w @ theta) * np.outer(w, w)
    lam, vec = np.linalg.eigh(h)
    u = vec[:, -1]
    grad_s = (w @ u) ** 2 * w
    grad_l = A @ theta + 0.5 * (w @ theta) ** 2 * w
    alpha, beta = -(grad_l @ grad_s), grad_s @ grad_s
    mon = cj.Monitor(cubic, probes=[P.SelfStabilization(tol=1e-12)])
    out = mon(0, jnp.asarray(theta), jnp.asarray(A))
    np.testing.assert_allclose(out["self_stabilization/sharpness"], lam[-1], rtol=1e-10)
    np.testing.assert_allclose(out["self_stabilization/alpha"], alpha, rtol=1e-8)
    np.testing.assert_allclose(out["self_stabilization/beta"], beta, rtol=1e-8)
    amp = np.sqrt(2 * alpha / beta) if alpha > 0 else np.nan
    np.testing.assert_allclose(out["self_stabilization"], amp, rtol=1e-8)


def test_preconditioned_sharpness_and_its_threshold_under_adam():
    eta = 1e-2
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=eta, b1=0.9, b2=0.99, eps=1e-8)
    p = jnp.asarray(RNG.normal(size=8))
    s = tx.init(p)
    b = jnp.asarray(A)
    state = {"params": p, "opt": s}
    mon = cj.Monitor(
        quad,
        probes=[P.PreconditionedSharpness(tol=1e-12), P.Threshold(optimizer="adam")],
        optimizer=tx,
        opt_state=lambda st: st["opt"],
    )
    out0 = mon(0, state, b)
    assert np.isnan(out0["preconditioned_sharpness"])  # Adam before its first update
    for _ in range(3):
        u, s = tx.update(jax.grad(quad)(p, b), s, p)
        p = optax.apply_updates(p, u)
    out = mon(1, {"params": p, "opt": s}, b)
    adam = s.inner_state[0]
    c = int(adam.count)
    pd = np.sqrt(np.asarray(adam.nu) / (1 - 0.99**c)) + 1e-8
    m = A / np.sqrt(np.outer(pd, pd))
    np.testing.assert_allclose(
        out["preconditioned_sharpness"], np.linalg.eigvalsh(m)[-1], rtol=1e-8
    )
    thr = (2 + 2 * 0.9) / ((1 - 0.9) * eta)
    np.testing.assert_allclose(out["preconditioned_sharpness/threshold"], thr, rtol=1e-6)
    np.testing.assert_allclose(out["threshold/rule"], thr, rtol=1e-6)
    np.testing.assert_allclose(out["threshold"], 2 / eta, rtol=1e-6)  # η read from the state


def test_preconditioned_sharpness_refuses_a_state_without_second_moments_before_any_trace():
    tx = optax.sgd(0.1, momentum=0.9)
    p = jnp.asarray(RNG.normal(size=8))
    mon = cj.Monitor(
        quad,
        probes=[P.PreconditionedSharpness()],
        optimizer=tx,
        opt_state=lambda st: st["opt"],
    )
    with pytest.raises(ValueError) as e:
        mon(0, {"params": p, "opt": tx.init(p)}, jnp.asarray(A))
    msg = str(e.value)
    assert msg.startswith("optimizer: PreconditionedSharpness") and "\n" not in msg, msg
    assert mon.traces["preconditioned_sharpness"] == 0  # refused before its program was traced
    # RMSProp's state is accepted (P = sqrt(ν + eps))
    tx = optax.rmsprop(0.01)
    out = cj.Monitor(
        quad,
        probes=[P.PreconditionedSharpness()],
        optimizer=tx,
        opt_state=lambda st: st["opt"],
        learning_rate=0.01,
    )(0, {"params": p, "opt": tx.init(p)}, jnp.asarray(A))
    assert np.isfinite(out["preconditioned_sharpness"])


def test_threshold_and_critical_sharpness_without_eta_are_nan_with_a_reason():
    tx, p, s = _gd_state()
    mon = cj.Monitor(
        quad,
        probes=[P.Threshold(), P.CriticalSharpness()],
        params=lambda st: st[0],
        optimizer=tx,
        opt_state=lambda st: st[1],
    )
    with pytest.warns(UserWarning, match="learning_rate"):
        out = mon(0, (p, s), jnp.asarray(A))
    assert np.isnan(out["threshold"]) and np.isnan(out["critical_sharpness"])
    assert np.isfinite(out["critical_sharpness/step_scale"])  # s_c needs no η
    assert "learning_rate" in mon.reasons["threshold"]
    # a schedule of t gives η_t
    sched = optax.linear_schedule(0.1, 0.05, 10)
    mon2 = cj.Monitor(quad, probes=[P.Threshold()], params=lambda st: st, learning_rate=sched)
    np.testing.assert_allclose(mon2(4, p, jnp.asarray(A))["threshold"], 2 / float(sched(4)))


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)])
def test_low_precision_models_accumulate_in_float32(dtype, rtol):
    a = jnp.asarray(A, dtype)

    def lq(p, b):
        return 0.5 * p @ (b @ p)

    p = jnp.asarray(RNG.normal(size=8), dtype)
    mon = cj.Monitor(lq, probes=[P.Sharpness(tol=1e-5), P.GradientNorm()], params=lambda st: st)
    out = mon(0, p, a)
    assert mon._ctx.dtype == jnp.float32  # the work dtype of the flat vectors
    exact = np.linalg.eigvalsh(np.asarray(a, np.float64))[-1]
    np.testing.assert_allclose(out["sharpness"], exact, rtol=rtol)
    g = np.asarray(a, np.float64) @ np.asarray(p, np.float64)
    np.testing.assert_allclose(out["gradient_norm"], np.linalg.norm(g), rtol=rtol)


def test_probe_arguments_are_checked_in_one_line():
    for make, what in [
        (lambda: P.Sharpness(k=0), "k"),
        (lambda: P.Sharpness(tol=-1.0), "tol"),
        (lambda: P.BatchSharpness(n=0), "n"),
        (lambda: P.CriticalSharpness(rtol=0), "rtol"),
        (lambda: P.Threshold(optimizer="sgdx"), "optimizer"),
        (lambda: P.GradientNorm(every=0), "every"),
    ]:
        with pytest.raises(ValueError, match=f"^{what}:") as e:
            make()
        assert "\n" not in str(e.value)
    with pytest.raises(TypeError, match=r"^sampler:"):
        P.BatchSharpness(sampler=3)
