"""√ν at 0 differentiable in the optimizer update only, by a rewrite of the traced program."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import chaosjax
from chaosjax._finite_sqrt import finite_sqrt_derivative

ROOT = pathlib.Path(chaosjax.__file__).parent


def _count(jaxpr, name) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for v in eqn.params.values():
            for sub in v if isinstance(v, tuple | list) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns") and eqn.primitive.name != "custom_jvp_call":
                    n += _count(inner, name)
    return n


def test_only_sqrt_of_selected_inputs_is_rewritten_values_unchanged():
    def f(a, b):  # sqrt(b) inside a cond, a scan and a jit; sqrt(a) outside the selection
        c = jax.lax.cond(b[0] >= 0, lambda: jnp.sqrt(b), lambda: b)
        d = jax.lax.scan(lambda s, _: (jnp.sqrt(s), None), b, None, length=2)[0]
        e = jax.jit(jnp.sqrt)(b)
        return jnp.sqrt(a) + c + d + e

    g = finite_sqrt_derivative(f, lambda a, b: (False, True))
    a, b = jnp.array([4.0, 9.0]), jnp.array([0.0, 16.0])
    assert np.array_equal(g(a, b), f(a, b))
    closed = jax.make_jaxpr(g)(a, b)
    assert _count(closed.jaxpr, "sqrt") == 1  # sqrt(a) only
    # f's derivative in b at b = 0 is NaN by autodiff; the rewrite gives the limit 0
    db = jnp.array([0.0, 1.0])
    assert np.isnan(np.asarray(jax.jvp(lambda b: f(a, b), (b,), (db,))[1])).any()
    assert np.all(np.isfinite(jax.jvp(lambda b: g(a, b), (b,), (db,))[1]))
    # inside jit, vmap and grad as well
    assert np.all(np.isfinite(jax.jit(jax.vmap(jax.grad(lambda b: g(a, b).sum())))(b[None])))


def test_a_sqrt_in_the_users_loss_keeps_its_derivative_the_update_gets_the_limit(monkeypatch):
    """from_step: the user's step differentiates a loss with a √; only the √ of the optimizer's
    moments (the state leaves that are not parameters) is rewritten."""
    tx = optax.adam(0.1, eps_root=0.0)

    def loss_fn(p, batch):
        return jnp.sqrt(jnp.sum((p["w"] * batch) ** 2) + 1.0)

    def train_step(state, batch):
        p, o = state
        g = jax.grad(loss_fn)(p, batch)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    p = {"w": jnp.array([1.0, 0.0, 2.0])}
    state = (p, tx.init(p))
    batch = jnp.array([1.0, 0.0, 1.0])  # w[1] gets an exactly-zero gradient: ν = 0 there
    tm = chaosjax.TrainingMap.from_step(
        train_step, state, batch_fn=lambda t, d: d, data=batch, params=lambda s: s[0]
    )
    s0 = tm.init()
    closed = jax.make_jaxpr(tm.flow)(*chaosjax.training.split_state(s0), 0, tm.hparams)
    n_loss = _count(jax.make_jaxpr(jax.grad(loss_fn))(p, batch).jaxpr, "sqrt")
    assert n_loss >= 1 and _count(closed.jaxpr, "sqrt") == n_loss
    r = chaosjax.lyapunov_spectrum(tm.step, s0, k=2, steps=5)
    assert np.all(np.isfinite(r.exponents))
    # the trajectory is the one without the rewrite, bitwise
    s = s0
    for t in range(3):
        s = tm.step(s, t)
    monkeypatch.setattr(type(tm), "_step_with_finite_sqrt", lambda self, s, b: train_step(s, b))
    jax.clear_caches()
    s_plain = s0
    for t in range(3):
        s_plain = tm.step(s_plain, t)
    for a, b in zip(jax.tree_util.tree_leaves(s), jax.tree_util.tree_leaves(s_plain)):
        assert np.array_equal(a, b)


def test_no_module_assigns_to_jnp_sqrt():
    for path in ROOT.rglob("*.py"):
        assert not re.search(r"jnp\.sqrt\s*=[^=]", path.read_text()), path


def test_mismatched_selection_is_a_clear_error():
    g = finite_sqrt_derivative(lambda a: jnp.sqrt(a), lambda a: ((True, True),))
    with pytest.raises((TypeError, ValueError)):
        g(jnp.ones(2))
