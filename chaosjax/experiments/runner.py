"""Config → run folder: ``config.toml``, ``results.zarr``, ``summary.md``, ``figures/*.png``.

A run writes its resolved config first, streams records into ``results.zarr`` and a
checkpoint after every chunk, and at the end rewrites the store atomically and removes the
checkpoint. ``resume=True`` continues an interrupted run (same config) to the same arrays;
``report`` re-renders the summary and figures from the stored results alone.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from chaosjax._util import atomic_write_text, fmt
from chaosjax.experiments.config import ConfigError, ExperimentConfig, to_toml
from chaosjax.experiments.stats import seeds_cell
from chaosjax.sharding import is_main_process, parse_bytes, process_path, replica_mesh

CHECKPOINT = "checkpoint.npz"
STAGE_CHECKPOINTS = ("control_sharpness_checkpoint.npz", "control_ftle_checkpoint.npz")
STORE = "results.zarr"


class RunFolderError(ValueError):
    """The output folder cannot be used as asked (exists, not a run, config differs)."""


@dataclass
class Run:
    """A finished run: its folder and results."""

    folder: Path
    config: ExperimentConfig
    results: object

    @property
    def summary(self) -> Path:
        return self.folder / "summary.md"


def set_precision(precision: str) -> None:
    import jax

    if precision == "float64":
        jax.config.update("jax_enable_x64", True)


def build_dataset(cfg: ExperimentConfig):
    from chaosjax import datasets

    d = cfg.data
    if d.path:
        try:
            return datasets.Dataset.from_npz(d.path)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
        except (ValueError, TypeError) as e:
            msg = str(e).splitlines()[0]
            raise ConfigError(msg if msg.startswith("data.path") else f"data.path: {msg}") from None
    common = {"seed": d.seed}
    if d.name == "iris":
        ds = datasets.iris(standardize=d.standardize, **common)
    elif d.name == "digits":
        ds = datasets.digits(standardize=d.standardize, test_fraction=d.test_fraction, **common)
    elif d.name == "chebyshev":
        ds = datasets.chebyshev(d.chebyshev_k, d.n_points)
    elif d.name == "modular_addition":
        if not 0.0 < d.test_fraction < 1.0:
            raise ConfigError(
                f"data.test_fraction: modular_addition needs a value in (0, 1), got {d.test_fraction}"
            )
        ds = datasets.modular_addition(d.modulus, train_fraction=1.0 - d.test_fraction, **common)
    elif d.name == "teacher_student":
        ds = datasets.teacher_student(
            d.n_samples, noise=d.noise, test_fraction=d.test_fraction, **common
        )
    elif d.name in ("two_moons", "circles", "blobs"):
        kw = {"noise": d.noise} if d.name != "blobs" else {}
        ds = datasets.load(
            d.name,
            n=d.n_samples,
            test_fraction=d.test_fraction,
            standardize=d.standardize,
            **kw,
            **common,
        )
    else:  # pragma: no cover - validated by the config
        raise ConfigError(f"data.name: unknown {d.name!r}")
    return ds


def _model_factory(cfg: ExperimentConfig, ds, dtype):
    """``factory(rngs) -> nnx.Module`` of a built-in ``model.kind``."""
    from chaosjax import models

    m = cfg.model
    n_out = ds.n_outputs
    token_ids = np.issubdtype(ds.x_train.dtype, np.integer)
    if token_ids != (m.kind == "transformer"):
        raise ConfigError(
            f"model.kind: {m.kind!r} does not fit {ds.name}'s inputs ("
            + ("integer token ids: use 'transformer'" if token_ids else "float features")
            + ")"
        )
    if m.kind == "mlp":
        widths = (ds.n_features, *m.hidden, n_out)

        def per_layer(values, name):
            n = len(widths) - 1
            if len(values) == 1:
                return values[0]
            if len(values) != n:
                raise ConfigError(
                    f"{name}: give one value or one per layer ({n}), got {list(values)}"
                )
            return tuple(values)

        init = per_layer(m.init, "model.init")
        init_scale = per_layer(m.init_scale, "model.init_scale")

        def factory(rngs):
            return models.MLP(
                widths,
                activation=m.activation,
                init=init,
                init_scale=init_scale,
                bias=m.bias,
                output_bias=m.output_bias,
                output_activation=m.output_activation,
                rngs=rngs,
                dtype=dtype,
            )

        return factory
    if m.kind == "transformer":
        if len(ds.input_shape) != 1:
            raise ConfigError(
                f"model.kind: 'transformer' needs token sequences (n, length), {ds.name} has "
                f"inputs of shape {ds.input_shape}"
            )
        if m.d_model % m.n_heads:
            raise ConfigError(f"model.n_heads: must divide d_model={m.d_model}, got {m.n_heads}")
        vocab = int(max(ds.x_train.max(), ds.x_test.max() if ds.has_test else 0)) + 1

        def factory(rngs):
            return models.Transformer(
                vocab,
                ds.input_shape[0],
                n_out,
                d_model=m.d_model,
                n_heads=m.n_heads,
                layers=m.layers,
                causal=m.causal,
                dropout=m.dropout,
                rngs=rngs,
                dtype=dtype,
            )

        return factory
    shape = ds.input_shape
    if len(shape) != 3:
        side = round(np.sqrt(ds.n_features))
        if side * side != ds.n_features:
            raise ConfigError(
                f"model.kind: {m.kind!r} needs images (n, H, W, C) or square single-channel "
                f"rows; {ds.name} has {ds.n_features} features"
            )
        shape = (side, side, 1)
    if m.kind == "cnn":

        def factory(rngs):
            return models.CNN(
                shape, n_out, channels=m.hidden, activation=m.activation, rngs=rngs, dtype=dtype
            )

        return factory

    def factory(rngs):
        return models.ResNet(
            shape,
            n_out,
            width=m.width,
            depth=m.depth,
            blocks_per_stage=m.blocks_per_stage,
            batch_norm=m.batch_norm,
            activation=m.activation,
            rngs=rngs,
            dtype=dtype,
        )

    return factory


def _step_map(cfg: ExperimentConfig, ds, dtype):
    """The :class:`~chaosjax.StepMap` of ``step.factory``."""
    import jax

    from chaosjax.experiments import factories
    from chaosjax.training import TrainingMap

    fn = factories.load_reference(cfg.step.factory, "step.factory")
    t = cfg.training
    data = {"x_train": ds.x_train, "y_train": ds.y_train, "x_test": ds.x_test, "y_test": ds.y_test}

    def offer(key):
        return {
            "dataset": ds,
            "dtype": dtype,
            "key": key,
            "learning_rate": t.learning_rates[0],
            "steps": cfg.steps,
        }

    out = factories.user_step(fn, offer(jax.random.PRNGKey(cfg.replicas.seeds[0])))
    if not isinstance(out, dict):
        return out
    kwargs = {"data": data, "dtype": dtype, "name": cfg.name, **out}
    if "init_fn" not in kwargs:

        def init_fn(key):
            return factories.user_step(fn, offer(key))["state"]

        kwargs["init_fn"] = init_fn
    train_step, state = kwargs.pop("train_step"), kwargs.pop("state")
    try:
        return TrainingMap.from_step(train_step, state, **kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"step.factory: {str(e).splitlines()[0]}") from e


def build_training_map(cfg: ExperimentConfig, ds=None, *, controller: str | None = None):
    """The :class:`TrainingMap` of a config (learning rate = the first grid value).

    ``model.factory``, ``optimizer.factory`` and ``step.factory`` bring your own model,
    optax transformation or train step (:mod:`chaosjax.experiments.factories`).
    ``controller="sharpness"`` or ``"ftle"``: the same network, data and seeds with the
    optimizer driven by :func:`chaosjax.control.sharpness_margin` / :func:`~chaosjax.control.ftle_target`
    (settings from ``[control]``; hyper-parameter ``margin`` / ``target``, vmappable)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from chaosjax.experiments import factories
    from chaosjax.optimizers import OPTIMIZERS
    from chaosjax.training import TrainingMap

    ds = ds if ds is not None else build_dataset(cfg)
    dtype = jnp.float64 if cfg.precision == "float64" else jnp.float32
    if cfg.step.factory:
        return _step_map(cfg, ds, dtype)
    t = cfg.training
    key0 = jax.random.PRNGKey(cfg.replicas.seeds[0])
    if cfg.model.factory:
        user_fn = factories.load_reference(cfg.model.factory, "model.factory")
        kind, model = factories.user_model(user_fn, ds, dtype, key0)
        factory = None  # independent seeds call the factory with their key (init_fn below)
    else:
        factory = _model_factory(cfg, ds, dtype)
        kind, model = "nnx", factory(nnx.Rngs(key0))

    spec = OPTIMIZERS[t.optimizer]
    hparams = {k: getattr(t, k) for k in spec.defaults if k in _TRAINING_HPARAMS}
    schedule_options = {}
    if t.schedule == "step":
        if not t.drop_steps:
            raise ConfigError("training.drop_steps: a 'step' schedule needs at least one drop step")
        schedule_options = {"boundaries": list(t.drop_steps), "factor": t.drop_factor}
    elif t.schedule == "cosine":
        schedule_options = {"decay_steps": cfg.steps}
    optimizer, lr, name, schedule = t.optimizer, t.learning_rates[0], cfg.name, t.schedule
    kind_kw = {}
    if controller is not None:
        optimizer, hparams, lr = _controller(cfg, controller, hparams)
        schedule, schedule_options, name = "constant", {}, f"{cfg.name}/{controller}"
    elif cfg.optimizer.factory:
        user_tx = factories.load_reference(cfg.optimizer.factory, "optimizer.factory")
        optimizer, takes_lr = factories.user_optimizer(user_tx, cfg.steps)
        if not takes_lr:
            if len(t.learning_rates) > 1:
                raise ConfigError(
                    "training.learning_rates: a grid needs optimizer.factory to take "
                    "learning_rate; give one value"
                )
            lr = None
        hparams, schedule, schedule_options = {}, "constant", {}
        kind_kw = {"optimizer_kind": cfg.optimizer.kind or None}
    common = {
        "loss": t.loss,
        "optimizer": optimizer,
        "learning_rate": lr,
        "hparams": hparams,
        "schedule": schedule,
        "schedule_options": schedule_options,
        "batch_size": t.batch_size or None,
        "batch_seed": t.batch_seed,
        "dtype": dtype,
        "name": name,
        **kind_kw,
    }
    try:
        if kind == "nnx" and factory is not None:
            return TrainingMap.from_nnx(model, ds, model_factory=factory, **common)
        if kind == "nnx":
            from chaosjax import nnx_adapter

            def init_fn(key):
                fresh = factories.user_model(user_fn, ds, dtype, key)[1]
                return nnx_adapter.init_params(lambda _: fresh, dtype, key)

            return TrainingMap.from_nnx(model, ds, init_fn=init_fn, **common)

        def init_fn(key):
            return factories.user_model(user_fn, ds, dtype, key)[1][1]

        return TrainingMap(model[0], model[1], ds, init_fn=init_fn, **common)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        if not (cfg.model.factory or cfg.optimizer.factory):
            raise
        field = "model.factory" if cfg.model.factory else "optimizer.factory"
        raise ConfigError(f"{field}: {str(e).splitlines()[0]}") from e


# registry hyper-parameters the [training] section sets
_TRAINING_HPARAMS = ("momentum", "weight_decay", "b1", "b2")


def _controller(cfg: ExperimentConfig, kind: str, base_hparams: dict):
    """(optimizer factory, hyper-parameters, initial η) of a controlled run."""
    import functools

    from chaosjax import control

    c, t = cfg.control, cfg.training
    lr = c.initial_lr or min(t.learning_rates)
    common = {"optimizer": t.optimizer, "max_change": c.max_change}
    if kind == "sharpness":
        factory = functools.partial(
            control.sharpness_margin, every=c.every, smoothing=c.smoothing, **common
        )
        first = {"margin": (c.margins or [1.0])[0]}
    elif kind == "ftle":
        factory = functools.partial(
            control.ftle_target, window=c.ftle_window, gain=c.ftle_gain, **common
        )
        first = {"target": (c.ftle_targets or [0.0])[0]}
    else:
        raise ValueError(f"controller: unknown {kind!r}; allowed: sharpness, ftle")
    return factory, {**base_hparams, **first}, lr


def protocol_stages(cfg, tmap, batch, results, groups, progress, folder=None) -> dict:
    """The optional protocol stages of the seed studies (see ``experiments.protocols``)."""
    from chaosjax.experiments import protocols as pr

    out = {}
    if cfg.series.enabled:
        out["series"] = pr.series_stage(cfg, batch, results)
    if cfg.divergence.enabled:
        out["divergence"] = pr.divergence_stage(cfg, batch, results)
    if cfg.marginal.enabled:
        out["marginal"] = pr.marginal_stage(cfg, tmap, batch, results, progress)
    if cfg.target.test_accuracy > 0:
        out["target"] = pr.target_stage(cfg, batch, results)
    if cfg.prediction.enabled:
        out["prediction"] = pr.prediction_stage(cfg, batch, results, groups["lyapunov"])
    if cfg.response.enabled:
        out["response"] = pr.response_stage(cfg, tmap, batch, results)
    if cfg.instability.enabled:
        out["instability"] = pr.instability_stage(cfg, batch, results, groups["lyapunov"])
    if cfg.grokking.enabled:
        out["grokking"] = pr.grokking_stage(cfg, batch, results, groups.get("lyapunov"))
    if cfg.landscape.enabled:
        from chaosjax.experiments.landscapes import landscape_stage

        out["landscape"] = landscape_stage(cfg, tmap, batch, results)
    if cfg.control.enabled:
        from chaosjax.experiments import controlled

        out["control"] = controlled.control_stage(cfg, tmap, batch, results, folder, progress)
    return out


def _prepare_shared(folder: Path, cfg_text: str, resume: bool, force: bool) -> bool:
    """:func:`_prepare_folder` on process 0; with several processes the others wait for its
    answer (they write only their own checkpoints into the folder)."""
    if jax.process_count() == 1:
        return _prepare_folder(folder, cfg_text, resume, force)
    from jax.experimental import multihost_utils

    code, error = 0, None
    if is_main_process():
        try:
            code = int(_prepare_folder(folder, cfg_text, resume, force))
        except RunFolderError as e:
            code, error = -1, e
    code = int(multihost_utils.broadcast_one_to_all(np.int32(code)))
    if error is not None:
        raise error
    if code < 0:
        raise RunFolderError(f"--out: process 0 refused the run folder {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    return bool(code)


def _prepare_folder(folder: Path, cfg_text: str, resume: bool, force: bool) -> bool:
    """Returns True when an earlier run is to be continued."""
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--out: {folder} exists and is not a folder")
    busy = folder.exists() and any(folder.iterdir())
    if not busy:
        folder.mkdir(parents=True, exist_ok=True)
        return False
    if resume:
        old = folder / "config.toml"
        if not old.exists():
            raise RunFolderError(f"--resume: {folder} holds no chaosjax run (no config.toml)")
        if old.read_text() != cfg_text:
            raise RunFolderError(
                f"--resume: the config differs from the one stored in {old}; resume with the same "
                "preset and --set values, or use --force to start afresh"
            )
        return True
    if force:
        if not (folder / "config.toml").exists() and any(folder.iterdir()):
            raise RunFolderError(
                f"--force: {folder} is not empty and holds no chaosjax run; refusing to delete it"
            )
        shutil.rmtree(folder)
        folder.mkdir(parents=True)
        return False
    raise RunFolderError(
        f"--out: {folder} already exists; use --force to overwrite it or --resume to continue"
    )


def run_observables(tmap) -> tuple[list[str], dict]:
    """(named observables, custom observables) a run records for its map: the losses,
    accuracies, norms and distances; a step map's own metrics as ``metric_<name>`` (its
    ``loss`` metric is the loss record when it has no ``loss_fn``)."""
    from chaosjax.stepmap import StepMap

    observables = ["param_norm", "layer_norm", "distance_l1", "distance_l2", "layer_distance"]
    custom = {}
    if not isinstance(tmap, StepMap):
        observables = ["loss", "test_loss", *observables]
        if tmap.task == "classification":
            observables += ["accuracy", "test_accuracy"]
        return observables, custom
    custom = tmap.metric_observables()
    if tmap._loss_fn is not None:
        observables = [
            "loss",
            *(["test_loss"] if tmap.test_batch is not None else []),
            *observables,
        ]
    elif "metric_loss" in custom:
        custom["loss"] = custom.pop("metric_loss")
    else:
        raise ConfigError(
            "step.factory: the report needs a loss: return loss_fn(params, batch) or a 'loss' "
            "metric from train_step"
        )
    for name in ("accuracy", "test_accuracy"):
        if f"metric_{name}" in custom:
            custom[name] = custom.pop(f"metric_{name}")
    return observables, custom


def run_experiment(
    cfg: ExperimentConfig,
    folder: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    on_chunk=None,
    announce=None,
) -> Run:
    """Run ``cfg`` into ``folder`` and write the results, summary and figures."""
    from chaosjax.replicas import make_replicas, run_replicas
    from chaosjax.results import ReplicaResults, open_store

    folder = Path(folder)
    cfg_text = to_toml(cfg)
    set_precision(cfg.precision)
    tmap = build_training_map(cfg)  # validates model/data choices before touching the folder
    if cfg.control.enabled:
        from chaosjax.experiments.controlled import validate

        validate(cfg)
    for section in ("lyapunov", "clv"):
        sub = getattr(cfg, section)
        if sub.enabled and sub.k > tmap.dim:
            raise ConfigError(
                f"{section}.k: must be <= the state dimension {tmap.dim}, got {sub.k}"
            )
    if cfg.grokking.enabled and (
        tmap.task != "classification" or int(tmap.data["x_test"].shape[0]) == 0
    ):
        raise ConfigError(
            "grokking.enabled: needs a classification dataset with a test split (the jump in "
            "test accuracy)"
        )
    if cfg.grokking.enabled and cfg.grokking.layer and cfg.grokking.layer not in tmap.layers:
        raise ConfigError(
            f"grokking.layer: unknown {cfg.grokking.layer!r}; allowed: {', '.join(tmap.layers)}"
        )
    if "learning_rate" not in tmap.hparams and len(cfg.training.learning_rates) > 1:
        raise ConfigError(
            "training.learning_rates: this map takes no learning_rate hyper-parameter (your "
            "optimizer or train step sets it); give one value"
        )
    run_observables(tmap)
    for section in ("curvature", "landscape"):
        if getattr(cfg, section).enabled and not getattr(tmap, "_loss_fn", True):
            raise ConfigError(
                f"{section}.enabled: the Hessian needs loss_fn(params, batch) from "
                f"step.factory; return it or set {section}.enabled = false"
            )
    replica_mesh(cfg.scale.devices or None)  # device and memory fields, before the folder
    try:
        parse_bytes(cfg.scale.memory_limit or None)
    except ValueError as e:
        raise ConfigError(f"scale.{e}") from None
    continuing = _prepare_shared(folder, cfg_text, resume, force)
    main = is_main_process()
    store = folder / STORE
    if continuing and not (folder / CHECKPOINT).exists() and store.exists():
        ds = open_store(store)
        if int(ds.attrs.get("complete", 0)) == 1:
            results = ReplicaResults.from_xarray(ds)
            if main:
                report(folder)
            return Run(folder, cfg, results)
    if main:
        atomic_write_text(folder / "config.toml", cfg_text)
    if announce is not None and main:
        announce(f"chaosjax: running {cfg.name!r} into {folder}")
    t_start = time.perf_counter()
    r = cfg.replicas
    lrs = list(cfg.training.learning_rates)
    batch = make_replicas(
        tmap,
        seeds=list(r.seeds),
        grid={"learning_rate": lrs} if "learning_rate" in tmap.hparams else None,
        n_perturbed=r.n_perturbed,
        eps=list(r.eps),
        distribution=r.distribution,
        target=r.target,
    )
    if "learning_rate" not in batch.coords:  # your optimizer or step sets η: the label
        batch.coords["learning_rate"] = np.full(len(batch.coords["seed"]), float(lrs[0]))
    observables, custom = run_observables(tmap)
    trackers = []
    if cfg.response.enabled:
        from chaosjax.response import ResponseTracker

        n_probes = min(cfg.response.n_probes, int(tmap.data["x_train"].shape[0]))
        trackers.append(ResponseTracker(n_probes=n_probes, rows="references"))
    if cfg.curvature.enabled:
        from chaosjax.experiments.analyses import curvature_tracker

        trackers.append(curvature_tracker(cfg))
    from chaosjax.experiments.analyses import tangent_tracker

    tangents = tangent_tracker(cfg)
    if tangents is not None:
        trackers.append(tangents)
    if cfg.marginal.enabled:
        from chaosjax.experiments.protocols import marginal_snapshots

        trackers.append(marginal_snapshots(cfg))
    if cfg.landscape.enabled:
        from chaosjax.experiments.landscapes import landscape_snapshots

        trackers.append(landscape_snapshots(cfg))
    results = run_replicas(
        tmap,
        batch,
        trackers=trackers,
        steps=cfg.steps,
        record_every=cfg.record_every,
        observables=observables,
        custom_observables=custom,
        distance_every=r.distance_every,
        chunk_steps=max(cfg.record_every, cfg.chunk_steps - cfg.chunk_steps % cfg.record_every),
        loss_bound=r.loss_bound,
        progress=progress,
        checkpoint=folder / CHECKPOINT,
        store=store,
        resume=continuing,
        attrs={"config": cfg_text, "n_params": tmap.n_params, "dim": tmap.dim},
        on_chunk=on_chunk,
        devices=cfg.scale.devices or None,
        memory_limit=cfg.scale.memory_limit or None,
    )
    groups = {}
    if cfg.curvature.enabled:
        from chaosjax.experiments.analyses import curvature_stage

        groups["curvature"] = curvature_stage(cfg, tmap, batch, results)
    if cfg.lyapunov.enabled:
        from chaosjax.experiments.analyses import lyapunov_stage

        groups["lyapunov"] = lyapunov_stage(cfg, tmap, batch, results)
    if cfg.clv.enabled:
        from chaosjax.experiments.analyses import clv_stage

        groups["clv"] = clv_stage(cfg, tmap, batch, results)
    groups.update(protocol_stages(cfg, tmap, batch, results, groups, progress, folder))
    results.attrs["total_time_s"] = time.perf_counter() - t_start
    if main:
        results.save(store, groups=groups)
    for name in (CHECKPOINT, *STAGE_CHECKPOINTS):
        process_path(folder / name).unlink(missing_ok=True)
    if main:
        report(folder)
    return Run(folder, cfg, results)


# ---------------------------------------------------------------------------------------------
# report


def summary_rows(results) -> list[dict]:
    """Per learning rate: final losses and accuracies of the reference replicas (one per seed),
    the separation d(T)/d(0) of perturbed replicas (mean log growth) and how many seeds
    (reference replicas) and replicas diverged."""
    rows = []
    lrs = results.coords.get("learning_rate")
    member = results.coords.get("member")
    for lr in np.unique(lrs):
        sel = lrs == lr
        ref = sel & (member == 0)
        pert = sel & (member > 0)
        row = {"learning_rate": float(lr), "replicas": int(sel.sum()), "seeds": int(ref.sum())}
        for k in ("loss", "test_loss", "accuracy", "test_accuracy"):
            if k in results.records:
                row[k] = results.records[k][ref, -1]
        if "distance_l1" in results.records and pert.any():
            d = results.records["distance_l1"][pert]
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.log(d[:, -1]) - np.log(d[:, 0])
            ok = np.isfinite(ratio)
            row["log_growth"] = float(np.mean(ratio[ok])) if ok.any() else float("nan")
        row["diverged_seeds"] = int(results.diverged[ref].sum())
        row["diverged"] = int(results.diverged[sel].sum())
        rows.append(row)
    return rows


def render_summary(results, cfg_text: str) -> str:
    attrs = results.attrs
    env = attrs.get("environment", {}) if isinstance(attrs.get("environment"), dict) else {}
    import tomllib

    cfg = tomllib.loads(cfg_text)
    lines = [
        f"# chaosjax run: {cfg.get('name', '')}",
        "",
        cfg.get("description", ""),
        "",
        "## What was run",
        "",
        f"- data: `{cfg['data']['name']}`; model: {cfg['model']['kind']} hidden {cfg['model']['hidden']}"
        f" ({cfg['model']['activation']}), {attrs.get('n_params', '?')} parameters, state dim {attrs.get('dim', '?')}",
        f"- loss `{cfg['training']['loss']}`, optimizer `{cfg['training']['optimizer']}`, batch "
        f"{cfg['training']['batch_size'] or 'full'}, {cfg['steps']} steps, records every {cfg['record_every']}",
        f"- replicas: {results.n_replicas} = seeds {cfg['replicas']['seeds']} × η {cfg['training']['learning_rates']}"
        f" × (1 reference + {cfg['replicas']['n_perturbed']} perturbed per ε {cfg['replicas']['eps']},"
        f" {cfg['replicas']['distribution']} on {cfg['replicas']['target']})",
        f"- precision {cfg['precision']}; device {env.get('device', '?')} ({env.get('backend', '?')});"
        f" jax {env.get('jax', '?')}; runtime {fmt(attrs.get('total_time_s'), '.1f')} s",
        "",
        "## Results per learning rate",
        "",
        "Losses and accuracies at the last step: mean ± standard error over seeds (the "
        "reference replica of each seed), per-seed values in brackets. ⟨ln d(T)/d(0)⟩: mean "
        "over perturbed replicas of the log growth of their L1 distance to the reference "
        "(positive: nearby runs separate). Diverged: seeds (reference replicas) and replicas "
        "that diverged, of all.",
        "",
    ]
    rows = summary_rows(results)
    cols = [
        ("loss", "train loss", ".3g"),
        ("test_loss", "test loss", ".3g"),
        ("accuracy", "train acc", ".3f"),
        ("test_accuracy", "test acc", ".3f"),
    ]
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    growth = any("log_growth" in r for r in rows)
    head = ["η", *(c[1] for c in cols)] + (["⟨ln d(T)/d(0)⟩"] if growth else [])
    head += ["diverged seeds", "diverged replicas"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        cells = [f"{r['learning_rate']:.4g}", *(seeds_cell(r[c[0]], c[2]) for c in cols)]
        if growth:
            cells.append(fmt(r.get("log_growth"), ".2f"))
        cells += [f"{r['diverged_seeds']}/{r['seeds']}", f"{r['diverged']}/{r['replicas']}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Figures",
        "",
        "![loss](figures/loss.png)",
        "",
        "![replica distance](figures/replica_distance.png)",
        "",
    ]
    return "\n".join(lines)


def protocol_report(store: Path, results, lyap, figures: Path) -> str:
    from chaosjax.experiments import protocols as pr
    from chaosjax.results import open_group

    parts = []
    ds = open_group(store, "series")
    if ds is not None:
        pr.series_figures(ds, figures)
        parts += pr.series_markdown(ds)
    div = open_group(store, "divergence")
    if div is not None:
        pr.divergence_figures(div, figures)
        parts += pr.divergence_markdown(div)
    ds = open_group(store, "marginal")
    if ds is not None:
        parts += pr.marginal_markdown(ds)
    ds = open_group(store, "target")
    if ds is not None:
        parts += pr.target_markdown(ds, lyap, div)
    ds = open_group(store, "prediction")
    if ds is not None:
        pr.prediction_figures(ds, figures)
        parts += pr.prediction_markdown(ds)
    ds = open_group(store, "response")
    if ds is not None:
        pr.response_figures(results, figures)
        parts += pr.response_markdown(ds)
    ds = open_group(store, "instability")
    if ds is not None:
        parts += pr.instability_markdown(ds)
    ds = open_group(store, "grokking")
    if ds is not None:
        pr.grokking_figures(ds, results, figures)
        parts += pr.grokking_markdown(ds)
    ds = open_group(store, "landscape")
    if ds is not None:
        from chaosjax.experiments.landscapes import landscape_figures, landscape_markdown

        landscape_figures(ds, figures)
        parts += landscape_markdown(ds)
    ds = open_group(store, "control")
    if ds is not None:
        from chaosjax.experiments import controlled

        controlled.control_figures(ds, figures)
        parts += controlled.control_markdown(ds)
    return ("\n" + "\n".join(parts)) if parts else ""


def plan_text(plan) -> str:
    return "\n".join(f"# variant: {name}\n{to_toml(cfg)}" for name, cfg in plan)


def run_plan(
    plan, folder, *, resume=False, force=False, progress=True, announce=None, on_chunk=None
):
    """Run a plan from :func:`chaosjax.experiments.load_plan`: a single config into ``folder``,
    or each variant into ``folder/<variant>`` with an index ``summary.md``. Returns the runs."""
    folder = Path(folder)
    if len(plan) == 1 and plan[0][0] is None:
        return [
            run_experiment(
                plan[0][1],
                folder,
                resume=resume,
                force=force,
                progress=progress,
                announce=announce,
                on_chunk=on_chunk,
            )
        ]
    for _, cfg in plan:  # validate every variant before touching the folder
        set_precision(cfg.precision)
        build_training_map(cfg)
    continuing = _prepare_shared(folder, plan_text(plan), resume, force)
    if is_main_process():
        atomic_write_text(folder / "config.toml", plan_text(plan))
    runs = []
    for name, cfg in plan:
        sub = folder / name
        runs.append(
            run_experiment(
                cfg,
                sub,
                resume=continuing and sub.exists(),
                progress=progress,
                announce=announce,
                on_chunk=on_chunk,
            )
        )
    if is_main_process():
        write_index(folder, [name for name, _ in plan])
    return runs


def write_index(folder: Path, names: list[str]) -> Path:
    """``summary.md`` of a preset with variants: each variant's summary, figures relinked."""
    import tomllib

    first = (folder / names[0] / "config.toml").read_text()
    meta = tomllib.loads(first)
    lines = [
        f"# chaosjax preset: {meta['name'].split('/')[0]}",
        "",
        meta.get("description", ""),
        "",
        "Variants: " + ", ".join(f"[{n}]({n}/summary.md)" for n in names),
        "",
    ]
    for n in names:
        text = (folder / n / "summary.md").read_text().replace("](figures/", f"]({n}/figures/")
        text = text.replace("\n## ", "\n### ").replace("# chaosjax run: ", "## variant: ", 1)
        lines += [text, ""]
    path = folder / "summary.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def report(folder: str | Path) -> Path:
    """Re-render ``summary.md`` and ``figures/`` of a run folder from its stored results."""
    folder = Path(folder)
    if not (folder / STORE).exists():
        subs = (
            sorted(p.name for p in folder.iterdir() if (p / STORE).exists())
            if folder.is_dir()
            else []
        )
        top = folder / "config.toml"
        if subs and top.exists():  # keep the plan's order, as written by run_plan
            lines = top.read_text().splitlines()
            order = [
                ln[len("# variant: ") :].strip() for ln in lines if ln.startswith("# variant: ")
            ]
            subs = [n for n in order if n in subs] + [n for n in subs if n not in order]
        if subs:
            for name in subs:
                report(folder / name)
            return write_index(folder, subs)
    from chaosjax import plots
    from chaosjax.experiments import analyses
    from chaosjax.results import ReplicaResults, open_group

    folder = Path(folder)
    store = folder / STORE
    if not store.exists():
        raise RunFolderError(f"report: {folder} holds no results.zarr")
    results = ReplicaResults.load(store)
    cfg_text = results.attrs.get("config") or (folder / "config.toml").read_text()
    lyap = open_group(store, "lyapunov")
    plots.standard_figures(results, folder / "figures", fits=lyap)
    text = render_summary(results, cfg_text)
    if lyap is not None:
        analyses.lyapunov_figures(lyap, folder / "figures")
        text += "\n" + "\n".join(analyses.lyapunov_markdown(lyap))
    curv = open_group(store, "curvature")
    if curv is not None and "sharpness" in results.records:
        analyses.curvature_figures(curv, results, folder / "figures")
        text += "\n" + "\n".join(analyses.curvature_markdown(curv, results))
    clv = open_group(store, "clv")
    if clv is not None:
        analyses.clv_figures(clv, folder / "figures")
        text += "\n" + "\n".join(analyses.clv_markdown(clv))
    text += protocol_report(store, results, lyap, folder / "figures")
    if int(results.attrs.get("complete", 0)) != 1:
        text = (
            "> **Incomplete run** (interrupted): resume it with `chaosjax run … --resume`.\n\n"
            + text
        )
    atomic_write_text(folder / "summary.md", text)
    return folder / "summary.md"


__all__ = [
    "Run",
    "RunFolderError",
    "build_dataset",
    "build_training_map",
    "report",
    "run_experiment",
]
