"""The stages of ``chaosjax run``: one registry that the runner and ``chaosjax report`` iterate.

A stage reads the recorded run (and the datasets of the stages before it) and returns one
``xarray.Dataset``, stored as the zarr group of its name in ``results.zarr``; its part of
``summary.md`` and its figures render from that stored dataset alone, so ``chaosjax report``
re-renders a finished run without recomputing anything. A stage may add observers to the run
(tangents, Lanczos, snapshots): they ride in the one replica run, so every number of a stage is
measured on the trajectory that was recorded.

Adding a stage (see ``docs/architecture.md``)::

    from chaosjax.experiments.stages import Stage, register_stage

    register_stage(Stage(
        name="my_stage",
        enabled=lambda cfg: cfg.series.enabled,
        run=lambda inputs: my_dataset(inputs.results),     # -> xarray.Dataset
        markdown=lambda ds, report: ["## My stage", ""],   # -> lines of summary.md
    ))

The registry's order is the run order and the report order; ``requires`` names stages that
must run (and be enabled) before this one, and their datasets are in ``inputs.groups``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import xarray as xr

from chaosjax.experiments.config import ConfigError, ExperimentConfig


@dataclasses.dataclass(frozen=True)
class RunInputs:
    """What a stage's ``run`` sees: the config, the training map, the replica batch, the
    results of the run, the datasets of the stages that ran before it (by name), whether to
    show progress, and the run folder (for stages that checkpoint runs of their own)."""

    cfg: ExperimentConfig
    tmap: Any
    batch: Any
    results: Any
    groups: Mapping[str, xr.Dataset]
    progress: bool = False
    folder: Path | None = None


@dataclasses.dataclass(frozen=True)
class ReportInputs:
    """What a stage's ``markdown`` and ``figures`` see: the stored results, every stored stage
    dataset (by name), and the figures folder."""

    results: Any
    groups: Mapping[str, xr.Dataset]
    figures: Path


@dataclasses.dataclass(frozen=True)
class Stage:
    """One analysis of a run.

    Attributes:
        name: the zarr group and the key in ``inputs.groups`` (an identifier).
        enabled: ``enabled(cfg) -> bool``.
        run: ``run(inputs: RunInputs) -> xarray.Dataset``.
        markdown: ``markdown(ds, report: ReportInputs) -> list[str]`` (lines of summary.md).
        figures: ``figures(ds, report) -> None``, writing PNGs into ``report.figures``.
        requires: stages that must be enabled and run first.
        observers: ``observers(cfg, tmap) -> list`` of observers this stage needs inside the run
            (the same observer asked for by two stages runs once).
        validate: ``validate(cfg, tmap)``, raising :class:`ConfigError` before the run folder
            is touched.
    """

    name: str
    enabled: Callable[[ExperimentConfig], bool]
    run: Callable[[RunInputs], xr.Dataset]
    markdown: Callable[[xr.Dataset, ReportInputs], list[str]]
    figures: Callable[[xr.Dataset, ReportInputs], None] | None = None
    requires: tuple[str, ...] = ()
    observers: Callable[[ExperimentConfig, Any], list] | None = None
    validate: Callable[[ExperimentConfig, Any], None] | None = None

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"name: a stage name must be an identifier, got {self.name!r}")
        for field in ("enabled", "run", "markdown"):
            if not callable(getattr(self, field)):
                raise TypeError(f"{field}: stage {self.name!r} needs a callable")


#: every stage, in run and report order
STAGES: dict[str, Stage] = {}


def register_stage(stage: Stage, *, replace: bool = False) -> Stage:
    """Add ``stage`` at the end of the registry (``replace=True``: in place of the stage of the
    same name). Stages it requires must be registered already."""
    if not isinstance(stage, Stage):
        raise TypeError(f"stage: expected a Stage, got {type(stage).__name__}")
    if stage.name in STAGES and not replace:
        raise ValueError(f"name: a stage {stage.name!r} is registered already (replace=True)")
    missing = [r for r in stage.requires if r not in STAGES or r == stage.name]
    if missing:
        raise ValueError(
            f"requires: stage {stage.name!r} needs {', '.join(missing)} registered before it; "
            f"registered: {', '.join(STAGES)}"
        )
    STAGES[stage.name] = stage
    return stage


def enabled_stages(cfg: ExperimentConfig) -> list[Stage]:
    """The stages a config runs, in registry order; a stage whose required stage is off is a
    :class:`ConfigError` naming both."""
    on = [s for s in STAGES.values() if s.enabled(cfg)]
    names = {s.name for s in on}
    for s in on:
        for r in s.requires:
            if r not in names:
                raise ConfigError(f"{s.name}.enabled: needs {r}.enabled = true")
    return on


def observers_of(cfg: ExperimentConfig, tmap) -> list:
    """The observers the enabled stages ask for, each once, in registry order."""
    out: list = []
    for s in enabled_stages(cfg):
        for obs in s.observers(cfg, tmap) if s.observers is not None else ():
            if obs is not None and not any(obs == o for o in out):
                out.append(obs)
    return out


def run_stages(inputs: RunInputs) -> dict[str, xr.Dataset]:
    """Run every enabled stage on the recorded run; returns ``{name: dataset}``."""
    groups: dict[str, xr.Dataset] = {}
    for s in enabled_stages(inputs.cfg):
        groups[s.name] = s.run(dataclasses.replace(inputs, groups=dict(groups)))
    return groups


def render_stages(report: ReportInputs) -> list[str]:
    """Markdown lines (and figures) of every stage stored in ``report.groups``."""
    lines: list[str] = []
    for name, s in STAGES.items():
        ds = report.groups.get(name)
        if ds is None:
            continue
        if s.figures is not None:
            s.figures(ds, report)
        lines += s.markdown(ds, report)
    return lines


# ---------------------------------------------------------------------------------------------
# the built-in stages


def _k_fits(section: str):
    def check(cfg, tmap):
        k = getattr(cfg, section).k
        if k > tmap.dim:
            raise ConfigError(f"{section}.k: must be <= the state dimension {tmap.dim}, got {k}")

    return check


def _needs_loss_fn(section: str):
    def check(cfg, tmap):
        if not getattr(tmap, "_loss_fn", True):
            raise ConfigError(
                f"{section}.enabled: the Hessian needs loss_fn(params, batch) from "
                f"step.factory; return it or set {section}.enabled = false"
            )

    return check


def _grokking_check(cfg, tmap):
    if tmap.task != "classification" or int(tmap.data["x_test"].shape[0]) == 0:
        raise ConfigError(
            "grokking.enabled: needs a classification dataset with a test split (the jump "
            "in test accuracy)"
        )
    if cfg.grokking.layer and cfg.grokking.layer not in tmap.layers:
        raise ConfigError(
            f"grokking.layer: unknown {cfg.grokking.layer!r}; allowed: {', '.join(tmap.layers)}"
        )


def _response_tracker(cfg, tmap):
    from chaosjax.response import ResponseTracker

    n_probes = min(cfg.response.n_probes, int(tmap.data["x_train"].shape[0]))
    return [ResponseTracker(n_probes=n_probes, rows="references")]


def _tangents(cfg, tmap):
    from chaosjax.experiments import analyses as an

    return [an.tangent_tracker(cfg)]


def _core_stages() -> list[Stage]:
    """The three core stages of :mod:`chaosjax.experiments.analyses`: Lyapunov, curvature,
    CLVs."""
    from chaosjax.experiments import analyses as an

    def curvature_markdown(ds, rep):
        if "sharpness" not in rep.results.records:
            return []
        return an.curvature_markdown(ds, rep.results, rep.groups.get("lyapunov"))

    def curvature_figures(ds, rep):
        if "sharpness" in rep.results.records:
            an.curvature_figures(ds, rep.results, rep.figures)

    return [
        Stage(
            "lyapunov",
            enabled=lambda cfg: cfg.lyapunov.enabled,
            run=lambda i: an.lyapunov_stage(i.cfg, i.tmap, i.batch, i.results),
            markdown=lambda ds, rep: an.lyapunov_markdown(ds),
            figures=lambda ds, rep: an.lyapunov_figures(ds, rep.figures),
            observers=lambda cfg, tmap: [*_tangents(cfg, tmap), *an.period_tracker(cfg)],
            validate=_k_fits("lyapunov"),
        ),
        Stage(
            "curvature",
            enabled=lambda cfg: cfg.curvature.enabled,
            run=lambda i: an.curvature_stage(i.cfg, i.tmap, i.batch, i.results),
            markdown=curvature_markdown,
            figures=curvature_figures,
            observers=lambda cfg, tmap: [an.curvature_tracker(cfg)],
            validate=_needs_loss_fn("curvature"),
        ),
        Stage(
            "clv",
            enabled=lambda cfg: cfg.clv.enabled,
            run=lambda i: an.clv_stage(i.cfg, i.tmap, i.batch, i.results),
            markdown=lambda ds, rep: an.clv_markdown(ds),
            figures=lambda ds, rep: an.clv_figures(ds, rep.figures),
            observers=_tangents,
            validate=_k_fits("clv"),
        ),
    ]


def _protocol_stages() -> list[Stage]:
    """The protocol stages (one module per study), in the order their sections are reported."""
    from chaosjax.experiments import controlled as ct
    from chaosjax.experiments import landscapes as ls
    from chaosjax.experiments import protocols as pr
    from chaosjax.experiments import routes

    return [
        Stage(
            "series",
            enabled=lambda cfg: cfg.series.enabled,
            run=lambda i: pr.series_stage(i.cfg, i.batch, i.results),
            markdown=lambda ds, rep: pr.series_markdown(ds),
            figures=lambda ds, rep: pr.series_figures(ds, rep.figures),
        ),
        Stage(
            "divergence",
            enabled=lambda cfg: cfg.divergence.enabled,
            run=lambda i: pr.divergence_stage(i.cfg, i.batch, i.results),
            markdown=lambda ds, rep: pr.divergence_markdown(ds),
            figures=lambda ds, rep: pr.divergence_figures(ds, rep.figures),
        ),
        Stage(
            "marginal",
            enabled=lambda cfg: cfg.marginal.enabled,
            run=lambda i: pr.marginal_stage(i.cfg, i.tmap, i.batch, i.results, i.progress),
            markdown=lambda ds, rep: pr.marginal_markdown(ds),
            observers=lambda cfg, tmap: [pr.marginal_snapshots(cfg)],
        ),
        Stage(
            "target",
            enabled=lambda cfg: cfg.target.test_accuracy > 0,
            run=lambda i: pr.target_stage(i.cfg, i.batch, i.results),
            markdown=lambda ds, rep: pr.target_markdown(
                ds, rep.groups.get("lyapunov"), rep.groups.get("divergence")
            ),
        ),
        Stage(
            "prediction",
            enabled=lambda cfg: cfg.prediction.enabled,
            run=lambda i: pr.prediction_stage(i.cfg, i.batch, i.results, i.groups["lyapunov"]),
            markdown=lambda ds, rep: pr.prediction_markdown(ds),
            figures=lambda ds, rep: pr.prediction_figures(ds, rep.figures),
            requires=("lyapunov",),
        ),
        Stage(
            "response",
            enabled=lambda cfg: cfg.response.enabled,
            run=lambda i: pr.response_stage(i.cfg, i.tmap, i.batch, i.results),
            markdown=lambda ds, rep: pr.response_markdown(ds),
            figures=lambda ds, rep: pr.response_figures(rep.results, rep.figures),
            observers=_response_tracker,
        ),
        Stage(
            "bifurcation",
            enabled=lambda cfg: cfg.bifurcation.enabled,
            run=lambda i: routes.bifurcation_stage(i.cfg, i.tmap, i.batch),
            markdown=lambda ds, rep: routes.bifurcation_markdown(ds),
            figures=lambda ds, rep: routes.bifurcation_figures(ds, rep.figures),
        ),
        Stage(
            "instability",
            enabled=lambda cfg: cfg.instability.enabled,
            run=lambda i: pr.instability_stage(i.cfg, i.batch, i.results, i.groups["lyapunov"]),
            markdown=lambda ds, rep: pr.instability_markdown(ds),
            requires=("lyapunov",),
        ),
        Stage(
            "grokking",
            enabled=lambda cfg: cfg.grokking.enabled,
            run=lambda i: pr.grokking_stage(i.cfg, i.batch, i.results, i.groups.get("lyapunov")),
            markdown=lambda ds, rep: pr.grokking_markdown(ds),
            figures=lambda ds, rep: pr.grokking_figures(ds, rep.results, rep.figures),
            validate=_grokking_check,
        ),
        Stage(
            "landscape",
            enabled=lambda cfg: cfg.landscape.enabled,
            run=lambda i: ls.landscape_stage(i.cfg, i.tmap, i.batch, i.results),
            markdown=lambda ds, rep: ls.landscape_markdown(ds),
            figures=lambda ds, rep: ls.landscape_figures(ds, rep.figures),
            observers=lambda cfg, tmap: [ls.landscape_snapshots(cfg)],
            validate=_needs_loss_fn("landscape"),
        ),
        Stage(
            "control",
            enabled=lambda cfg: cfg.control.enabled,
            run=lambda i: ct.control_stage(i.cfg, i.tmap, i.batch, i.results, i.folder, i.progress),
            markdown=lambda ds, rep: ct.control_markdown(ds),
            figures=lambda ds, rep: ct.control_figures(ds, rep.figures),
            requires=("curvature",),
            observers=_tangents,
            validate=lambda cfg, tmap: ct.validate(cfg),
        ),
    ]


def _register_builtin() -> None:
    for s in [*_core_stages(), *_protocol_stages()]:
        register_stage(s)


_register_builtin()

__all__ = [
    "STAGES",
    "ReportInputs",
    "RunInputs",
    "Stage",
    "enabled_stages",
    "observers_of",
    "register_stage",
    "render_stages",
    "run_stages",
]
