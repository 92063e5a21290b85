"""The ``landscape`` stage: loss slices at the end of each reference run, along the top Hessian
eigenvector and on the trajectory's principal plane, from the states of the recorded run (the
numbers: :mod:`chaosjax.experiments.landscapes`)."""

from __future__ import annotations

import dataclasses

import xarray as xr

from chaosjax.experiments._sections import BaseConfig, fld
from chaosjax.experiments.landscapes import (
    landscape_figures,
    landscape_markdown,
    landscape_snapshots,
    landscape_stage,
)
from chaosjax.experiments.stages.base import ReportInputs, RunInputs, Stage, needs_loss_fn


@dataclasses.dataclass(frozen=True)
class LandscapeConfig:
    """loss landscapes of the recorded runs"""

    enabled: bool = fld(
        False,
        "loss slices at the end of each reference run: along the top Hessian eigenvector and on the trajectory's principal plane",
    )
    num: int = fld(81, "points of the 1-D slice", lo=3)
    num_2d: int = fld(41, "points per axis of the 2-D slice", lo=3)
    snapshots: int = fld(100, "recorded states of each reference run kept for its plane", lo=3)
    n_matvecs: int = fld(64, "Lanczos steps of the top eigenvector at the end", lo=2)


def observers(cfg: BaseConfig, tmap) -> list:
    """The recorded states of each reference run its plane is fitted to."""
    return [landscape_snapshots(cfg)]


def run(inputs: RunInputs) -> xr.Dataset:
    return landscape_stage(inputs.cfg, inputs.tmap, inputs.batch, inputs.results)


def markdown(ds: xr.Dataset, report: ReportInputs) -> list[str]:
    return landscape_markdown(ds)


def figures(ds: xr.Dataset, report: ReportInputs) -> None:
    landscape_figures(ds, report.figures)


STAGE = Stage(
    "landscape",
    enabled=lambda cfg: cfg.landscape.enabled,
    run=run,
    markdown=markdown,
    figures=figures,
    observers=observers,
    validate=needs_loss_fn("landscape"),
    section=LandscapeConfig,
)
