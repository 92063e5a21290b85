"""The ``divergence`` stage: best-window fits of the replica separation per (seed, η, ε) with
Danovski et al.'s acceptance rule (the numbers: :mod:`chaosjax.experiments.danovski`)."""

from __future__ import annotations

import dataclasses

import xarray as xr

from chaosjax.experiments._sections import fld
from chaosjax.experiments.danovski import (
    divergence_figures,
    divergence_markdown,
    divergence_stage,
)
from chaosjax.experiments.stages.base import ReportInputs, RunInputs, Stage


@dataclasses.dataclass(frozen=True)
class DivergenceConfig:
    """replica-divergence fits per ε"""

    enabled: bool = fld(
        False, "best-window fits per (seed, η, ε) with Danovski et al.'s acceptance rule"
    )
    min_r2: float = fld(0.9, "accept a fit only with R² above this", lo=0.0, hi=1.0)
    min_slope: float = fld(0.05, "accept a fit only with a slope above this (per step)")
    histogram_eps: float = fld(1e-8, "ε whose slope histogram is drawn", positive=True)


def run(inputs: RunInputs) -> xr.Dataset:
    return divergence_stage(inputs.cfg, inputs.batch, inputs.results)


def markdown(ds: xr.Dataset, report: ReportInputs) -> list[str]:
    return divergence_markdown(ds)


def figures(ds: xr.Dataset, report: ReportInputs) -> None:
    divergence_figures(ds, report.figures)


STAGE = Stage(
    "divergence",
    enabled=lambda cfg: cfg.divergence.enabled,
    run=run,
    markdown=markdown,
    figures=figures,
    section=DivergenceConfig,
)
