"""The one map protocol: a map a user writes against chaosjax.Map (not one of chaosjax's) runs
through run_replicas with Lyapunov and curvature observers; capabilities it lacks are refused
in one line."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chaosjax as cj

A = np.diag([3.0, 1.5, 0.5])  # L(θ) = ½ θᵀAθ: the Hessian is A
ETA = 0.2


@jax.tree_util.register_pytree_node_class
class QuadraticGD(cj.Map):
    """GD on ½ θᵀAθ written against the protocol alone: a flow and a loss."""

    def __init__(self, a, eta):
        self.a, self.eta = jnp.asarray(a), eta

    def tree_flatten(self):
        return (self.a,), (self.eta,)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    @property
    def capabilities(self):
        return frozenset({"loss"})

    @property
    def has_loss(self):
        return True

    def _loss(self, p):
        return 0.5 * p @ self.a @ p

    def flow(self, x, carry, t, args):
        return x - self.eta * self.a @ x, carry, self._loss(x)

    def loss(self, state, split="train", t=None):
        return self._loss(state)

    def curvature_loss(self, state, t=0, mode="full", subset=None):
        return self._loss, state, {}

    def threshold_at(self, state, t, hparams=None):
        return jnp.asarray(2.0 / self.eta, state.dtype)


def test_a_users_map_runs_with_lyapunov_and_curvature_observers():
    m = QuadraticGD(A, ETA)
    batch = cj.make_replicas(m.flow, base=jnp.array([1.0, -0.5, 0.25]))
    res = cj.run_replicas(
        m, batch, steps=200, record_every=50, progress=False,
        trackers=[cj.LyapunovTracker(k=3, rows="all"), cj.CurvatureTracker(k=2)],
    )  # fmt: skip
    # tangents of a linear map: log|1 − η a_i|, largest first
    expect = np.sort(np.log(np.abs(1.0 - ETA * np.diag(A))))[::-1]
    np.testing.assert_allclose(res.records["ftle"][0, -1], expect, atol=1e-10)
    np.testing.assert_allclose(res.records["sharpness"][0, -1], [3.0, 1.5], rtol=1e-8)
    np.testing.assert_allclose(res.records["threshold"][0, -1], 2.0 / ETA)
    # the loss capability gives the tangents' loss record, the engine watches the flow's loss
    x = np.asarray(res.final_state[0])
    assert res.records["tangent_loss"][0, -1] == pytest.approx(0.5 * x @ A @ x, rel=1e-12)


def test_a_capability_the_map_lacks_is_refused_in_one_line():
    @jax.tree_util.register_pytree_node_class
    @dataclasses.dataclass
    class NoLoss(cj.Map):
        def flow(self, x, carry, t, args):
            return 0.5 * x, carry, jnp.zeros((), x.dtype)

        def tree_flatten(self):
            return (), ()

        @classmethod
        def tree_unflatten(cls, aux, children):
            return cls()

    m = NoLoss()
    batch = cj.make_replicas(m.flow, base=jnp.ones(2))
    with pytest.raises(ValueError, match=r"^trackers: CurvatureTracker needs a map with a 'loss'"):
        cj.run_replicas(m, batch, steps=2, trackers=[cj.CurvatureTracker()], progress=False)
    with pytest.raises(ValueError, match=r"^observables: unknown 'loss'; allowed: norm"):
        cj.run_replicas(m, batch, steps=2, observables=["loss"], progress=False)


def test_an_object_that_is_not_an_observer_is_refused():
    m = QuadraticGD(A, ETA)
    batch = cj.make_replicas(m.flow, base=jnp.ones(3))
    with pytest.raises(TypeError, match=r"^trackers: tuple is not a chaosjax.Observer"):
        cj.run_replicas(m, batch, steps=2, trackers=[("ftle",)], progress=False)
