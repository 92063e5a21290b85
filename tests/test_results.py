import numpy as np
import xarray as xr

from chaosjax.results import ReplicaResults


def make():
    rng = np.random.default_rng(0)
    return ReplicaResults(
        steps=np.arange(0, 30, 10),
        records={"loss": rng.random((4, 3)), "layer_distance": rng.random((4, 3, 2))},
        final_state=rng.random((4, 5)),
        diverged_step=np.array([-1, -1, 17, -1]),
        coords={"learning_rate": np.array([0.1, 0.1, 1.0, 1.0]), "member": np.array([0, 1, 0, 1])},
        layer_names=("layer_0", "layer_1"),
        attrs={"config": "name = 'x'", "environment": {"jax": "0"}, "wall_time_s": 1.5},
    )


def test_to_xarray_dims_and_coords():
    ds = make().to_xarray()
    assert ds["loss"].dims == ("replica", "step")
    assert ds["layer_distance"].dims == ("replica", "step", "layer")
    assert list(ds["layer"].values) == ["layer_0", "layer_1"]
    assert ds["learning_rate"].dims == ("replica",)
    assert list(ds["eta"].values) == list(ds["learning_rate"].values)  # η alias
    assert ds.sel(step=10)["loss"].shape == (4,)


def test_zarr_roundtrip_without_pickle(tmp_path):
    r = make()
    r.save(tmp_path / "r.zarr")
    back = ReplicaResults.load(tmp_path / "r.zarr")
    np.testing.assert_array_equal(back.records["layer_distance"], r.records["layer_distance"])
    np.testing.assert_array_equal(back.diverged_step, r.diverged_step)
    np.testing.assert_array_equal(back.coords["learning_rate"], r.coords["learning_rate"])
    assert back.attrs["environment"] == {"jax": "0"} and back.attrs["complete"] == 1
    assert back.layer_names == r.layer_names
    assert set(back.coords) == set(r.coords)
    # readable with plain xarray, without the unconsolidated-metadata warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with xr.open_zarr(tmp_path / "r.zarr") as ds:
            assert ds["loss"].shape == (4, 3)
    # overwriting is atomic: no temporary folders left behind
    r.save(tmp_path / "r.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.zarr"]


def test_results_are_a_pytree():
    import jax

    r = make()
    doubled = jax.tree_util.tree_map(lambda a: a * 2, r)
    np.testing.assert_array_equal(doubled.records["loss"], 2 * r.records["loss"])
    assert doubled.layer_names == r.layer_names


def test_select_and_diverged():
    r = make()
    np.testing.assert_array_equal(
        r.select(learning_rate=1.0, member=1), [False, False, False, True]
    )
    np.testing.assert_array_equal(r.diverged, [False, False, True, False])


def test_a_finished_stream_says_complete_and_an_unfinished_one_does_not(tmp_path):
    import pytest

    from chaosjax.results import ZarrStream

    ds = make().to_xarray()
    stream = ZarrStream(tmp_path / "s.zarr")
    with pytest.raises(RuntimeError, match="nothing was appended"):
        stream.finish()
    stream.append(ds.isel(step=slice(0, 2)))
    stream.append(ds.isel(step=slice(2, 3)))
    partial = ReplicaResults.load(tmp_path / "s.zarr")
    assert int(partial.attrs["complete"]) == 0
    stream.finish(wall_time_s=2.5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # consolidated again: no fallback warning
        with xr.open_zarr(tmp_path / "s.zarr") as z:
            assert int(z.attrs["complete"]) == 1 and z.attrs["wall_time_s"] == 2.5
            assert z["loss"].shape == (4, 3)
    done = ReplicaResults.load(tmp_path / "s.zarr")
    assert int(done.attrs["complete"]) == 1
    np.testing.assert_array_equal(done.records["loss"], make().records["loss"])
    np.testing.assert_array_equal(done.steps, make().steps)
