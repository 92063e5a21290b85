"""The ``lyapunov`` stage: the top-k Lyapunov spectrum, finite-time exponents, regimes and
orbit labels of every reference run, from the tangents carried along the recorded run (the
numbers: :mod:`chaosjax.experiments.analyses`)."""

from __future__ import annotations

import dataclasses

import xarray as xr

from chaosjax.experiments._sections import BaseConfig, ConfigError, fld
from chaosjax.experiments.analyses import (
    lyapunov_figures,
    lyapunov_markdown,
    lyapunov_stage,
    period_tracker,
    tangent_tracker,
)
from chaosjax.experiments.stages.base import ReportInputs, RunInputs, Stage, k_within_state


@dataclasses.dataclass(frozen=True)
class LyapunovConfig:
    """Lyapunov exponents"""

    enabled: bool = fld(True, "compute tangent-space exponents of each (seed, η) reference run")
    k: int = fld(4, "number of exponents (top-k spectrum)", lo=1)
    steps: int = fld(0, "accumulated steps from t = warmup; 0 = to the end of the run", lo=0)
    warmup: int = fld(0, "steps of the run before its tangents start", lo=0)
    renorm_every: int = fld(1, "steps between QR renormalisations", lo=1)
    ftle_window: int = fld(100, "window of the finite-time exponents (steps)", lo=1)
    period_window: int = fld(
        128,
        "last states of each reference run the period detector examines (regime labels "
        "periodic / frozen / dead plateau; at most the run's steps); 0 = off",
        lo=0,
    )
    fit_starts: tuple[int, ...] = fld(
        [0, 100, 5], "replica-distance fit: window starts range [first, last, stride]"
    )
    fit_widths: tuple[int, ...] = fld(
        [30, 100, 5], "replica-distance fit: window widths range [first, last, stride]"
    )


def check(cfg: BaseConfig) -> None:
    """The renormalisation cadence divides the windows, and the windows lie inside the run."""
    ly = cfg.lyapunov
    n = ly.steps or cfg.steps
    if n % ly.renorm_every:
        raise ConfigError(
            f"lyapunov.renorm_every: must divide the Lyapunov steps ({n}), got {ly.renorm_every}"
        )
    if ly.ftle_window % ly.renorm_every:
        raise ConfigError(
            f"lyapunov.ftle_window: must be a multiple of renorm_every={ly.renorm_every}"
        )
    if ly.period_window == 1:
        raise ConfigError("lyapunov.period_window: must be 0 (off) or >= 2, got 1")
    if ly.enabled and ly.warmup + ly.renorm_every > cfg.steps:
        raise ConfigError(
            f"lyapunov.warmup: leaves no renormalisation in the run of {cfg.steps} steps, "
            f"got {ly.warmup}"
        )
    if ly.enabled and ly.steps and ly.warmup + ly.steps > cfg.steps:
        raise ConfigError(
            f"lyapunov.steps: warmup {ly.warmup} + steps {ly.steps} end after the run "
            f"({cfg.steps} steps)"
        )
    for name in ("fit_starts", "fit_widths"):
        r = getattr(ly, name)
        if len(r) != 3 or r[2] < 1 or r[1] < r[0] or r[0] < 0:
            raise ConfigError(
                f"lyapunov.{name}: expected [first, last, stride] with 0 <= first <= last and "
                f"stride >= 1, got {list(r)}"
            )


def observers(cfg: BaseConfig, tmap) -> list:
    """The run's tangents (shared with clv and control) and the period detector."""
    return [tangent_tracker(cfg), *period_tracker(cfg)]


def run(inputs: RunInputs) -> xr.Dataset:
    return lyapunov_stage(inputs.cfg, inputs.tmap, inputs.batch, inputs.results)


def markdown(ds: xr.Dataset, report: ReportInputs) -> list[str]:
    return lyapunov_markdown(ds)


def figures(ds: xr.Dataset, report: ReportInputs) -> None:
    lyapunov_figures(ds, report.figures)


STAGE = Stage(
    "lyapunov",
    enabled=lambda cfg: cfg.lyapunov.enabled,
    run=run,
    markdown=markdown,
    figures=figures,
    observers=observers,
    validate=k_within_state("lyapunov"),
    section=LyapunovConfig,
    check=check,
)
