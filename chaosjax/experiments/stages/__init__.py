"""The stages of ``chaosjax run``: one registry that the runner and ``chaosjax report`` iterate.

A stage reads the recorded run (and the datasets of the stages before it) and returns one
``xarray.Dataset``, stored as the zarr group of its name in ``results.zarr``; its part of
``summary.md`` and its figures render from that stored dataset alone, so ``chaosjax report``
re-renders a finished run without recomputing anything. A stage may add observers to the run
(tangents, Lanczos, snapshots): they ride in the one replica run, so every number of a stage is
measured on the trajectory that was recorded.

Each built-in stage is one module of this package that declares all of it, gathered in
``STAGE = Stage(...)``: its config section (a frozen dataclass, the ``[name]`` table),
``check(cfg)`` (the cross-checks of that section against the rest of the config),
``validate(cfg, tmap)`` (the checks that need the map), its observers, ``run``, ``markdown`` and
``figures``. Adding a built-in stage is that module plus its name in :data:`BUILTIN`;
``ExperimentConfig`` takes the section from there, so the TOML
table, ``--set my_stage.x=...``, the dumped config and ``chaosjax config`` follow. The recipe
with a complete example is in ``docs/architecture.md``; the smallest stage here is
:mod:`~chaosjax.experiments.stages.target`::

    # chaosjax/experiments/stages/my_stage.py
    @dataclasses.dataclass(frozen=True)
    class MyStageConfig:
        enabled: bool = fld(False, "run my analysis")
        window: int = fld(10, "records per window", lo=1)


    def check(cfg):
        if cfg.my_stage.enabled and cfg.my_stage.window > cfg.steps // cfg.record_every:
            raise ConfigError(f"my_stage.window: at most the run's records, got ...")


    STAGE = Stage(
        "my_stage",
        enabled=lambda cfg: cfg.my_stage.enabled,
        run=lambda inputs: my_dataset(inputs.results),     # -> xarray.Dataset
        markdown=lambda ds, report: ["## My stage", ""],   # -> lines of summary.md
        section=MyStageConfig,
        check=check,
    )

From your own code, :func:`register_stage` adds a stage at run time, one without a section
(``ExperimentConfig``'s tables are fixed when it is composed; such a stage reads the existing
sections). The registry's order is the run order and the report order; ``requires`` names
stages that must run (and be enabled) before this one, and their datasets are in
``inputs.groups``.
"""

from __future__ import annotations

import dataclasses
import importlib

import xarray as xr

from chaosjax.experiments._sections import BaseConfig, ConfigError
from chaosjax.experiments.stages.base import ReportInputs, RunInputs, Stage

#: the built-in stages in run and report order, by module of this package (adding one: its
#: module and its name here); ``ExperimentConfig`` has one table per section
BUILTIN = (
    "lyapunov",
    "curvature",
    "clv",
    "series",
    "divergence",
    "marginal",
    "target",
    "prediction",
    "response",
    "bifurcation",
    "instability",
    "grokking",
    "landscape",
    "control",
)

#: the :class:`Stage` that each module of :data:`BUILTIN` declares, in that order
BUILTIN_STAGES: tuple[Stage, ...] = tuple(
    importlib.import_module(f"{__name__}.{name}").STAGE for name in BUILTIN
)

#: every stage, in run and report order: the built-in ones, then those registered at run time
STAGES: dict[str, Stage] = {}


def register_stage(stage: Stage, *, replace: bool = False) -> Stage:
    """Add ``stage`` at the end of the registry (``replace=True``: in place of the stage of the
    same name). Stages it requires must be registered already.

    A stage registered here has no config section of its own: ``ExperimentConfig`` is composed
    from the sections of :data:`BUILTIN_STAGES` when :mod:`chaosjax.experiments.config` is
    imported, so a new section would have no table to be read from (a replacement of a built-in
    stage may keep that stage's section). Its ``check`` runs whenever a config is built."""
    if not isinstance(stage, Stage):
        raise TypeError(f"stage: expected a Stage, got {type(stage).__name__}")
    if stage.name in STAGES and not replace:
        raise ValueError(f"name: a stage {stage.name!r} is registered already (replace=True)")
    builtin = {s.name: s.section for s in BUILTIN_STAGES}
    if stage.section is not None and builtin.get(stage.name) is not stage.section:
        raise ValueError(
            f"section: stage {stage.name!r} brings a config section, which only a built-in stage "
            "can (a module in chaosjax/experiments/stages/ and its line in BUILTIN_STAGES); "
            "read the existing sections instead"
        )
    missing = [r for r in stage.requires if r not in STAGES or r == stage.name]
    if missing:
        raise ValueError(
            f"requires: stage {stage.name!r} needs {', '.join(missing)} registered before it; "
            f"registered: {', '.join(STAGES)}"
        )
    STAGES[stage.name] = stage
    return stage


def check_stages(cfg: BaseConfig) -> None:
    """Every registered stage's ``check(cfg)``, in registry order (``ExperimentConfig`` runs it
    whenever a config is built)."""
    for s in list(STAGES.values()):
        if s.check is not None:
            s.check(cfg)


def enabled_stages(cfg: BaseConfig) -> list[Stage]:
    """The stages a config runs, in registry order; a stage whose required stage is off is a
    :class:`ConfigError` naming both."""
    on = [s for s in STAGES.values() if s.enabled(cfg)]
    names = {s.name for s in on}
    for s in on:
        for r in s.requires:
            if r not in names:
                raise ConfigError(f"{s.name}.enabled: needs {r}.enabled = true")
    return on


def observers_of(cfg: BaseConfig, tmap) -> list:
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


for _stage in BUILTIN_STAGES:
    register_stage(_stage)

__all__ = [
    "BUILTIN_STAGES",
    "STAGES",
    "ReportInputs",
    "RunInputs",
    "Stage",
    "check_stages",
    "enabled_stages",
    "observers_of",
    "register_stage",
    "render_stages",
    "run_stages",
]
