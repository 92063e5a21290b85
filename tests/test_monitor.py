"""chaosjax.Monitor in the user's own loop: FTLEs through wrap, bitwise-untouched states, bad
input in one line, Equinox / Linen / NNX models, a sharded mesh (DESIGN.md, "Watching your own
loop")."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import chaosjax as cj
from chaosjax import probes as P
from chaosjax.smoothness import NonSmoothWarning

RNG = np.random.default_rng(1)
X = jnp.asarray(RNG.normal(size=(32, 4)))
Y = jnp.asarray(RNG.normal(size=(32,)))


def ls(p, b):
    return 0.5 * jnp.mean((b[0] @ p - b[1]) ** 2)


def _plain_step(tx, loss=ls):
    def step(state, batch):
        params, opt_state = state
        loss_v, g = jax.value_and_grad(loss)(params, batch)
        u, opt_state = tx.update(g, opt_state, params)
        return (optax.apply_updates(params, u), opt_state), {"loss": loss_v}

    return step


def test_ftle_through_wrap_on_gd_linear_regression_is_log_one_minus_eta_a():
    eta = 0.3
    tx = optax.sgd(eta)
    xs = X * jnp.asarray([0.4, 1.0, 1.6, 2.2])  # well-separated exponents: the basis aligns
    a = np.linalg.eigvalsh(np.asarray(xs.T @ xs / 32))
    expect = np.sort(np.log(np.abs(1 - eta * a)))[::-1]
    mon = cj.Monitor(
        ls,
        probes=[P.FTLE(k=4)],
        every=40,
        params=lambda s: s[0],
        opt_state=lambda s: s[1],
        optimizer=tx,
    )
    step = jax.jit(_plain_step(tx))
    wrapped = mon.wrap(step)
    p = jnp.zeros(4)
    state = (p, tx.init(p))
    outs = []
    for t in range(1, 121):
        state, _ = wrapped(state, (xs, Y))
        out = mon(t, state, (xs, Y))
        if out:
            outs.append(out)
    last = outs[-1]  # the basis has aligned: each interval's exponents are exact
    got = [last["ftle"]] + [last[f"ftle/{i}"] for i in range(1, 4)]
    np.testing.assert_allclose(got, expect, rtol=1e-9, atol=1e-12)
    assert last["ftle/matvecs"] == 4 * 40
    assert mon._tangents.traces == 1


def _mlp_loss(p, b):
    h = jnp.tanh(b[0] @ p["w1"] + p["b1"])
    return jnp.mean((h @ p["w2"] - b[1][:, None]) ** 2)


def _mlp_params(key=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(key))
    return {
        "w1": jax.random.normal(k1, (4, 8)) * 0.5,
        "b1": jnp.zeros(8),
        "w2": jax.random.normal(k2, (8, 1)) * 0.5,
    }


def _all_probes():
    return [
        P.Sharpness(k=2),
        P.BatchSharpness(n=4),
        P.CriticalSharpness(),
        P.DirectionalSharpness(),
        P.GradientNorm(),
        P.Threshold(optimizer="momentum", hparams={"momentum": 0.9}),
        P.SelfStabilization(),
        P.FTLE(k=2),
    ]


def test_monitored_loop_is_bitwise_the_unmonitored_loop():
    tx = optax.sgd(0.05, momentum=0.9)
    step = jax.jit(_plain_step(tx, _mlp_loss), donate_argnums=0)
    batches = [(X[i::4], Y[i::4]) for i in range(4)]

    def run(monitor):
        p = _mlp_params()
        state = (p, tx.init(p))
        stepper = monitor.wrap(step) if monitor else step
        history = []
        for t in range(12):
            b = batches[t % 4]
            state, metrics = stepper(state, b)
            history.append(jax.tree_util.tree_map(np.asarray, (state, metrics)))
            if monitor:
                monitor(t, state, b)
        return history

    mon = cj.Monitor(
        _mlp_loss,
        probes=_all_probes(),
        every=5,
        params=lambda s: s[0],
        opt_state=lambda s: s[1],
        optimizer=tx,
        learning_rate=0.05,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers.*")
        plain, watched = run(None), run(mon)
    for a, b in zip(plain, watched):
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            assert x.dtype == y.dtype and np.array_equal(x, y)
    assert all(n == 1 for n in mon.traces.values()), mon.traces  # one program per probe
    assert mon.reasons == {}


def test_contract_keys_and_cadence():
    tx = optax.sgd(0.05, momentum=0.9)
    p = _mlp_params()
    mon = cj.Monitor(
        _mlp_loss,
        probes=_all_probes(),
        every=2,
        params=lambda s: s[0],
        opt_state=lambda s: s[1],
        optimizer=tx,
        learning_rate=optax.constant_schedule(0.05),
    )
    state = (p, tx.init(p))
    step = mon.wrap(jax.jit(_plain_step(tx, _mlp_loss)))
    state, _ = step(state, (X, Y))
    assert mon(1, state, (X, Y)) == {}  # off cadence
    out = mon(2, state, (X, Y))
    for key in (
        "sharpness",
        "sharpness/1",
        "sharpness/residual",
        "batch_sharpness",
        "batch_sharpness/stderr",
        "critical_sharpness",
        "critical_sharpness/step_scale",
        "directional_sharpness",
        "gradient_norm",
        "threshold",
        "threshold/rule",
        "ftle",
        "ftle/1",
        "self_stabilization",
        "self_stabilization/alpha",
        "self_stabilization/beta",
        "sharpness/seconds",
        "sharpness/matvecs",
        "ftle/seconds",
    ):
        assert key in out and isinstance(out[key], float), key
    np.testing.assert_allclose(out["threshold/rule"], (2 + 2 * 0.9) / 0.05)
    # a probe's own cadence overrides the monitor's
    own = cj.Monitor(
        _mlp_loss, probes=[P.GradientNorm(every=3), P.Sharpness()], every=2, params=lambda s: s
    )
    assert set(own(3, p, (X, Y))) == {"gradient_norm", "gradient_norm/loss"} | {
        "gradient_norm/seconds",
        "gradient_norm/matvecs",
    }
    assert "sharpness" in own(4, p, (X, Y)) and "gradient_norm" not in own(4, p, (X, Y))


def _one_line(excinfo, name):
    msg = str(excinfo.value)
    assert msg.startswith(f"{name}:") and "\n" not in msg, msg


def test_bad_input_is_one_line_naming_the_argument():
    p = _mlp_params()
    # a probe that needs the optimizer, without one
    mon = cj.Monitor(_mlp_loss, probes=[P.CriticalSharpness()], params=lambda s: s)
    with pytest.raises(ValueError) as e:
        mon(0, p, (X, Y))
    _one_line(e, "optimizer")
    tx = optax.sgd(0.1)
    mon = cj.Monitor(_mlp_loss, probes=[P.DirectionalSharpness()], params=lambda s: s, optimizer=tx)
    with pytest.raises(ValueError) as e:
        mon(0, p, (X, Y))
    _one_line(e, "opt_state")
    # a batch without the loss function's structure
    mon = cj.Monitor(_mlp_loss, probes=[P.Sharpness()], params=lambda s: s)
    with pytest.raises(ValueError) as e:
        mon(0, p, {"x": X})
    _one_line(e, "batch")
    with pytest.raises(ValueError) as e:
        mon(0, p, (X[:, :3], Y))  # wrong feature count: a shape error from inside the model
    _one_line(e, "batch")
    # a params picker returning no float leaves
    mon = cj.Monitor(_mlp_loss, probes=[P.Sharpness()], params=lambda s: jnp.arange(3))
    with pytest.raises(ValueError) as e:
        mon(0, p, (X, Y))
    _one_line(e, "params")
    # an Equinox module as the state: its activation is not an array
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(4, 1, 8, 1, key=jax.random.PRNGKey(0))
    mon = cj.Monitor(lambda m, b: 0.0, probes=[P.Sharpness()])
    with pytest.raises(TypeError) as e:
        mon(0, model, (X, Y))
    _one_line(e, "params")
    for bad, name in [
        (lambda: cj.Monitor(3, probes=[P.Sharpness()]), "loss_fn"),
        (lambda: cj.Monitor(ls, probes=P.Sharpness()), "probes"),
        (lambda: cj.Monitor(ls, probes=["sharpness"]), "probes"),
        (lambda: cj.Monitor(ls, probes=[P.Sharpness()], writer=3), "writer"),
        (lambda: cj.Monitor(ls, probes=[P.Sharpness()], optimizer="sgd"), "optimizer"),
        (lambda: cj.Monitor(ls, probes=[P.Sharpness()], learning_rate="0.1"), "learning_rate"),
    ]:
        with pytest.raises(TypeError) as e:
            bad()
        _one_line(e, name)
    with pytest.raises(ValueError) as e:
        cj.Monitor(ls, probes=[P.Sharpness(), P.Sharpness()])
    _one_line(e, "probes")


def _reference(loss, params, batch):
    """Dense λ_max, ‖g‖ and gᵀHg/gᵀg of loss(·, batch) at params (float64 oracle: the full
    Hessian of the ravelled loss, one jitted program with the batch as an argument)."""
    from jax.flatten_util import ravel_pytree

    flat, unravel = ravel_pytree(params)

    def f(v, b):
        return loss(unravel(v), b)

    h, g = jax.jit(lambda v, b: (jax.hessian(f)(v, b), jax.grad(f)(v, b)))(flat, batch)
    h, g = np.asarray(h, np.float64), np.asarray(g, np.float64)
    assert h.dtype == np.float64 and h.shape == (flat.size, flat.size)
    return np.linalg.eigvalsh(h)[-1], np.linalg.norm(g), g @ h @ g / (g @ g)


def _check(out, ref):
    np.testing.assert_allclose(out["sharpness"], ref[0], rtol=1e-8)
    np.testing.assert_allclose(out["gradient_norm"], ref[1], rtol=1e-10)
    np.testing.assert_allclose(out["directional_sharpness"], ref[2], rtol=1e-8)


FRAMEWORK_PROBES = [P.Sharpness(tol=1e-10), P.GradientNorm(), P.DirectionalSharpness()]


def test_equinox_model_through_eqx_partition():
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(4, "scalar", 6, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    model = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if eqx.is_array(a) else a, model)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(p, b):
        m = eqx.combine(p, static)
        return jnp.mean((jax.vmap(m)(b[0]) - b[1]) ** 2)

    tx = optax.sgd(0.1)
    state = (params, tx.init(params))
    mon = cj.Monitor(
        loss,
        probes=FRAMEWORK_PROBES,
        params=lambda s: s[0],
        optimizer=tx,
        opt_state=lambda s: s[1],
    )
    _check(mon(0, state, (X, Y)), _reference(loss, params, (X, Y)))


def test_linen_train_state_is_read_by_default():
    import flax.linen as nn
    from flax.training.train_state import TrainState

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1, param_dtype=jnp.float64)(
                jnp.tanh(nn.Dense(6, param_dtype=jnp.float64)(x))
            )[:, 0]

    net = Net()
    params = net.init(jax.random.PRNGKey(0), X)["params"]
    state = TrainState.create(apply_fn=net.apply, params=params, tx=optax.sgd(0.1))

    def loss(p, b):
        return jnp.mean((net.apply({"params": p}, b[0]) - b[1]) ** 2)

    mon = cj.Monitor(loss, probes=FRAMEWORK_PROBES)  # params, tx, opt_state from the TrainState
    _check(mon(0, state, (X, Y)), _reference(loss, params, (X, Y)))


def test_nnx_model_through_nnx_split():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 6, param_dtype=jnp.float64, rngs=rngs)
            self.l2 = nnx.Linear(6, 1, param_dtype=jnp.float64, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))[:, 0]

    model = Net(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, b):
        return jnp.mean((nnx.merge(graphdef, p, rest)(b[0]) - b[1]) ** 2)

    tx = optax.sgd(0.1)
    opt_state = tx.init(params)
    mon = cj.Monitor(
        loss,
        probes=FRAMEWORK_PROBES,
        params=lambda m: nnx.state(m, nnx.Param),
        optimizer=tx,
        opt_state=lambda m: opt_state,
    )
    _check(mon(0, model, (X, Y)), _reference(loss, params, (X, Y)))


def test_lion_gives_nan_ftle_with_the_reason():
    tx = optax.lion(1e-3)
    p = _mlp_params()
    mon = cj.Monitor(
        _mlp_loss, probes=[P.FTLE()], params=lambda s: s[0], opt_state=lambda s: s[1], optimizer=tx
    )
    step = mon.wrap(jax.jit(_plain_step(tx, _mlp_loss)))
    state = (p, tx.init(p))
    with pytest.warns(NonSmoothWarning, match="sign"):
        state, _ = step(state, (X, Y))
    with pytest.warns(UserWarning, match="not smooth"):
        out = mon(0, state, (X, Y))
    assert np.isnan(out["ftle"]) and "sign" in mon.reasons["ftle"]
    # and FTLE without wrap: NaN with its reason
    plain = cj.Monitor(
        _mlp_loss, probes=[P.FTLE()], params=lambda s: s[0], opt_state=lambda s: s[1], optimizer=tx
    )
    with pytest.warns(UserWarning, match="wrap"):
        assert np.isnan(plain(0, state, (X, Y))["ftle"])


class _Scalars:
    """A write_scalars-only writer (scalars only)."""

    def __init__(self):
        self.rows = []

    def write_scalars(self, step, mapping):
        self.rows.append((step, dict(mapping)))


class _CLULike(_Scalars):
    """CLU's MetricWriter signatures: write_scalars and write_texts (texts too)."""

    def __init__(self):
        super().__init__()
        self.texts = []

    def write_texts(self, step, mapping):
        self.texts.append((step, dict(mapping)))


def test_a_nan_probes_reason_lands_in_the_logs_once(tmp_path):
    from chaosjax import writers as W

    tx = optax.sgd(0.1)  # no learning_rate= and no inject_hyperparams: η_t unknown
    paths = {"csv": tmp_path / "m.csv", "jsonl": tmp_path / "m.jsonl", "zarr": tmp_path / "m.zarr"}
    scalars, clu, calls = _Scalars(), _CLULike(), []
    mon = cj.Monitor(
        ls,
        probes=[P.CriticalSharpness(), P.GradientNorm()],
        every=2,
        params=lambda s: s[0],
        opt_state=lambda s: s[1],
        optimizer=tx,
        writer=[
            W.CSV(paths["csv"]),
            W.JSONL(paths["jsonl"]),
            W.Zarr(paths["zarr"]),
            scalars,
            clu,
            lambda step, m: calls.append((step, m)),
        ],
    )
    p = jnp.zeros(4)
    state = (p, tx.init(p))
    with pytest.warns(UserWarning, match="critical_sharpness: NaN: η_t is unknown"):
        outs = [mon(t, state, (X, Y)) for t in range(5)]
    mon.close()
    why = mon.reasons["critical_sharpness"]
    assert "learning_rate" in why and np.isnan(outs[0]["critical_sharpness"])
    for kind, path in paths.items():  # the reason, once, at the first step it applied
        assert W.read_texts(path) == {"reason/critical_sharpness": [(0, why)]}, kind
    rows = W.read_csv(paths["csv"])
    assert rows[0] == {"step": 0, "reason/critical_sharpness": why}
    assert [r["step"] for r in rows[1:]] == [0, 2, 4]
    assert np.isnan(rows[1]["critical_sharpness"]) and rows[1]["gradient_norm"] > 0
    assert W.read_jsonl(paths["jsonl"])[0] == {"step": 0, "reason/critical_sharpness": why}
    assert np.isnan(W.read_zarr(paths["zarr"])["critical_sharpness"][1]).all()
    # a CLU-type writer gets the text once; write_scalars-only writers and callables scalars only
    assert clu.texts == [(0, {"reason/critical_sharpness": why})]
    for rows_ in (scalars.rows, clu.rows, calls):
        assert [s for s, _ in rows_] == [0, 2, 4]
        assert all(isinstance(v, float) for _, m in rows_ for v in m.values())


def test_sharded_parameters_and_batch_equal_one_device():
    if jax.device_count() < 4:
        pytest.skip("needs 4 devices (tests/conftest.py sets 4 CPU devices)")
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as PS

    mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
    tx = optax.sgd(0.05, momentum=0.9)
    p = _mlp_params()
    sp = {
        "w1": jax.device_put(p["w1"], NamedSharding(mesh, PS(None, "d"))),
        "b1": jax.device_put(p["b1"], NamedSharding(mesh, PS("d"))),
        "w2": jax.device_put(p["w2"], NamedSharding(mesh, PS("d", None))),
    }
    rows = NamedSharding(mesh, PS("d"))
    batches = [(X[i::2], Y[i::2]) for i in range(2)]
    sbatches = [(jax.device_put(a, rows), jax.device_put(b, rows)) for a, b in batches]

    def run(params, bs):
        mon = cj.Monitor(
            _mlp_loss,
            probes=_all_probes(),
            every=3,
            params=lambda s: s[0],
            opt_state=lambda s: s[1],
            optimizer=tx,
            learning_rate=0.05,
        )
        state = (params, tx.init(params))
        step = mon.wrap(jax.jit(_plain_step(tx, _mlp_loss)))
        out = {}
        for t in range(4):
            state, _ = step(state, bs[t % 2])
            out.update(mon(t, state, bs[t % 2]))
        return out, state

    one, s1 = run(p, batches)
    many, s4 = run(sp, sbatches)
    assert s4[0]["w1"].sharding.spec == PS(None, "d")  # the state stayed sharded
    np.testing.assert_allclose(s4[0]["w1"], s1[0]["w1"], rtol=1e-12)
    for k, v in one.items():
        if k.endswith("/seconds"):
            continue
        np.testing.assert_allclose(many[k], v, rtol=1e-10, atol=1e-12, err_msg=k)


def test_ftle_under_adam_with_a_dead_parameter_is_finite():
    """A parameter the loss never reads has ν = 0 under Adam; √ν's derivative there is the
    limit 0 inside the update (chaosjax._finite_sqrt, scoped to tx.update's gradient and
    state), so the tangents stay finite."""
    tx = optax.adam(1e-2)

    def loss(p, b):
        return ls(p["w"], b)

    p = {"w": jnp.zeros(4), "dead": jnp.ones(2)}
    mon = cj.Monitor(
        loss,
        probes=[P.FTLE(k=2), P.CriticalSharpness()],
        every=5,
        params=lambda s: s[0],
        opt_state=lambda s: s[1],
        optimizer=tx,
        learning_rate=1e-2,
    )
    step = mon.wrap(jax.jit(_plain_step(tx, loss)))
    state = (p, tx.init(p))
    for t in range(1, 11):
        state, _ = step(state, (X, Y))
        out = mon(t, state, (X, Y))
    assert np.asarray(state[1][0].nu["dead"]).max() == 0.0  # the dead unit's ν is exactly 0
    assert np.isfinite([out["ftle"], out["ftle/1"], out["critical_sharpness"]]).all(), out
