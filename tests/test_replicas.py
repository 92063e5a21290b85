import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chaosjax import datasets, models, systems
from chaosjax.replicas import ReplicaBatch, make_replicas, run_replicas
from chaosjax.results import ReplicaResults
from chaosjax.training import TrainingMap


@pytest.fixture(scope="module")
def moons_map():
    net = models.PureMLP((2, 8, 2), activation="tanh")
    return TrainingMap(
        net.apply,
        net.init_params(jax.random.PRNGKey(0), jnp.float64),
        datasets.two_moons(40, seed=2),
        loss="mse",
        optimizer="momentum",
        learning_rate=0.1,
        hparams={"momentum": 0.5},
        init_fn=lambda k: net.init_params(k, jnp.float64),
    )


def test_layout_of_a_replica_batch(moons_map):
    rb = make_replicas(
        moons_map, seeds=[0, 1], grid={"learning_rate": [0.1, 0.2]}, n_perturbed=2, eps=[1e-6, 1e-4]
    )
    assert len(rb) == 2 * 2 * (1 + 2 * 2)
    assert rb.states.shape == (20, moons_map.dim)
    np.testing.assert_array_equal(rb.coords["member"][:5], [0, 1, 2, 1, 2])
    np.testing.assert_array_equal(rb.coords["eps"][:5], [0, 1e-6, 1e-6, 1e-4, 1e-4])
    np.testing.assert_array_equal(rb.reference[:10], [0] * 5 + [5] * 5)
    np.testing.assert_allclose(rb.hparams["learning_rate"][:10], [0.1] * 5 + [0.2] * 5)
    np.testing.assert_allclose(rb.hparams["momentum"], 0.5)
    # same perturbation at every grid point
    np.testing.assert_array_equal(rb.states[1] - rb.states[0], rb.states[6] - rb.states[5])


def test_weights_only_uniform_perturbation(iris_map):
    eps = 1e-6
    rb = make_replicas(iris_map, n_perturbed=200, eps=eps)
    delta = np.asarray(rb.states[1:] - rb.states[0])
    mask = iris_map.weight_mask
    assert np.all(delta[:, ~mask[: delta.shape[1]]] == 0) if delta.shape[1] == mask.size else True
    P = iris_map.n_params
    assert np.all(delta[:, :P][:, ~mask] == 0)
    assert np.all(np.abs(delta[:, :P][:, mask]) <= eps)
    l1 = np.abs(delta).sum(1)
    # E[Σ|U(−ε, ε)|] over 70 weights = 70 ε / 2
    assert abs(l1.mean() / (70 * eps / 2) - 1) < 0.03


def test_vmapped_replica_equals_replica_alone(moons_map):
    rb = make_replicas(moons_map, grid={"learning_rate": [0.05, 0.3]}, n_perturbed=2, eps=1e-3)
    res = run_replicas(
        moons_map,
        rb,
        steps=40,
        record_every=10,
        progress=False,
        observables=("loss", "distance_l2", "param_norm"),
    )
    for r in (1, 4):
        ref = rb.reference[r]
        alone = ReplicaBatch(
            states=rb.states[jnp.array([ref, r])],
            hparams={k: v[jnp.array([ref, r])] for k, v in rb.hparams.items()},
            reference=np.array([0, 0]),
            coords={k: v[[ref, r]] for k, v in rb.coords.items()},
        )
        one = run_replicas(
            moons_map,
            alone,
            steps=40,
            record_every=10,
            progress=False,
            observables=("loss", "distance_l2", "param_norm"),
        )
        np.testing.assert_allclose(one.final_state[1], res.final_state[r], rtol=1e-10, atol=1e-13)
        for k in ("loss", "distance_l2", "param_norm"):
            np.testing.assert_allclose(one.records[k][1], res.records[k][r], rtol=1e-9, atol=1e-13)


def test_results_equal_a_python_loop_of_single_steps(moons_map):
    rb = make_replicas(moons_map, grid={"learning_rate": [0.05, 0.3]})
    res = run_replicas(
        moons_map, rb, steps=20, record_every=5, progress=False, observables=("loss",)
    )
    for i, lr in enumerate([0.05, 0.3]):
        tm = moons_map.replace(learning_rate=lr)
        s = rb.states[i]
        losses = [float(tm.loss(s))]
        for t in range(20):
            s = tm.step(s, t)
            if (t + 1) % 5 == 0:
                losses.append(float(tm.loss(s)))
        np.testing.assert_allclose(res.records["loss"][i], losses, rtol=1e-10)
        np.testing.assert_allclose(res.final_state[i], s, rtol=1e-10, atol=1e-14)


def test_divergence_is_flagged_and_frozen(moons_map):
    rb = make_replicas(moons_map, grid={"learning_rate": [0.1, 1e4]}, n_perturbed=1, eps=1e-6)
    res = run_replicas(moons_map, rb, steps=60, record_every=5, progress=False, loss_bound=1e6)
    lr = res.coords["learning_rate"]
    assert np.all(res.diverged_step[lr == 0.1] == -1)
    assert np.all(res.diverged_step[lr == 1e4] > 0)
    assert np.all(np.isfinite(res.records["loss"][lr == 0.1]))
    bad = res.records["loss"][lr == 1e4]
    assert np.isnan(bad[:, -1]).all() and np.isfinite(bad[:, 0]).all()
    assert np.all(np.isfinite(res.final_state))  # frozen at the last good state
    k = res.diverged_step[lr == 1e4][0]
    # records after the divergence step are NaN, before it finite
    assert np.all(np.isnan(bad[0, res.steps >= k])) and np.all(np.isfinite(bad[0, res.steps < k]))


def test_resume_after_interruption_gives_same_arrays(moons_map, tmp_path):
    rb = make_replicas(moons_map, grid={"learning_rate": [0.1, 0.5]}, n_perturbed=2, eps=1e-6)
    kw = dict(
        steps=60,
        record_every=5,
        chunk_steps=20,
        progress=False,
        observables=("loss", "distance_l1", "layer_distance"),
    )
    full = run_replicas(moons_map, rb, **kw)

    def interrupt(t):
        if t == 40:
            raise KeyboardInterrupt

    ck, store = tmp_path / "ck.npz", tmp_path / "s.zarr"
    with pytest.raises(KeyboardInterrupt):
        run_replicas(moons_map, rb, checkpoint=ck, store=store, on_chunk=interrupt, **kw)
    assert ck.exists()
    partial = ReplicaResults.load(store)
    assert partial.steps[-1] == 40 and int(partial.attrs["complete"]) == 0
    resumed = run_replicas(moons_map, rb, checkpoint=ck, store=store, resume=True, **kw)
    assert resumed.attrs["resumed"] == 1
    np.testing.assert_array_equal(resumed.final_state, full.final_state)
    np.testing.assert_array_equal(resumed.steps, full.steps)
    for k in kw["observables"]:
        np.testing.assert_array_equal(resumed.records[k], full.records[k])
    streamed = ReplicaResults.load(store)
    np.testing.assert_array_equal(streamed.records["loss"], full.records["loss"])
    # a different run refuses the checkpoint
    other = make_replicas(moons_map, grid={"learning_rate": [0.1, 0.6]}, n_perturbed=2, eps=1e-6)
    with pytest.raises(ValueError, match="different run"):
        run_replicas(moons_map, other, checkpoint=ck, resume=True, **kw)


def test_plain_map_replicas_separate_at_henon_rate():
    h = systems.henon()
    x = h.x0
    for t in range(200):
        x = h.step(x, t)
    rb = make_replicas(h.step, base=x, n_perturbed=16, eps=1e-12, distribution="gaussian")
    res = run_replicas(h.step, rb, steps=30, record_every=1, progress=False)
    d = res.records["distance_l2"][1:]
    slope = np.polyfit(np.arange(31), np.log(d).mean(0), 1)[0]
    assert 0.3 < slope < 0.55  # λ1 = 0.419 for Hénon, finite-sample spread


def test_independent_seed_replicas(moons_map):
    rb = make_replicas(moons_map, seeds=[3, 4])
    np.testing.assert_array_equal(rb.states[0], moons_map.init_from_key(3))
    assert not np.array_equal(rb.states[0], rb.states[1])
    np.testing.assert_array_equal(rb.reference, [0, 1])


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"eps": -1.0, "n_perturbed": 1}, "eps"),
        ({"n_perturbed": -2}, "n_perturbed"),
        ({"grid": {"beta": [1.0]}}, "grid: unknown hyper-parameter 'beta'"),
        ({"distribution": "cauchy", "n_perturbed": 1}, "distribution"),
        ({"target": "biases", "n_perturbed": 1}, "target"),
        ({"seeds": [1], "base": jnp.zeros(3)}, "either seeds"),
    ],
)
def test_bad_replica_arguments(moons_map, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        make_replicas(moons_map, **kwargs)


def test_bad_run_arguments(moons_map):
    rb = make_replicas(moons_map)
    with pytest.raises(ValueError, match="record_every"):
        run_replicas(moons_map, rb, steps=10, record_every=3, progress=False)
    with pytest.raises(ValueError, match="observables: unknown 'energy'"):
        run_replicas(moons_map, rb, steps=10, observables=("energy",), progress=False)
    with pytest.raises(TypeError, match="step"):
        run_replicas(
            lambda x: x, make_replicas(lambda x, t: x, base=jnp.zeros(2)), steps=2, progress=False
        )


def test_warns_when_eps_below_float32_resolution():
    net = models.PureMLP((2, 4, 2))
    tm = TrainingMap(
        net.apply,
        net.init_params(jax.random.PRNGKey(0), jnp.float32),
        datasets.two_moons(20),
        learning_rate=0.1,
    )
    with pytest.warns(UserWarning, match="below the resolution of float32"):
        make_replicas(tm, n_perturbed=1, eps=1e-10)
