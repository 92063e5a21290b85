"""Scale-out: the replica axis sharded over the 4 CPU devices of conftest, memory planning,
and a two-process run on localhost (gloo collectives)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chaosjax as cj
from chaosjax import sharding, systems

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from problems import iris_replicas


def _same(a, b, rtol=1e-10, atol=1e-12):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, equal_nan=True, err_msg=k)


def test_mesh_and_bad_devices():
    assert sharding.mesh_size(sharding.replica_mesh()) == 1  # CPU: sharding is opt-in
    assert sharding.mesh_size(sharding.replica_mesh(4)) == 4
    assert sharding.mesh_size(sharding.replica_mesh(2)) == 2
    assert sharding.mesh_size(sharding.replica_mesh(jax.devices()[1:3])) == 2
    with pytest.raises(ValueError, match="devices: must be between 1 and 4"):
        sharding.replica_mesh(5)
    with pytest.raises(TypeError, match="devices:"):
        sharding.replica_mesh("gpu")


def test_put_gather_pad_roundtrip():
    mesh = sharding.replica_mesh(4)
    x = np.arange(18 * 3, dtype=np.float64).reshape(18, 3)
    xp = sharding.pad_rows(x, sharding.padded_size(18, mesh))
    assert xp.shape == (20, 3) and np.array_equal(xp[18], x[-1])
    g = sharding.put_rows(xp, mesh)
    assert g.sharding.spec == jax.sharding.PartitionSpec("replica")
    assert len({s.device for s in g.addressable_shards}) == 4
    assert np.array_equal(sharding.gather(g), xp)
    rows, data = sharding.local_rows(g)
    assert np.array_equal(rows, np.arange(20)) and np.array_equal(data, xp)
    back = sharding.from_local_rows(rows, data, xp.shape, mesh)
    assert np.array_equal(sharding.gather(back), xp)
    with pytest.raises(ValueError, match="not a multiple"):
        sharding.put_rows(x[:3], mesh)


def test_replica_run_sharded_equals_unsharded():
    """4 devices, no LAPACK in the program (see the next test for the curvature tracker)."""
    tmap, batch = iris_replicas()
    kw = dict(steps=40, record_every=10, progress=False, observables=("loss", "distance_l2"))
    one = cj.run_replicas(tmap, batch, devices=1, **kw)
    four = cj.run_replicas(tmap, batch, devices=4, **kw)
    assert four.attrs["devices"] == 4
    _same(one.records, four.records)
    np.testing.assert_allclose(one.final_state, four.final_state, rtol=1e-12, atol=1e-14)


def test_replica_run_sharded_equals_unsharded_with_curvature_tracker():
    """Two devices: with more forced CPU devices than the 2 cores of CI, XLA's CPU runtime
    can hang in the tracker's batched LAPACK calls (replica_mesh warns about it)."""
    tmap, batch = iris_replicas()
    kw = dict(
        steps=40,
        record_every=10,
        progress=False,
        trackers=[cj.CurvatureTracker(k=2, cold_matvecs=16)],
    )
    one = cj.run_replicas(tmap, batch, devices=1, **kw)
    four = cj.run_replicas(tmap, batch, devices=2, **kw)
    assert four.attrs["devices"] == 2 and one.attrs["devices"] == 1
    assert four.records["loss"].shape == (18, 5)
    _same(one.records, four.records, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(one.final_state, four.final_state, rtol=1e-12, atol=1e-14)
    assert np.array_equal(one.diverged_step, four.diverged_step)


def _sharded_program(tmap, batch, n_dev, trackers=(), names=("loss",)):
    """The engine's sharded first-record and chunk programs for ``batch`` and their
    arguments (2 records of 5 steps)."""
    from chaosjax._engine_program import _sharded_fns, _Spec
    from chaosjax._engine_rows import _RowLayout, tracked_rows
    from chaosjax.observers import RunInfo

    mesh = sharding.replica_mesh(n_dev)
    sets = [tracked_rows(tr.rows, batch.reference) for tr in trackers]
    lay = _RowLayout(batch.reference, n_dev, sets)

    def put(x):
        return sharding.put_rows(np.asarray(x)[lay.perm], mesh)

    spec = _Spec(
        names, (), 2, 5, 1e8, np.inf, (), tmap.n_params, tuple(trackers), RunInfo(0, 10, 5),
        True,
    )  # fmt: skip
    first, chunk = _sharded_fns(mesh, spec)
    hp = {k: put(v) for k, v in batch.hparams.items()}
    ref = sharding.put_rows(lay.local_ref, mesh)
    state = (put(batch.states), (), put(np.ones(len(batch), bool)),
             put(np.full(len(batch), -1, np.int32)))  # fmt: skip
    track = tuple(
        (sharding.put_rows(idx, mesh), sharding.put_rows(valid, mesh))
        for idx, valid, _, _ in lay.tracks
    )
    t0 = jnp.asarray(0, jnp.int32)
    return (
        lay,
        mesh,
        first,
        (tmap, hp, ref, state, t0, track),
        chunk,
        (hp, ref, state, track),
    )


def test_sharded_chunk_keeps_states_on_devices():
    """The chunk's carry comes back sharded over the mesh (no gather between chunks), each
    reference group lies on one device, and the program has no cross-device collective."""
    tmap, batch = iris_replicas()
    tracker = cj.LyapunovTracker(k=2)  # references only: a gather inside each device block
    lay, mesh, first, fargs, chunk, (hp, ref, state, track) = _sharded_program(
        tmap, batch, 4, [tracker], ("loss", "distance_l2")
    )
    B = lay.B
    for d in range(4):  # every row's reference is inside its device block
        block = lay.perm[d * B : (d + 1) * B]
        assert np.array_equal(block[lay.local_ref[d * B : (d + 1) * B]], batch.reference[block])
    assert np.array_equal(lay.perm[lay.pos], np.arange(len(batch)))
    _, tstates = first(*fargs)
    args = (tmap, hp, ref, state, tstates,
            jnp.asarray(0, jnp.int32), track)  # fmt: skip
    ((x, _, a, d), ts), (obs, fine) = chunk(*args)
    for arr in (x, a, d, ts[0]):
        assert arr.sharding.is_equivalent_to(sharding.row_sharding(mesh), arr.ndim)
    assert obs["loss"].shape == (2, len(lay.perm))
    assert fine["log_growth"].shape[:2] == (2, 5)
    hlo = chunk.lower(*args).compile().as_text()
    for op in ("all-gather", "all-reduce", "collective-permute", "all-to-all"):
        assert op not in hlo


def test_sharded_tracker_program_has_no_lapack_on_cpu():
    """On the CPU backend the sharded program's small factorisations avoid LAPACK custom
    calls (they can deadlock XLA's CPU runtime across devices) and agree with LAPACK."""

    from chaosjax import _smalllinalg

    tmap, batch = iris_replicas()
    trackers = [cj.CurvatureTracker(k=2, cold_matvecs=16), cj.LyapunovTracker(k=2)]
    _, _, first, fargs, chunk, (hp, ref, state, track) = _sharded_program(tmap, batch, 2, trackers)
    # LAPACK enters at lowering (custom calls named lapack_*): the lowered programs tell, and
    # nothing needs compiling (the observer states' shapes come from eval_shape)
    assert "lapack" not in first.lower(*fargs).as_text().lower()
    _, tstates = jax.eval_shape(first, *fargs)
    args = (tmap, hp, ref, state, tstates,
            jnp.asarray(0, jnp.int32), track)  # fmt: skip
    assert "lapack" not in chunk.lower(*args).as_text().lower()
    # the check can fail: an eigh lowered on the CPU names its LAPACK call
    assert "lapack" in jax.jit(jnp.linalg.eigh).lower(jnp.eye(3)).as_text().lower()
    rng = np.random.default_rng(1)
    a = rng.normal(size=(7, 7))
    a = a + a.T
    w, v = _smalllinalg.jacobi_eigh(jnp.asarray(a))
    np.testing.assert_allclose(w, np.linalg.eigvalsh(a), atol=1e-12)
    np.testing.assert_allclose(a @ np.asarray(v), np.asarray(v) * np.asarray(w), atol=1e-12)
    y = jnp.asarray(rng.normal(size=(9, 3)))
    q, r = _smalllinalg.mgs_qr(y)
    np.testing.assert_allclose(q @ r, y, atol=1e-12)
    np.testing.assert_allclose(np.abs(r), np.abs(np.linalg.qr(np.asarray(y))[1]), atol=1e-12)


def test_sharded_resume_is_bitwise(tmp_path):
    tmap, batch = iris_replicas()
    kw = dict(steps=60, record_every=10, chunk_steps=20, progress=False, devices=4)
    full = cj.run_replicas(tmap, batch, **kw)

    class Stop(Exception):
        pass

    def stop(t):
        if t == 20:
            raise Stop

    ck = tmp_path / "ck.npz"
    with pytest.raises(Stop):
        cj.run_replicas(tmap, batch, checkpoint=ck, on_chunk=stop, **kw)
    res = cj.run_replicas(tmap, batch, checkpoint=ck, resume=True, **kw)
    assert res.attrs["resumed"] == 1
    for k in full.records:
        assert np.array_equal(full.records[k], res.records[k], equal_nan=True), k
    assert np.array_equal(full.final_state, res.final_state)


def test_lyapunov_twin_clv_sharded_match():
    """Sharded over 2 CPU devices the tangent QR runs without LAPACK (Gram–Schmidt: batched
    LAPACK calls across CPU devices can deadlock), so results agree to round-off."""
    h = systems.Henon()
    x0 = jnp.stack([h.x0 + 0.01 * i for i in range(6)])
    a = cj.lyapunov_spectrum(h.step, x0, k=2, steps=300, batched=True, devices=1)
    b = cj.lyapunov_spectrum(h.step, x0, k=2, steps=300, batched=True, devices=2)
    np.testing.assert_allclose(a.log_growth, b.log_growth, rtol=1e-12, atol=1e-12)
    assert b.final_state.shape == (6, 2) and b.final_basis.shape == (6, 2, 2)
    ta = cj.twin_lyapunov(h.step, x0, steps=300, batched=True, devices=1)
    tb = cj.twin_lyapunov(h.step, x0, steps=300, batched=True, devices=2)
    assert np.array_equal(ta.log_growth, tb.log_growth)  # no factorisation in a twin run
    ca = cj.covariant_lyapunov_vectors(
        h.step, x0, k=2, steps=100, backward_transient=40, batched=True, devices=1
    )
    cb = cj.covariant_lyapunov_vectors(
        h.step, x0, k=2, steps=100, backward_transient=40, batched=True, devices=2
    )
    np.testing.assert_allclose(ca.exponents, cb.exponents, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(ca.vectors, cb.vectors, rtol=1e-9, atol=1e-10)


def test_training_lyapunov_grid_sharded_matches():
    """A learning-rate grid of a TrainingMap (args batched with the states) over 4 devices."""
    tmap, batch = iris_replicas()
    refs = np.unique(batch.reference)
    hp = {k: v[refs] for k, v in batch.hparams.items()}
    kw = dict(k=3, steps=60, batched=True, args=hp)
    a = cj.lyapunov_spectrum(tmap.step_with, batch.states[refs], devices=1, **kw)
    b = cj.lyapunov_spectrum(tmap.step_with, batch.states[refs], devices=2, **kw)
    np.testing.assert_allclose(a.log_growth, b.log_growth, rtol=1e-9, atol=1e-12)


def test_memory_plan_splits_and_refuses():
    mesh = sharding.replica_mesh(4)
    plan = sharding.plan_batches(100, 1000, mesh, memory_limit=10_000)
    assert (plan.per_device, plan.n_passes, plan.batch) == (10, 3, 40)
    assert sharding.plan_batches(8, 1000, mesh, memory_limit="1MiB").n_passes == 1
    with pytest.raises(ValueError, match="memory: one replica needs"):
        sharding.plan_batches(8, 10_000, mesh, memory_limit=5_000)
    assert sharding.parse_bytes("2GiB") == 2 * 2**30
    assert sharding.parse_bytes("1.5 MB") == 1_500_000
    with pytest.raises(ValueError, match="memory_limit"):
        sharding.parse_bytes("lots")


def test_memory_estimate_counts_state_and_tracker():
    from chaosjax.replicas import replica_memory

    tmap, batch = iris_replicas()
    plain = replica_memory(tmap, batch)
    tracked = replica_memory(tmap, batch, [cj.CurvatureTracker(k=2, cold_matvecs=16)])
    assert plain.parts["state"] == 4 * tmap.dim * 8
    # a cold Lanczos holds at least its (m + 1, n_params) basis
    assert tracked.parts["CurvatureTracker"] >= 17 * tmap.n_params * 8
    assert tracked.per_replica > plain.per_replica
    est = cj.lyapunov.tangent_memory(systems.Lorenz96(n=40).step, jnp.zeros(40), k=8)
    assert est.parts["tangents"] == 9 * 40 * 8


def test_run_in_passes_matches_single_pass(tmp_path):
    from chaosjax.replicas import replica_memory

    tmap, batch = iris_replicas()
    per = replica_memory(tmap, batch).per_replica
    kw = dict(steps=30, record_every=10, progress=False, devices=2)
    whole = cj.run_replicas(tmap, batch, **kw)
    split = cj.run_replicas(
        tmap, batch, memory_limit=4 * per, checkpoint=tmp_path / "c.npz", store=tmp_path / "s", **kw
    )
    assert split.attrs["passes"] > 1
    _same(whole.records, split.records)
    assert np.array_equal(whole.coords["seed"], split.coords["seed"])
    ds = cj.open_store(tmp_path / "s")
    assert ds.sizes["replica"] == 18
    with pytest.raises(ValueError, match="reference group of 3"):
        cj.run_replicas(tmap, batch, memory_limit=2 * per, **kw)
    with pytest.raises(ValueError, match="memory: one replica"):
        cj.run_replicas(tmap, batch, memory_limit=per // 2, **kw)


def test_lyapunov_in_passes():
    h = systems.Henon()
    x0 = jnp.stack([h.x0 + 0.01 * i for i in range(6)])
    a = cj.lyapunov_spectrum(h.step, x0, k=2, steps=200, batched=True, devices=2)
    per = cj.lyapunov.tangent_memory(h.step, x0, k=2, batched=True).per_replica
    b = cj.lyapunov_spectrum(h.step, x0, k=2, steps=200, batched=True, memory_limit=per, devices=2)
    assert b.info["passes"] == 3  # one replica per device and pass
    assert np.array_equal(a.log_growth, b.log_growth)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_on_localhost(tmp_path):
    worker = Path(__file__).parent / "helpers" / "two_process_worker.py"
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(port), str(i), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("two-process run timed out")
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    tmap, batch = iris_replicas()
    ref = cj.run_replicas(tmap, batch, steps=60, record_every=10, chunk_steps=20, progress=False)
    h = systems.Henon()
    x0 = np.stack([np.asarray(h.x0) + 0.01 * i for i in range(6)])
    ly = cj.lyapunov_spectrum(h.step, x0, k=2, steps=300, batched=True)
    for i in range(2):
        z = np.load(tmp_path / f"process{i}.npz")
        np.testing.assert_allclose(z["loss"], ref.records["loss"], rtol=1e-10)
        np.testing.assert_allclose(z["distance"], ref.records["distance_l2"], rtol=1e-8, atol=1e-14)
        np.testing.assert_allclose(z["final_state"], ref.final_state, rtol=1e-12, atol=1e-14)
        assert bool(z["resumed_equal"]) and int(z["resumed_flag"]) == 1
        np.testing.assert_allclose(z["log_growth"], ly.log_growth, rtol=1e-12, atol=1e-14)
        # each process checkpointed its own rows
        assert (tmp_path / f"ckpt.p{i}of2.npz").exists()
    # process 0 alone wrote the store
    ds = cj.open_store(tmp_path / "store.zarr")
    assert ds.sizes["replica"] == 18
    np.testing.assert_allclose(ds["loss"].values, ref.records["loss"], rtol=1e-10)
