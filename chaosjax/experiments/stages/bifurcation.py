"""The ``bifurcation`` stage: a bifurcation diagram over η from the first seed's initial state
(one batched run of its own; the numbers: :mod:`chaosjax.experiments.routes`)."""

from __future__ import annotations

import dataclasses

import xarray as xr

from chaosjax.experiments._sections import BaseConfig, ConfigError, fld
from chaosjax.experiments.routes import (
    bifurcation_figures,
    bifurcation_markdown,
    bifurcation_stage,
)
from chaosjax.experiments.stages.base import ReportInputs, RunInputs, Stage


@dataclasses.dataclass(frozen=True)
class BifurcationConfig:
    """bifurcation diagram over η"""

    enabled: bool = fld(
        False, "a bifurcation diagram over η from the first seed's initial state (one batched run)"
    )
    values: tuple[float, ...] = fld(
        [0.5, 1.5, 101], "the η grid: [first, last, count], evenly spaced", positive=True
    )
    steps: int = fld(2000, "steps of the diagram's run per η", lo=2)
    n_samples: int = fld(64, "attractor samples kept per η (the loss)", lo=2)
    max_period: int = fld(16, "largest period detected", lo=1)
    refine_tol: float = fld(1e-4, "width to which period changes are bisected", positive=True)


def check(cfg: BaseConfig) -> None:
    bf = cfg.bifurcation
    v = bf.values
    if bf.enabled and (len(v) != 3 or int(v[2]) != v[2] or v[2] < 2 or not v[0] < v[1]):
        raise ConfigError(
            f"bifurcation.values: expected [first, last, count] with first < last and an "
            f"integer count >= 2, got {list(bf.values)}"
        )
    if bf.enabled and bf.n_samples * bf.max_period > bf.steps:
        raise ConfigError(
            f"bifurcation.steps: must hold n_samples·max_period = "
            f"{bf.n_samples * bf.max_period} steps (the sampled window), got {bf.steps}"
        )


def run(inputs: RunInputs) -> xr.Dataset:
    return bifurcation_stage(inputs.cfg, inputs.tmap, inputs.batch)


def markdown(ds: xr.Dataset, report: ReportInputs) -> list[str]:
    return bifurcation_markdown(ds)


def figures(ds: xr.Dataset, report: ReportInputs) -> None:
    bifurcation_figures(ds, report.figures)


STAGE = Stage(
    "bifurcation",
    enabled=lambda cfg: cfg.bifurcation.enabled,
    run=run,
    markdown=markdown,
    figures=figures,
    section=BifurcationConfig,
    check=check,
)
