"""The ``response`` stage: the empirical NTK of every replica along the run (training
response, aging) and the fragility probe at the end (the numbers:
:mod:`chaosjax.experiments.training_response`)."""

from __future__ import annotations

import dataclasses

import xarray as xr

from chaosjax.experiments._sections import BaseConfig, ConfigError, fld
from chaosjax.experiments.stages.base import ReportInputs, RunInputs, Stage
from chaosjax.experiments.training_response import (
    response_figures,
    response_markdown,
    response_stage,
)
from chaosjax.response import ResponseTracker


@dataclasses.dataclass(frozen=True)
class ResponseConfig:
    """training response (NTK)"""

    enabled: bool = fld(
        False, "track the empirical NTK of every replica (training response, aging)"
    )
    n_probes: int = fld(32, "training inputs the NTK is measured on", lo=2)
    fragility_eps: float = fld(
        1e-4, "perturbation size of the fragility probe at the end", positive=True
    )


def check(cfg: BaseConfig) -> None:
    if cfg.step.factory and cfg.response.enabled:
        raise ConfigError(
            "response.enabled: the NTK needs the model's forward pass, which a "
            "step.factory does not expose; set response.enabled = false"
        )


def observers(cfg: BaseConfig, tmap) -> list:
    n_probes = min(cfg.response.n_probes, int(tmap.data["x_train"].shape[0]))
    return [ResponseTracker(n_probes=n_probes, rows="references")]


def run(inputs: RunInputs) -> xr.Dataset:
    return response_stage(inputs.cfg, inputs.tmap, inputs.batch, inputs.results)


def markdown(ds: xr.Dataset, report: ReportInputs) -> list[str]:
    return response_markdown(ds)


def figures(ds: xr.Dataset, report: ReportInputs) -> None:
    response_figures(report.results, report.figures)


STAGE = Stage(
    "response",
    enabled=lambda cfg: cfg.response.enabled,
    run=run,
    markdown=markdown,
    figures=figures,
    observers=observers,
    section=ResponseConfig,
    check=check,
)
