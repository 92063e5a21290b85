"""Your model, data, optimizer and train step from a config (``[model] factory``, ``[data]
path``, ``[optimizer] factory``, ``[step] factory``): every stage of ``chaosjax run`` on
them, and one exit-2 line naming the field for each bad case."""

import textwrap

import numpy as np
import pytest

from chaosjax.cli import main
from chaosjax.results import ReplicaResults

USER_MODULE = textwrap.dedent(
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx


    class Net(nnx.Module):
        def __init__(self, n_in, n_out, rngs, dtype):
            self.l1 = nnx.Linear(n_in, 6, rngs=rngs, param_dtype=dtype, dtype=dtype)
            self.bn = nnx.BatchNorm(6, rngs=rngs, param_dtype=dtype, dtype=dtype)
            self.l2 = nnx.Linear(6, n_out, rngs=rngs, param_dtype=dtype, dtype=dtype)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.bn(self.l1(x))))


    def make_model(rngs, n_features, n_outputs, dtype):
        return Net(n_features, n_outputs, rngs, dtype)


    def make_apply(key, n_features, n_outputs):
        k1, k2 = jax.random.split(key)
        params = {
            "w1": jax.random.normal(k1, (n_features, 5)) / jnp.sqrt(n_features),
            "w2": jax.random.normal(k2, (5, n_outputs)) / jnp.sqrt(5.0),
        }
        return (lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]), params


    def make_tx(learning_rate, steps):
        schedule = optax.cosine_decay_schedule(learning_rate, steps)
        return optax.chain(optax.clip_by_global_norm(10.0), optax.adamw(schedule, eps_root=0.0))


    def make_step(dataset, key, learning_rate):
        x = jnp.asarray(dataset.x_train, jnp.float64)
        y = jnp.asarray(dataset.y_train)
        params = {"w": 0.3 * jax.random.normal(key, (x.shape[1], dataset.n_outputs))}
        tx = optax.sgd(learning_rate, momentum=0.9)

        def loss_fn(p, batch):
            xb, yb = batch
            return optax.softmax_cross_entropy_with_integer_labels(xb @ p["w"], yb).mean()

        def train_step(state, batch):
            p, o = state["params"], state["opt"]
            loss, g = jax.value_and_grad(loss_fn)(p, batch)
            u, o = tx.update(g, o, p)
            acc = jnp.mean(jnp.argmax(batch[0] @ p["w"], -1) == batch[1])
            return {"params": optax.apply_updates(p, u), "opt": o}, {"loss": loss, "accuracy": acc}

        def batch_fn(t, data):
            idx = jax.random.choice(jax.random.fold_in(jax.random.key(1), t), x.shape[0], (16,))
            return x[idx], y[idx]

        return {
            "train_step": train_step,
            "state": {"params": params, "opt": tx.init(params)},
            "batch_fn": batch_fn,
            "loss_fn": loss_fn,
            "optimizer_kind": "momentum",
            "hparams": {"momentum": 0.9},
            "learning_rate": learning_rate,
        }


    def make_step_without_loss(dataset, key, learning_rate):
        out = make_step(dataset, key, learning_rate)
        del out["loss_fn"]
        return out


    def not_a_model(rngs):
        return 3


    def needs_more(rngs, width):
        return None


    def broken(rngs):
        raise RuntimeError("boom")
    """
)

SMALL = [
    *("--set", "steps=40", "--set", "record_every=10", "--set", "chunk_steps=20"),
    *("--set", "clv.align=10", "--set", "clv.steps=20", "--set", "clv.backward_transient=10"),
    *("--set", "replicas.seeds=[0,1]", "--set", "replicas.n_perturbed=1"),
    *("--set", "data.n_samples=40", "--set", "lyapunov.k=2"),
    *("--set", "curvature.k=1", "--set", "curvature.cold_matvecs=8"),
    *("--set", "curvature.trace_probes=0", "--set", "curvature.density_matvecs=0"),
]


@pytest.fixture()
def user_file(tmp_path, monkeypatch):
    path = tmp_path / "my_model.py"
    path.write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    return path


def _run(tmp_path, *sets, name="run"):
    out = tmp_path / name
    argv = ["run", "--out", str(out), "--quiet", *SMALL]
    for s in sets:
        argv += ["--set", s]
    return main(argv), out


@pytest.mark.parametrize(
    "sets",
    [
        ["model.factory='./my_model.py:make_model'", "training.learning_rates=[0.1, 0.5]"],
        [
            "model.factory='./my_model.py:make_apply'",
            "data.name='iris'",
            "training.learning_rates=[0.1]",
            # the CLV and landscape stages on a user's model: run by the nnx-batchnorm case
            "clv.enabled=false",
            "landscape.enabled=false",
        ],
        pytest.param(
            [
                "model.factory='./my_model.py:make_model'",
                "optimizer.factory='./my_model.py:make_tx'",
                "optimizer.kind='adamw'",
                "training.learning_rates=[0.01, 0.03]",
                "training.loss='cross_entropy'",
                "clv.enabled=false",
                "landscape.enabled=false",
            ],
            # a user's optax factory with eps_root = 0 through the map: also in
            # tests/test_your_training.py; this CLI run of every stage is 50 s on 2 cores
            marks=pytest.mark.slow,
        ),
    ],
    ids=["nnx-batchnorm", "apply-params", "optimizer-factory"],
)
def test_user_model_and_optimizer_run_every_stage(tmp_path, user_file, sets):
    rc, out = _run(tmp_path, *sets)
    assert rc == 0
    res = ReplicaResults.load(out / "results.zarr")
    lrs = next(x for x in sets if x.startswith("training.learning_rates="))
    n_lr = lrs.count(",") + 1
    assert res.records["loss"].shape == (2 * n_lr * 2, 5)
    assert np.all(np.isfinite(res.records["loss"]))
    assert np.isfinite(res.records["ftle"]).any()
    refs = res.coords["member"] == 0  # curvature is tracked on the reference runs
    assert np.isfinite(res.records["sharpness"][refs, -1]).all()
    text = (out / "summary.md").read_text()
    assert "Lyapunov" in text and "sharpness" in text.lower()
    # independent seeds are independent initialisations of your factory
    x = res.final_state
    assert not np.allclose(x[0], x[res.coords["seed"].tolist().index(1)])


def test_user_step_and_npz_data_run_every_stage(tmp_path, user_file):
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(50, 4))
    ys = (xs[:, 0] + xs[:, 1] > 0).astype(np.int32)
    np.savez(
        tmp_path / "data.npz", x_train=xs[:40], y_train=ys[:40], x_test=xs[40:], y_test=ys[40:]
    )
    rc, out = _run(
        tmp_path, "step.factory='./my_model.py:make_step'", "data.path='data.npz'",
        "training.learning_rates=[0.2]",
        # CLVs and landscapes of a user's step: tests/test_your_training.py and test_landscape.py
        "clv.enabled=false", "landscape.enabled=false",
    )  # fmt: skip
    assert rc == 0
    res = ReplicaResults.load(out / "results.zarr")
    assert np.isfinite(res.records["loss"]).all()  # loss_fn on eval_batch
    acc = res.records["accuracy"]  # the step's own metric, NaN before its first step
    assert np.isnan(acc[:, 0]).all() and np.isfinite(acc[:, 1:]).all()
    assert np.isfinite(res.records["ftle"]).any()
    refs = res.coords["member"] == 0
    assert np.isfinite(res.records["sharpness"][refs, -1]).all()
    assert np.isfinite(res.records["threshold"][refs, -1]).all()  # optimizer_kind momentum


@pytest.mark.parametrize(
    "sets,expect",
    [
        (["model.factory='nope_module_xyz:make'"], "model.factory: cannot import module"),
        (["model.factory='./my_model.py:missing'"], "model.factory: './my_model.py' has no"),
        (["model.factory='./absent.py:make'"], "model.factory: no such file"),
        (["model.factory='my_model'"], "model.factory: expected 'package.module:function'"),
        (["model.factory='./my_model.py:not_a_model'"], "returned int; expected an nnx.Module"),
        (["model.factory='./my_model.py:needs_more'"], "needs argument 'width'"),
        (["model.factory='./my_model.py:broken'"], "broken() failed (RuntimeError: boom)"),
        (["optimizer.factory='./my_model.py:make_model'"], "optimizer.factory: make_model()"),
        (["step.factory='./my_model.py:make_model'"], "step.factory: make_model()"),
        (["data.path='missing.npz'"], "data.path: no such file"),
        (["data.path='bad.npz'"], "data.path: bad.npz lacks y_train"),
        (
            ["optimizer.factory='./my_model.py:make_tx'", "control.enabled=true"],
            "control.enabled: the controllers drive a registry optimizer",
        ),
        (
            ["step.factory='./my_model.py:make_step'", "model.factory='./my_model.py:make_model'"],
            "model.factory: a step.factory brings its own model",
        ),
        (["optimizer.kind='lion'"], "optimizer.kind: unknown 'lion'"),
        (
            [
                "step.factory='./my_model.py:make_step_without_loss'",
                "data.name='iris'",
                "training.learning_rates=[0.2]",
            ],
            "curvature.enabled: the Hessian needs loss_fn",
        ),
    ],
)
def test_bad_factories_are_one_line_exit_2_and_leave_no_folder(
    tmp_path, user_file, capsys, sets, expect
):
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((4, 2)))
    rc, out = _run(tmp_path, *sets)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and expect in err, err
    assert not out.exists()


def test_config_fields_lists_the_factories(capsys):
    assert main(["config", "--fields"]) == 0
    text = capsys.readouterr().out
    for key in (
        "model.factory",
        "optimizer.factory",
        "optimizer.kind",
        "step.factory",
        "data.path",
    ):
        assert key in text
