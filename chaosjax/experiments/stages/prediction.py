"""The ``prediction`` stage: the early FTLE of the lyapunov stage against the final training
loss across seeds (the numbers: :mod:`chaosjax.experiments.prediction`)."""

from __future__ import annotations

import dataclasses

import xarray as xr

from chaosjax.experiments._sections import BaseConfig, ConfigError, fld
from chaosjax.experiments.prediction import (
    prediction_figures,
    prediction_markdown,
    prediction_stage,
)
from chaosjax.experiments.stages.base import ReportInputs, RunInputs, Stage


@dataclasses.dataclass(frozen=True)
class PredictionConfig:
    """early FTLE against final loss"""

    enabled: bool = fld(
        False, "correlate the early FTLE (lyapunov stage) with the final training loss across seeds"
    )


def check(cfg: BaseConfig) -> None:
    if cfg.prediction.enabled and not cfg.lyapunov.enabled:
        raise ConfigError("prediction.enabled: needs lyapunov.enabled = true (the early FTLE)")


def run(inputs: RunInputs) -> xr.Dataset:
    i = inputs
    return prediction_stage(i.cfg, i.batch, i.results, i.groups["lyapunov"])


def markdown(ds: xr.Dataset, report: ReportInputs) -> list[str]:
    return prediction_markdown(ds)


def figures(ds: xr.Dataset, report: ReportInputs) -> None:
    prediction_figures(ds, report.figures)


STAGE = Stage(
    "prediction",
    enabled=lambda cfg: cfg.prediction.enabled,
    run=run,
    markdown=markdown,
    figures=figures,
    requires=("lyapunov",),
    section=PredictionConfig,
    check=check,
)
