"""Smoothness of a step from its program: non-smooth updates (sign, rounding) void tangent
exponents with the reason; smooth optimizers (ReLU kinks, clipping, guards) are not flagged."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import chaosjax as cj
from chaosjax.smoothness import NonSmoothWarning, step_smoothness

X = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
Y = jnp.array([0, 1, 0, 1])


def _loss(p, x=X):
    logits = jax.nn.relu(x @ p["w"] + p["b"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()


def _params():
    return {"w": 0.3 * jnp.ones((3, 2)) + 0.1 * jnp.eye(3, 2), "b": jnp.zeros(2)}


def _user_step(tx):
    def step(s, t):
        p, st = s
        g = jax.grad(_loss)(p)
        u, st = tx.update(g, st, p)
        return optax.apply_updates(p, u), st

    return step


SMOOTH = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "nesterov": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: optax.adam(1e-3),
    "adamw": lambda: optax.adamw(1e-3),
    "rmsprop": lambda: optax.rmsprop(1e-3),
    "adafactor": lambda: optax.adafactor(1e-2),
    "clipping": lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax.clip(0.5), optax.sgd(0.1)
    ),
    "multisteps": lambda: optax.MultiSteps(optax.adam(1e-3), 2),
    "apply_if_finite": lambda: optax.apply_if_finite(optax.adam(1e-3), 3),
    "schedule": lambda: optax.adam(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100)),
}
FLAGGED = {
    "lion": (lambda: optax.lion(1e-3), "scale_by_lion"),
    "lion_schedule": (
        lambda: optax.lion(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100)),
        "scale_by_lion",
    ),
    "sign_sgd": (lambda: optax.chain(optax.scale_by_sign(), optax.scale(-0.1)), "scale_by_sign"),
}


@pytest.mark.parametrize("name", sorted(SMOOTH))
def test_smooth_optimizers_are_not_flagged(name):
    tx = SMOOTH[name]()
    p = _params()
    v = step_smoothness(_user_step(tx), (p, tx.init(p)))
    assert v.smooth and v.reason == "" and v.primitives == ()


@pytest.mark.parametrize("name", sorted(FLAGGED))
def test_sign_updates_are_flagged_naming_the_primitive_and_the_transformation(name):
    make, where = FLAGGED[name]
    tx = make()
    p = _params()
    v = step_smoothness(_user_step(tx), (p, tx.init(p)))
    assert not v.smooth and v.primitives == ("sign",)
    assert where in v.reason and "allow_nonsmooth" in v.reason


def test_guards_integer_paths_and_kinks_are_exempt():
    def step(x, t):
        i = jnp.floor(t * 0.5).astype(jnp.int32)  # integer path from t, not from x
        y = jnp.where(jnp.isfinite(x), x, 0.0)  # a guard
        y = jnp.where(jnp.sign(x) > 0, 0.9 * y, 0.5 * y)  # sign as a branch choice only
        return jnp.clip(jax.nn.relu(y) + 0.1 * jnp.roll(y, i), -3.0, 3.0)

    assert step_smoothness(step, jnp.ones(3)).smooth


@pytest.mark.parametrize(
    "make",
    [
        lambda x: jnp.round(x),
        lambda x: jnp.floor(2.0 * x) * 0.1,
        lambda x: x[jnp.argmax(x)] * jnp.ones_like(x),
        lambda x: x.astype(jnp.int32).astype(x.dtype),
        lambda x: jax.lax.top_k(x, 1)[1].astype(x.dtype) * jnp.ones_like(x),
    ],
    ids=["round", "floor", "argmax", "cast", "top_k"],
)
def test_piecewise_constant_values_feeding_the_state_are_flagged(make):
    def step(x, t):
        return 0.5 * x + 0.1 * make(x)

    assert not step_smoothness(step, jnp.linspace(0.1, 0.9, 3)).smooth


def test_through_scan_cond_and_jit_the_verdict_is_kept():
    @jax.jit
    def inner(x):
        def body(c, _):
            return jax.lax.cond(c[0] > 0, lambda c: c - 0.01 * jnp.sign(c), lambda c: c, c), None

        return jax.lax.scan(body, x, None, length=3)[0]

    assert not step_smoothness(lambda x, t: inner(x), jnp.ones(2)).smooth
    ok = jax.jit(lambda x: jax.lax.scan(lambda c, _: (0.9 * c, None), x, None, length=3)[0])
    assert step_smoothness(lambda x, t: ok(x), jnp.ones(2)).smooth


def test_a_sign_step_gets_nan_exponents_with_the_reason_and_one_warning():
    a = jnp.array([[1.0, 2.0], [3.0, 4.0]])

    def step(x, t):
        return x - 0.05 * jnp.sign(a @ x) + 0.01 * x

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = cj.lyapunov_spectrum(step, jnp.ones(2), k=2, steps=40)
    assert np.isnan(r.exponents).all() and "sign" in r.reason
    assert sum(issubclass(w.category, NonSmoothWarning) for w in caught) == 1
    forced = cj.lyapunov_spectrum(step, jnp.ones(2), k=2, steps=40, allow_nonsmooth=True)
    assert np.isfinite(forced.exponents).all() and forced.reason == ""
    with pytest.warns(NonSmoothWarning):
        clv = cj.covariant_lyapunov_vectors(step, jnp.ones(2), k=2, steps=20, backward_transient=10)
    assert "sign" in clv.reason and np.isnan(clv.exponents).all()


def test_a_lion_training_map_is_voided_and_an_adam_map_is_not():
    ds = cj.Dataset.from_arrays(np.asarray(X), np.asarray(Y), name="tiny")

    def apply(p, x):
        return x @ p["w"] + p["b"]

    def run(tx):
        tmap = cj.TrainingMap(apply, _params(), ds, loss="cross_entropy", optimizer=tx)
        tracker = cj.LyapunovTracker(k=1, rows="all")
        batch = cj.make_replicas(tmap, n_perturbed=1, eps=1e-8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = cj.run_replicas(tmap, batch, steps=10, trackers=[tracker], progress=False)
        n_warn = sum(issubclass(w.category, NonSmoothWarning) for w in caught)
        return res, n_warn

    res, n_warn = run(optax.lion(1e-2))
    assert "scale_by_lion" in res.attrs["tangent_reason"] and n_warn == 1
    assert np.isnan(res.records["ftle"]).all()
    assert np.isfinite(res.records["loss"]).all()  # the run itself goes on
    res, n_warn = run(optax.adam(1e-2))
    assert "tangent_reason" not in res.attrs and n_warn == 0
    assert np.isfinite(res.records["ftle"][:, 1:]).all()
