"""The ``grokking`` stage: does the jump in test accuracy coincide with loss spikes, sharpness
crossings and positive FTLEs (the numbers: :mod:`chaosjax.experiments.grokking`)."""

from __future__ import annotations

import dataclasses

import xarray as xr

from chaosjax.experiments._sections import BaseConfig, ConfigError, fld
from chaosjax.experiments.grokking import grokking_figures, grokking_markdown, grokking_stage
from chaosjax.experiments.stages.base import ReportInputs, RunInputs, Stage


@dataclasses.dataclass(frozen=True)
class GrokkingConfig:
    """grokking against instability (slingshot)"""

    enabled: bool = fld(
        False,
        "does the jump in test accuracy (grokking) coincide with loss spikes, sharpness crossings and positive FTLEs",
    )
    accuracy: float = fld(
        0.9, "a run groks when its test accuracy first reaches this", lo=0.0, hi=1.0
    )
    window: int = fld(
        0, "steps before the jump searched for each indicator; 0 = a tenth of the run", lo=0
    )
    spike_factor: float = fld(
        2.0,
        "a loss spike: training loss above this × its minimum over spike_lookback records",
        lo=1.0,
    )
    spike_lookback: int = fld(
        5, "records before a point that a loss spike is measured against", lo=1
    )
    layer: str = fld(
        "", "the layer whose norm is reported; '' = 'head' if the model has one, else its last"
    )


def check(cfg: BaseConfig) -> None:
    if cfg.grokking.enabled and cfg.step.factory:
        raise ConfigError(
            "grokking.enabled: needs train and test accuracy of a model with a forward pass; "
            "a step.factory has none"
        )


def validate(cfg: BaseConfig, tmap) -> None:
    """A classification dataset with a test split, and the reported layer exists."""
    if tmap.task != "classification" or int(tmap.data["x_test"].shape[0]) == 0:
        raise ConfigError(
            "grokking.enabled: needs a classification dataset with a test split (the jump "
            "in test accuracy)"
        )
    if cfg.grokking.layer and cfg.grokking.layer not in tmap.layers:
        raise ConfigError(
            f"grokking.layer: unknown {cfg.grokking.layer!r}; allowed: {', '.join(tmap.layers)}"
        )


def run(inputs: RunInputs) -> xr.Dataset:
    i = inputs
    return grokking_stage(i.cfg, i.batch, i.results, i.groups.get("lyapunov"))


def markdown(ds: xr.Dataset, report: ReportInputs) -> list[str]:
    return grokking_markdown(ds)


def figures(ds: xr.Dataset, report: ReportInputs) -> None:
    grokking_figures(ds, report.results, report.figures)


STAGE = Stage(
    "grokking",
    enabled=lambda cfg: cfg.grokking.enabled,
    run=run,
    markdown=markdown,
    figures=figures,
    validate=validate,
    section=GrokkingConfig,
    check=check,
)
