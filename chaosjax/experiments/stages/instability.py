"""The ``instability`` stage: per-layer separation of perturbed replicas and the phases of
training from the FTLEs of the lyapunov stage (the numbers:
:mod:`chaosjax.experiments.instability`)."""

from __future__ import annotations

import dataclasses

import xarray as xr

from chaosjax.experiments._sections import BaseConfig, ConfigError, fld
from chaosjax.experiments.instability import instability_markdown, instability_stage
from chaosjax.experiments.stages.base import ReportInputs, RunInputs, Stage


@dataclasses.dataclass(frozen=True)
class InstabilityConfig:
    """instability metrics"""

    enabled: bool = fld(False, "per-layer separation of perturbed replicas and phases of training")
    separation_factor: float = fld(
        10.0, "a layer has separated when its distance exceeds this × its start", positive=True
    )
    reconverge_fraction: float = fld(
        0.5,
        "a layer has re-converged when its final distance is below this × its peak",
        positive=True,
    )


def check(cfg: BaseConfig) -> None:
    if cfg.instability.enabled and not cfg.lyapunov.enabled:
        raise ConfigError("instability.enabled: needs lyapunov.enabled = true (the FTLE phases)")


def run(inputs: RunInputs) -> xr.Dataset:
    i = inputs
    return instability_stage(i.cfg, i.batch, i.results, i.groups["lyapunov"])


def markdown(ds: xr.Dataset, report: ReportInputs) -> list[str]:
    return instability_markdown(ds)


STAGE = Stage(
    "instability",
    enabled=lambda cfg: cfg.instability.enabled,
    run=run,
    markdown=markdown,
    requires=("lyapunov",),
    section=InstabilityConfig,
    check=check,
)
