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
from chaosjax.experiments.builders import build_dataset, build_training_map, set_precision
from chaosjax.experiments.config import ConfigError, ExperimentConfig, to_toml
from chaosjax.experiments.regimes import regime_markdown
from chaosjax.experiments.stages import (
    STAGES,
    ReportInputs,
    RunInputs,
    enabled_stages,
    observers_of,
    render_stages,
    run_stages,
)
from chaosjax.experiments.stats import seeds_cell
from chaosjax.experiments.tables import table
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
    if resume and not busy:
        raise RunFolderError(
            f"--resume: {folder} {'is empty' if folder.exists() else 'does not exist'}: there is "
            "no run to continue; leave out --resume to start one there"
        )
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
    stages = enabled_stages(cfg)
    for stage in stages:
        if stage.validate is not None:
            stage.validate(cfg, tmap)
    if "learning_rate" not in tmap.hparams and len(cfg.training.learning_rates) > 1:
        raise ConfigError(
            "training.learning_rates: this map takes no learning_rate hyper-parameter (your "
            "optimizer or train step sets it); give one value"
        )
    run_observables(tmap)
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
    trackers = observers_of(cfg, tmap)
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
        attrs={
            "config": cfg_text,
            "n_params": tmap.n_params,
            "dim": tmap.dim,
            "loss_data": tmap.loss_data,
        },
        on_chunk=on_chunk,
        devices=cfg.scale.devices or None,
        memory_limit=cfg.scale.memory_limit or None,
    )
    groups = run_stages(RunInputs(cfg, tmap, batch, results, {}, progress, folder))
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


def render_summary(results, cfg_text: str, conclusion: list[str] | None = None) -> str:
    """The head of ``summary.md``: what was run (from the resolved config), the results per
    learning rate, ``conclusion`` (the regime of each run), and the standard figures."""
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
        f"- loss records are of {attrs.get('loss_data', 'the whole training set')}",
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
    body = []
    for r in rows:
        cells = [f"{r['learning_rate']:.4g}", *(seeds_cell(r[c[0]], c[2]) for c in cols)]
        if growth:
            cells.append(fmt(r.get("log_growth"), ".2f"))
        cells += [f"{r['diverged_seeds']}/{r['seeds']}", f"{r['diverged']}/{r['replicas']}"]
        body.append(cells)
    lines += table(head, body)
    lines += ["", *(conclusion or [])]
    lines += [
        "## Figures",
        "",
        "![loss](figures/loss.png)",
        "",
        "![replica distance](figures/replica_distance.png)",
        "",
    ]
    return "\n".join(lines)


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
    from chaosjax.results import ReplicaResults, open_group

    folder = Path(folder)
    store = folder / STORE
    if not store.exists():
        raise RunFolderError(f"report: {folder} holds no results.zarr")
    results = ReplicaResults.load(store)
    cfg_text = results.attrs.get("config") or (folder / "config.toml").read_text()
    groups = {name: open_group(store, name) for name in STAGES}
    groups = {name: ds for name, ds in groups.items() if ds is not None}
    plots.standard_figures(results, folder / "figures", fits=groups.get("lyapunov"))
    text = render_summary(results, cfg_text, regime_markdown(groups, results))
    parts = render_stages(ReportInputs(results, groups, folder / "figures"))
    if parts:
        text += "\n" + "\n".join(parts)
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
