"""Observers of one run: tangents, twins, snapshots and fine distances advance inside the
replica engine, on the trajectory it records."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chaosjax as cj
from chaosjax import datasets, systems
from chaosjax.training import TrainingMap


@pytest.fixture(scope="module")
def regression_map():
    """optax.sgd on ½‖Xw + b − y‖² mean: an affine map with Jacobian I − ηH."""
    ds = datasets.teacher_student(64, d_in=5, d_out=1, seed=2)
    params = {"kernel": jnp.zeros((5, 1)), "bias": jnp.zeros((1,))}

    def apply(p, x):
        return x @ p["kernel"] + p["bias"]

    tm = TrainingMap(apply, params, ds, loss="mse", optimizer="sgd", learning_rate=0.9)
    xa = np.concatenate([ds.x_train, np.ones((ds.x_train.shape[0], 1))], axis=1)
    h = xa.T @ xa / xa.shape[0]
    exact = np.sort(np.log(np.abs(1 - 0.9 * np.linalg.eigvalsh(h))))[::-1]
    return tm, exact


def test_tracker_records_exact_ftle_on_linear_regression(regression_map):
    """Once the basis has aligned, every recorded FTLE equals log|1 − η a_i| to 1e-8."""
    tm, exact = regression_map
    batch = cj.make_replicas(tm, n_perturbed=2, eps=1e-6)
    tr = cj.LyapunovTracker(k=3, align=300)
    res = cj.run_replicas(tm, batch, steps=500, record_every=20, trackers=[tr], progress=False)
    ftle = res.records["ftle"]
    assert ftle.shape == (3, 26, 3)
    assert np.isnan(ftle[:, 0]).all()  # nothing measured at the first record
    assert np.isnan(ftle[1:]).all()  # perturbed replicas are not tracked
    after = res.steps > 300
    np.testing.assert_allclose(ftle[0, after], np.broadcast_to(exact[:3], (after.sum(), 3)),
                               atol=1e-8)  # fmt: skip
    assert np.isnan(ftle[0, 1 : int(np.argmax(after))]).all()  # alignment is not accumulated
    lg = res.records["log_growth"]
    assert res.dims_of("log_growth") == ("renorm", "exponent")
    np.testing.assert_array_equal(res.steps_of("log_growth"), np.arange(301, 501))
    np.testing.assert_allclose(lg[0].mean(0), exact[:3], atol=1e-8)
    # the tangent loss is the recorded loss of the tracked replica
    np.testing.assert_array_equal(res.records["tangent_loss"][0], res.records["loss"][0])


def test_tracker_matches_the_driver_and_renormalises_every_few_steps(regression_map):
    tm, exact = regression_map
    batch = cj.make_replicas(tm)
    tr = cj.LyapunovTracker(k=2, renorm_every=5, warmup=10, align=600)
    res = cj.run_replicas(tm, batch, steps=1000, record_every=10, trackers=[tr], progress=False)
    drv = cj.lyapunov_spectrum(tm.step, tm.init(), k=2, steps=390, warmup=10, align=600,
                               renorm_every=5)  # fmt: skip
    np.testing.assert_allclose(res.records["log_growth"][0], drv.log_growth, rtol=1e-10)
    np.testing.assert_allclose(drv.exponents, exact[:2], atol=1e-8)
    assert res.records["log_growth"].shape == (1, 78, 2)  # (1000 − 610) / 5 renormalisations
    ftle = res.records["ftle"][0]
    late = res.steps >= 620
    np.testing.assert_allclose(ftle[late], np.broadcast_to(exact[:2], (late.sum(), 2)),
                               atol=1e-8)  # fmt: skip


def test_tracker_state_is_checkpointed_and_resumes_bitwise(tmp_path, regression_map):
    tm, _ = regression_map
    batch = cj.make_replicas(tm, n_perturbed=1, eps=1e-6)
    kw = dict(steps=100, record_every=10, chunk_steps=20, progress=False,
              trackers=[cj.LyapunovTracker(k=2, rows="all")])  # fmt: skip
    whole = cj.run_replicas(tm, batch, **kw)

    def stop(t):
        if t == 60:
            raise KeyboardInterrupt

    ck = tmp_path / "c.npz"
    with pytest.raises(KeyboardInterrupt):
        cj.run_replicas(tm, batch, checkpoint=ck, on_chunk=stop, **kw)
    again = cj.run_replicas(tm, batch, checkpoint=ck, resume=True, **kw)
    for name in whole.records:
        np.testing.assert_array_equal(again.records[name], whole.records[name], err_msg=name)
    np.testing.assert_array_equal(again.tracker_states[0], whole.tracker_states[0])


def test_fine_distances_have_their_own_axis(regression_map):
    """Distances every step while the records (and trackers) keep every 10 steps."""
    tm, _ = regression_map
    batch = cj.make_replicas(tm, n_perturbed=2, eps=1e-6)
    obs = ("loss", "distance_l2", "layer_distance")
    fine = cj.run_replicas(tm, batch, steps=40, record_every=10, distance_every=1,
                           observables=obs, progress=False)  # fmt: skip
    every = cj.run_replicas(tm, batch, steps=40, record_every=1, observables=obs, progress=False)
    assert fine.records["loss"].shape == (3, 5)
    assert fine.dims_of("distance_l2") == ("distance_step",)
    assert fine.dims_of("layer_distance") == ("distance_step", "layer")
    np.testing.assert_array_equal(fine.steps_of("distance_l2"), np.arange(41))
    np.testing.assert_allclose(fine.records["distance_l2"], every.records["distance_l2"],
                               rtol=1e-12)  # fmt: skip
    np.testing.assert_allclose(fine.records["layer_distance"], every.records["layer_distance"],
                               rtol=1e-12)  # fmt: skip
    ds = fine.to_xarray()
    assert ds["distance_l2"].dims == ("replica", "distance_step")
    with pytest.raises(ValueError, match="distance_every"):
        cj.run_replicas(tm, batch, steps=40, record_every=10, distance_every=3, progress=False)


def test_twin_tracker_pulls_back_inside_a_run():
    h = systems.henon()
    x = h.x0
    for t in range(100):
        x = h.step(x, t)
    twin = cj.TwinTracker(d0=1e-9, renorm_every=2, warmup=10)
    batch = cj.make_replicas(h.step, base=x, n_perturbed=2, eps=1e-9)
    res = cj.run_replicas(h.step, batch, steps=2000, record_every=10, trackers=[twin],
                          observables=("distance_l2",), progress=False)  # fmt: skip
    lg = res.records["twin_log_growth"]
    assert np.isnan(lg[0]).all() and np.isfinite(lg[1:]).all()
    lam = lg[1:].mean(axis=1) / 2
    assert np.all(np.abs(lam - 0.4194) < 0.06)
    # pulled back every 2 steps: the recorded distance stays near d0 (one step of growth)
    assert np.nanmax(res.records["distance_l2"][1:, 2:]) < 1e-9 * np.exp(2 * 3.0)


def test_snapshots_are_the_recorded_states(regression_map):
    tm, _ = regression_map
    batch = cj.make_replicas(tm, seeds=None, n_perturbed=1, eps=1e-6)
    snap = cj.StateSnapshots(at=(20, 40), rows="all")
    res = cj.run_replicas(tm, batch, steps=40, record_every=10, trackers=[snap], progress=False)
    assert res.records["state"].shape == (2, 2, tm.dim)
    np.testing.assert_array_equal(res.records["state"][:, 1], res.final_state)
    np.testing.assert_array_equal(res.steps_of("state"), [20, 40])
    with pytest.raises(ValueError, match="at: snapshot steps must be records"):
        cj.run_replicas(tm, batch, steps=40, record_every=10, progress=False,
                        trackers=[cj.StateSnapshots(at=(15,))])  # fmt: skip


def test_pytree_state_with_counter_through_the_engine():
    """A plain map on a pytree state: float leaves are dynamical, the integer counter is
    carried exactly, never perturbed."""
    h = systems.henon()

    def step(s, t):
        return {"x": h.step(s["x"], t), "n": s["n"] + 1}

    base = {"x": h.x0, "n": jnp.int32(5)}
    batch = cj.make_replicas(step, base=base, n_perturbed=2, eps=1e-10)
    assert batch.states.shape == (3, 2) and batch.carry[0].shape == (3,)
    res = cj.run_replicas(step, batch, steps=30, record_every=10, progress=False,
                          trackers=[cj.LyapunovTracker(k=2, rows="all")])  # fmt: skip
    np.testing.assert_array_equal(res.final_carry[0], [35, 35, 35])
    ref = cj.lyapunov_spectrum(h.step, h.x0, k=2, steps=30)
    np.testing.assert_allclose(res.records["log_growth"][0], ref.log_growth, rtol=1e-12)


def test_streamed_store_holds_every_axis_and_the_latest_states(tmp_path, regression_map):
    tm, _ = regression_map
    batch = cj.make_replicas(tm, n_perturbed=1, eps=1e-6)
    store = tmp_path / "s.zarr"

    def stop(t):
        if t == 40:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cj.run_replicas(tm, batch, steps=80, record_every=10, chunk_steps=20, store=store,
                        distance_every=2, trackers=[cj.LyapunovTracker(k=2)], on_chunk=stop,
                        progress=False)  # fmt: skip
    part = cj.ReplicaResults.load(store)
    assert part.steps[-1] == 40 and int(part.attrs["complete"]) == 0
    np.testing.assert_array_equal(part.steps_of("distance_l2"), np.arange(0, 41, 2))
    np.testing.assert_array_equal(part.steps_of("log_growth"), np.arange(1, 41))
    whole = cj.run_replicas(tm, batch, steps=40, record_every=10, progress=False)
    # the store's states are those of its last chunk, not the initial ones
    np.testing.assert_allclose(part.final_state, whole.final_state, rtol=1e-12)


def test_tracker_refusals(regression_map):
    tm, _ = regression_map
    batch = cj.make_replicas(tm)
    with pytest.raises(ValueError, match="k: must be an integer in"):
        cj.run_replicas(tm, batch, steps=10, trackers=[cj.LyapunovTracker(k=99)], progress=False)
    with pytest.raises(ValueError, match="warmup"):
        cj.run_replicas(tm, batch, steps=10, trackers=[cj.LyapunovTracker(warmup=10)],
                        progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="rows: unknown"):
        cj.run_replicas(tm, batch, steps=10, trackers=[cj.LyapunovTracker(rows="some")],
                        progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="used twice"):
        cj.run_replicas(tm, batch, steps=10, progress=False,
                        trackers=[cj.LyapunovTracker(), cj.LyapunovTracker()])  # fmt: skip


def test_divergence_gives_a_reason_not_a_number():
    res = cj.lyapunov_spectrum(lambda x, t: x * 1e200, jnp.ones(2), k=1, steps=5)
    assert not np.isfinite(res.exponent)
    assert "state became non-finite" in res.reasons and "step 2" in res.reasons
    collapse = cj.lyapunov_spectrum(lambda x, t: x.at[1].set(0.0), jnp.ones(2), k=2, steps=3)
    assert "collapsed" in collapse.reasons
    jax.block_until_ready(collapse.final_basis)
