"""The ``target`` stage: the first step each run reaches a target test accuracy (the numbers:
:mod:`chaosjax.experiments.prediction`)."""

from __future__ import annotations

import dataclasses

import xarray as xr

from chaosjax.experiments._sections import fld
from chaosjax.experiments.prediction import target_markdown, target_stage
from chaosjax.experiments.stages.base import ReportInputs, RunInputs, Stage


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    """time to a target accuracy"""

    test_accuracy: float = fld(
        0.0, "report the first step each run reaches this test accuracy; 0 = off", lo=0.0, hi=1.0
    )


def run(inputs: RunInputs) -> xr.Dataset:
    return target_stage(inputs.cfg, inputs.batch, inputs.results)


def markdown(ds: xr.Dataset, report: ReportInputs) -> list[str]:
    return target_markdown(ds, report.groups.get("lyapunov"), report.groups.get("divergence"))


STAGE = Stage(
    "target",
    enabled=lambda cfg: cfg.target.test_accuracy > 0,
    run=run,
    markdown=markdown,
    section=TargetConfig,
)
