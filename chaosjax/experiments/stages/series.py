"""The ``series`` stage: loss-series diagnostics of each reference run (ACF against shuffled
surrogates, spikes, laminar phases, the 0–1 test, the expansion-rate method; the numbers:
:mod:`chaosjax.experiments.danovski`)."""

from __future__ import annotations

import dataclasses

import xarray as xr

from chaosjax.experiments._sections import fld
from chaosjax.experiments.danovski import series_figures, series_markdown, series_stage
from chaosjax.experiments.stages.base import ReportInputs, RunInputs, Stage


@dataclasses.dataclass(frozen=True)
class SeriesConfig:
    """loss-series diagnostics"""

    enabled: bool = fld(False, "loss-series diagnostics of each reference run (per seed)")
    start: int = fld(
        0, "first step of the window every loss-series diagnostic is computed on", lo=0
    )
    max_lag: int = fld(50, "largest ACF lag (records)", lo=1)
    n_surrogates: int = fld(
        1000, "shuffled surrogates of the ACF band (3rd–97th percentile)", lo=10
    )
    spike_factor: float = fld(2.0, "spike: loss above this × its running minimum", positive=True)
    laminar_min_length: int = fld(20, "shortest laminar phase (records)", lo=1)
    analogue_e: float = fld(5e-5, "analogue radius e of the expansion-rate method", positive=True)


def run(inputs: RunInputs) -> xr.Dataset:
    return series_stage(inputs.cfg, inputs.batch, inputs.results)


def markdown(ds: xr.Dataset, report: ReportInputs) -> list[str]:
    return series_markdown(ds)


def figures(ds: xr.Dataset, report: ReportInputs) -> None:
    series_figures(ds, report.figures)


STAGE = Stage(
    "series",
    enabled=lambda cfg: cfg.series.enabled,
    run=run,
    markdown=markdown,
    figures=figures,
    section=SeriesConfig,
)
