"""``chaosjax report`` on a monitor log (issue 26, item 4): a monitored loop writes a log; the
CLI renders the figures and a summary whose numbers the test recomputes from the log."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import chaosjax as cj
from chaosjax import probes as P
from chaosjax import writers as W
from chaosjax._monitor_report import find_monitor_log, read_monitor_log
from chaosjax.cli import main

RNG = np.random.default_rng(3)
X = jnp.asarray(RNG.normal(size=(48, 3)))
Y = jnp.asarray(RNG.normal(size=(48,)))


def _loss(p, b):
    h = jnp.tanh(b[0] @ p["w1"])
    return 0.5 * jnp.mean((h @ p["w2"] - b[1]) ** 2)


def _monitored_loop(writer, steps=48, eta=0.5):
    """SGD on minibatches of 12 with every probe the report reads; records every 2 steps."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = {"w1": jax.random.normal(k1, (3, 6)), "w2": jax.random.normal(k2, (6,)) * 0.3}
    tx = optax.sgd(eta)

    @jax.jit
    def step(state, batch):
        p, s = state
        g = jax.grad(_loss)(p, batch)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    mon = cj.Monitor(
        _loss,
        probes=[
            P.Sharpness(),
            P.BatchSharpness(n=4),
            P.CriticalSharpness(),
            P.GradientNorm(),
            P.Threshold(),
            P.FTLE(),
        ],
        every=2,
        writer=writer,
        params=lambda s: s[0],
        opt_state=lambda s: s[1],
        optimizer=tx,
        learning_rate=optax.linear_schedule(eta, eta / 2, steps),  # threshold 2/η_t moves
    )
    wrapped = mon.wrap(step)
    state = (params, tx.init(params))
    for t in range(steps):
        batch = (X[(t % 4) * 12 : (t % 4 + 1) * 12], Y[(t % 4) * 12 : (t % 4 + 1) * 12])
        state = wrapped(state, batch)
        mon(t, state, batch)
    mon.close()


def _row(text, label):
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {label}"))
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.fixture(scope="module")
def zarr_log(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    _monitored_loop(W.Zarr(folder / "monitor.zarr", flush_every=10))
    return folder


def test_report_on_a_zarr_monitor_log_writes_figures_and_a_recomputable_summary(zarr_log, capsys):
    assert main(["report", str(zarr_log)]) == 0
    assert "summary.md" in capsys.readouterr().out
    for name in ("sharpness.png", "ftle.png", "gradient_norm.png"):
        assert (zarr_log / "figures" / name).stat().st_size > 1000, name
    text = (zarr_log / "summary.md").read_text()
    # recompute from the log itself (writers.read_zarr), not through the report's reader
    cols = W.read_zarr(zarr_log / "monitor.zarr")
    steps = cols["sharpness"][0]
    n = len(steps)
    assert f"{n} records" in text and n == 24
    late = slice(n - (n - n // 2), n)
    for name, label in (
        ("sharpness", "λmax (sharpness)"),
        ("batch_sharpness", "batch sharpness"),
        ("critical_sharpness", "critical sharpness"),
    ):
        r = cols[name][1][late] / cols["threshold"][1][late]
        r = r[np.isfinite(r)]
        cells = _row(text, label)
        assert int(cells[2]) == r.size == 12
        frac = np.mean((r >= 0.9) & (r <= 1.1))
        assert float(cells[3]) == pytest.approx(frac, abs=5e-4)
        assert float(cells[4]) == pytest.approx(np.median(r), rel=1e-3)
        want = (
            "at the threshold"
            if frac >= 0.5
            else "above the threshold"
            if np.median(r) > 1.1
            else "below the threshold"
            if np.median(r) < 0.9
            else "scattered around the threshold"
        )
        assert cells[5] == want, (name, cells)
    # the value table: last and late median of the gradient norm
    g = cols["gradient_norm"][1]
    cells = _row(text, "`gradient_norm`")
    assert cells[1] == f"{n} / {n}"
    assert float(cells[3]) == pytest.approx(g[-1], rel=1e-3)
    assert float(cells[4]) == pytest.approx(np.median(g[late]), rel=1e-3)
    # FTLE windows: λ̄ weighted by the steps each record averages (ftle/matvecs for k = 1)
    lam, nsteps = cols["ftle"][1], cols["ftle/matvecs"][1]
    for window, w in (("early", slice(0, n // 2)), ("late", late)):
        ok = np.isfinite(lam[w]) & (nsteps[w] > 0)
        mean = np.sum(lam[w][ok] * nsteps[w][ok]) / np.sum(nsteps[w][ok])
        cells = _row(text, window)
        assert float(cells[3]) == pytest.approx(np.sum(nsteps[w][ok]))
        assert float(cells[4]) == pytest.approx(mean, rel=1e-3, abs=1e-6)
        growth = mean * np.sum(nsteps[w][ok])
        want = "positive" if growth >= 5 else "negative" if growth <= -5 else "not resolved from 0"
        assert cells[6] == want
    # a probe that was not run is NaN with its reason, never a number
    assert "| `preconditioned_sharpness` | 0 / 24 | NaN: not in the log" in text
    assert "NaN: `preconditioned_sharpness` is not in the log" in text
    assert "Rule: r = value / threshold" in text and "λ̄·T ≥ 5" in text


def test_report_reads_csv_and_jsonl_logs_the_same_as_zarr(tmp_path, zarr_log):
    _monitored_loop(
        [W.CSV(tmp_path / "c" / "monitor.csv"), W.JSONL(tmp_path / "j" / "monitor.jsonl")]
    )
    ref = read_monitor_log(zarr_log / "monitor.zarr")
    assert main(["report", str(zarr_log / "monitor.zarr")]) == 0  # a store given directly
    ref_text = (zarr_log / "summary.md").read_text()
    for sub, fname in (("c", "monitor.csv"), ("j", "monitor.jsonl")):
        assert find_monitor_log(tmp_path / sub) == tmp_path / sub / fname
        log = read_monitor_log(tmp_path / sub / fname)
        np.testing.assert_array_equal(log.steps, ref.steps)
        for k in ("sharpness", "threshold", "ftle", "batch_sharpness/stderr"):
            np.testing.assert_allclose(log.values[k], ref.values[k], rtol=1e-12, err_msg=k)
        assert main(["report", str(tmp_path / sub / fname)]) == 0
        summary = (tmp_path / sub / "summary.md").read_text()
        # same numbers as the zarr log's summary (the costs differ: seconds are per run)
        cut = lambda s: s.split("## Costs")[0].split("\n", 3)[3]  # noqa: E731
        assert cut(summary) == cut(ref_text)


def test_threshold_rule_without_a_learning_rate_is_nan_with_the_reason(tmp_path):
    w = W.CSV(tmp_path / "monitor.csv")
    for t in range(12):
        w.write_scalars(t, {"sharpness": 1.0 + t, "threshold": float("nan")})
    assert main(["report", str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert "NaN: no finite `threshold` in the log" in _row(text, "λmax (sharpness)")[5]
    assert "not drawn" in text and "ftle.png" in text  # absent figures say why
    assert (tmp_path / "figures" / "sharpness.png").exists()


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("chaosjax: error:") and "\n" not in err
    (tmp_path / "hollow").mkdir()
    (tmp_path / "hollow" / "monitor.csv").write_text("step,sharpness\n")
    assert main(["report", str(tmp_path / "hollow")]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no records" in err and "\n" not in err
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "\n" not in capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "ratios, loss, verdict",
    [
        (np.r_[np.full(6, 1.0), np.full(4, 0.5)], None, "at the threshold"),  # 6 of 10 in band
        (np.r_[np.full(4, 1.0), np.full(6, 1.5)], None, "above the threshold"),
        (np.r_[np.full(4, 1.0), np.full(6, 0.5)], None, "below the threshold"),
        (
            np.r_[np.full(4, 0.85), np.full(2, 1.0), np.full(4, 1.15)],
            None,
            "scattered around the threshold",
        ),
        (np.full(10, 1e-3), np.full(10, 0.3), "flat plateau"),  # sharpness ≈ 0, loss stalled
        (np.full(10, 1e-3), np.linspace(0.3, 0.1, 10), "below the threshold"),  # loss still moves
    ],
)
def test_threshold_verdicts_follow_the_stated_rule(tmp_path, ratios, loss, verdict):
    from chaosjax._monitor_report import threshold_rule

    w = W.JSONL(tmp_path / "monitor.jsonl")
    eta = np.linspace(0.1, 0.05, 20)  # a schedule: the ratio uses 2/η_t of its own record
    early = np.full(10, 5.0)  # the early half does not count
    values = np.r_[early, ratios] * 2 / eta
    for t in range(20):
        row = {"sharpness": values[t], "threshold": 2 / eta[t]}
        if loss is not None:
            row["gradient_norm/loss"] = float(np.r_[np.full(10, 1.0), loss][t])
        w.write_scalars(t, row)
    res = threshold_rule(read_monitor_log(tmp_path / "monitor.jsonl"), "sharpness")
    assert res["verdict"] == verdict and res["n"] == 10 and res["reason"] == ""
    np.testing.assert_allclose(res["median"], np.median(ratios), rtol=1e-12)
    # fewer than 10 finite ratios in the late window: no verdict, with the reason
    w.write_scalars(20, {"sharpness": float("nan"), "threshold": 1.0})
    w.write_scalars(21, {"sharpness": float("nan"), "threshold": 1.0})
    res = threshold_rule(read_monitor_log(tmp_path / "monitor.jsonl"), "sharpness")
    assert res["verdict"] == "n/a" and "fewer than 10" in res["reason"]


def test_summary_shows_the_logged_reason_where_a_column_is_nan(tmp_path):
    tx = optax.sgd(0.2)  # η_t unknown to the monitor: critical sharpness NaN with its reason
    params = {"w1": jnp.ones((3, 6)) * 0.1, "w2": jnp.ones((6,)) * 0.1}
    logs = {
        "csv": tmp_path / "c" / "monitor.csv",
        "jsonl": tmp_path / "j" / "monitor.jsonl",
        "zarr": tmp_path / "z" / "monitor.zarr",
    }
    mon = cj.Monitor(
        _loss,
        probes=[P.Sharpness(), P.CriticalSharpness(), P.FTLE()],  # FTLE without wrap
        every=2,
        writer=[W.CSV(logs["csv"]), W.JSONL(logs["jsonl"]), W.Zarr(logs["zarr"])],
        params=lambda s: s[0],
        opt_state=lambda s: s[1],
        optimizer=tx,
    )
    state = (params, tx.init(params))
    with pytest.warns(UserWarning):
        for t in range(24):
            mon(t, state, (X[:12], Y[:12]))
    mon.close()
    for kind, path in logs.items():
        log = read_monitor_log(path)
        assert len(log.steps) == 12, kind  # a row of texts is no record
        assert log.reason("critical_sharpness/step_scale") == mon.reasons["critical_sharpness"]
        assert main(["report", str(path)]) == 0
        text = (path.parent / "summary.md").read_text()
        for probe in ("critical_sharpness", "ftle"):
            why = mon.reasons[probe]
            cells = _row(text, f"`{probe}`")
            assert cells[1] == "0 / 12" and cells[2] == f"NaN: every record NaN: {why}", kind
            assert _row(text, f"`{probe}` | 0 |")[2] == why  # the reasons table: step 0
        assert "wrap" in _row(text, "early")[6]  # the FTLE window says why it has no records
