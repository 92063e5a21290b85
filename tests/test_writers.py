"""Writers of chaosjax.Monitor round-trip: CSV, JSONL, zarr (results format), TensorBoard, any
write_scalars object and any callable; one writer or a list."""

import math
import struct

import jax.numpy as jnp
import numpy as np
import pytest

import chaosjax as cj
from chaosjax import probes as P
from chaosjax import writers as W

ROWS = [
    (0, {"sharpness": 2.5, "sharpness/residual": 1e-9}),
    (50, {"sharpness": 3.25, "sharpness/residual": 2e-9, "ftle": float("nan")}),
    (100, {"sharpness": 1.0 / 3.0, "sharpness/residual": 0.0, "ftle": -0.125}),
]


def _same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == b


def _write(w):
    for step, m in ROWS:
        w.write_scalars(step, m)
    w.close()


def test_csv_round_trips_and_widens_its_header(tmp_path):
    w = W.CSV(tmp_path / "sub" / "m.csv")
    _write(w)
    rows = W.read_csv(tmp_path / "sub" / "m.csv")
    assert [r["step"] for r in rows] == [0, 50, 100]
    for r, (_, m) in zip(rows, ROWS):
        assert set(r) - {"step"} == set(m)  # the first row has no ftle cell
        for k, v in m.items():
            assert _same(r[k], v)  # repr of floats: exact
    # append: a killed run's rows stay, new rows follow
    w2 = W.CSV(tmp_path / "sub" / "m.csv", append=True)
    w2.write_scalars(150, {"sharpness": 4.0})
    assert [r["step"] for r in W.read_csv(tmp_path / "sub" / "m.csv")] == [0, 50, 100, 150]


def test_jsonl_round_trips_with_nan_as_null(tmp_path):
    _write(W.JSONL(tmp_path / "m.jsonl"))
    text = (tmp_path / "m.jsonl").read_text()
    assert "NaN" not in text and "null" in text  # strict JSON
    rows = W.read_jsonl(tmp_path / "m.jsonl")
    for r, (step, m) in zip(rows, ROWS):
        assert r["step"] == step
        for k, v in m.items():
            assert _same(r[k], v)


def test_zarr_store_is_in_the_results_format(tmp_path):
    _write(W.Zarr(tmp_path / "m.zarr"))
    got = W.read_zarr(tmp_path / "m.zarr")
    assert set(got) == {"sharpness", "sharpness/residual", "ftle"}
    steps, vals = got["ftle"]
    np.testing.assert_array_equal(steps, [0, 50, 100])
    assert np.isnan(vals[0]) and np.isnan(vals[1]) and vals[2] == -0.125
    np.testing.assert_array_equal(got["sharpness"][1], [2.5, 3.25, 1.0 / 3.0])
    ds = cj.open_store(tmp_path / "m.zarr")  # the results store reader
    assert ds.attrs["complete"] == 1 and ds.attrs["kind"] == "monitor"
    assert ds["sharpness"].dims == ("replica", "step")
    res = cj.ReplicaResults.load(tmp_path / "m.zarr")
    assert res.n_replicas == 1 and list(res.steps) == [0, 50, 100]


class Recorder:
    def __init__(self):
        self.rows = []

    def write_scalars(self, step, mapping):
        self.rows.append((step, dict(mapping)))


def test_monitor_writes_to_a_list_of_writers(tmp_path):
    rec, calls = Recorder(), []

    def quad(p, b):
        return 0.5 * p @ (b @ p)

    a = jnp.diag(jnp.arange(1.0, 5.0))
    mon = cj.Monitor(
        quad,
        probes=[P.Sharpness(), P.GradientNorm()],
        every=2,
        params=lambda s: s,
        writer=[rec, lambda step, m: calls.append((step, m)), W.JSONL(tmp_path / "m.jsonl")],
    )
    outs = {t: mon(t, jnp.ones(4) * (1 + t), a) for t in range(5)}
    assert [s for s, _ in rec.rows] == [0, 2, 4] == [s for s, _ in calls]
    for step, m in rec.rows:
        assert m == outs[step]
        np.testing.assert_allclose(m["sharpness"], 4.0, rtol=1e-10)
    assert [r["step"] for r in W.read_jsonl(tmp_path / "m.jsonl")] == [0, 2, 4]
    mon.close()


def _summary_values(logdir):
    """(step, summary value) of every value in the TFRecord event files of ``logdir``."""
    from tensorboardX.proto import event_pb2

    for f in sorted(logdir.glob("events.out.tfevents.*")):
        data = f.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            ev = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                yield ev.step, v


def _events(logdir):
    """(tag, step, value) of every scalar in the event files of ``logdir``."""
    return [(v.tag, step, v.simple_value) for step, v in _summary_values(logdir)]


def test_tensorboard_event_files_round_trip(tmp_path):
    pytest.importorskip("tensorboardX")
    _write(W.TensorBoard(tmp_path / "tb"))
    ev = _events(tmp_path / "tb")
    got = {(tag, step): v for tag, step, v in ev}
    for step, m in ROWS:
        for k, v in m.items():
            assert _same(got[(k, step)], float(np.float32(v)))  # TensorBoard stores float32


TEXT = 'η_t is unknown: pass Monitor(learning_rate=...), "quoted" | piped'


def _write_with_texts(w):
    w.write_texts(0, {"reason/critical_sharpness": TEXT})
    _write(w)


@pytest.mark.parametrize("kind", ["csv", "jsonl", "zarr"])
def test_texts_round_trip_beside_the_scalars(tmp_path, kind):
    path = tmp_path / {"csv": "m.csv", "jsonl": "m.jsonl", "zarr": "m.zarr"}[kind]
    w = {"csv": W.CSV, "jsonl": W.JSONL, "zarr": W.Zarr}[kind](path)
    assert W.takes_texts(w)
    _write_with_texts(w)
    assert W.read_texts(path) == {"reason/critical_sharpness": [(0, TEXT)]}
    if kind == "csv":  # a row of its own, the text in its column; the scalars as before
        rows = W.read_csv(path)
        assert rows[0] == {"step": 0, "reason/critical_sharpness": TEXT}
        assert [r["step"] for r in rows[1:]] == [0, 50, 100]
        assert all(_same(rows[1][k], v) for k, v in ROWS[0][1].items())
    elif kind == "jsonl":
        rows = W.read_jsonl(path)
        assert rows[0] == {"step": 0, "reason/critical_sharpness": TEXT}
        assert [r["step"] for r in rows[1:]] == [0, 50, 100]
    else:  # the store's attribute; the records unchanged
        assert cj.open_store(path).attrs["kind"] == "monitor"
        assert set(W.read_zarr(path)) == {"sharpness", "sharpness/residual", "ftle"}


def test_zarr_keeps_texts_written_after_the_last_rewrite(tmp_path):
    w = W.Zarr(tmp_path / "m.zarr")
    w.write_scalars(0, {"sharpness": 1.0})
    w.write_texts(5, {"reason/ftle": "later"})
    assert W.read_texts(tmp_path / "m.zarr") == {}  # not rewritten yet
    w.close()
    assert W.read_texts(tmp_path / "m.zarr") == {"reason/ftle": [(5, "later")]}


class CLULike(Recorder):
    """CLU's MetricWriter signatures: write_scalars and write_texts."""

    def __init__(self):
        super().__init__()
        self.texts = []

    def write_texts(self, step, mapping):
        self.texts.append((step, dict(mapping)))


def test_one_protocol_decides_which_writers_take_texts(tmp_path):
    assert W.takes_texts(CLULike()) and isinstance(CLULike(), W.TextWriter)
    assert not W.takes_texts(Recorder())  # write_scalars only: scalars only
    assert not W.takes_texts(W.Callback(lambda s, m: None))  # a plain callable: scalars only
    assert W.takes_texts(W.CSV(tmp_path / "a.csv")) and W.takes_texts(W.JSONL(tmp_path / "a.j"))
    rec, clu, calls = Recorder(), CLULike(), []
    ws = W.as_writers([rec, clu, lambda s, m: calls.append((s, m))])
    W.write_all(ws, 3, {"x": 1.0}, {"reason/x": "why"})
    assert rec.rows == [(3, {"x": 1.0})] == calls == clu.rows
    assert clu.texts == [(3, {"reason/x": "why"})]


def _texts(logdir):
    """(tag, step, text) of every text summary in the event files of ``logdir``."""
    return [
        (v.tag, step, v.tensor.string_val[0].decode())
        for step, v in _summary_values(logdir)
        if v.tensor.string_val
    ]


def test_tensorboard_writes_texts_as_text_summaries(tmp_path):
    pytest.importorskip("tensorboardX")
    _write_with_texts(W.TensorBoard(tmp_path / "tb"))
    got = _texts(tmp_path / "tb")
    assert len(got) == 1
    tag, step, text = got[0]
    assert tag.startswith("reason/critical_sharpness") and step == 0 and text == TEXT


def test_bad_writer_is_one_line():
    with pytest.raises(TypeError, match=r"^writer:"):
        W.as_writers([Recorder(), 3])
    with pytest.raises(ValueError, match=r"^flush_every:"):
        W.Zarr("x.zarr", flush_every=0)
