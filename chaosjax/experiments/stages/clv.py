"""The ``clv`` stage: covariant Lyapunov vectors of every reference run over the CLV window,
from the R factors and bases of the run's own tangents (the numbers:
:mod:`chaosjax.experiments.analyses`)."""

from __future__ import annotations

import dataclasses

import xarray as xr

from chaosjax.experiments._sections import BaseConfig, ConfigError, fld
from chaosjax.experiments.analyses import clv_figures, clv_markdown, clv_stage, tangent_tracker
from chaosjax.experiments.stages.base import ReportInputs, RunInputs, Stage, k_within_state


@dataclasses.dataclass(frozen=True)
class CLVConfig:
    """covariant Lyapunov vectors"""

    enabled: bool = fld(False, "compute covariant Lyapunov vectors of each (seed, η) reference run")
    k: int = fld(4, "number of covariant vectors", lo=1)
    steps: int = fld(
        0,
        "steps over which CLVs are computed, from t = align; 0 = the rest of the run before the backward transient",
        lo=0,
    )
    align: int = fld(
        100,
        "start of the kept range: the run's tangents (lyapunov.renorm_every) align until then; a multiple of record_every, >= lyapunov.warmup",
        lo=0,
    )
    backward_transient: int = fld(
        200, "steps of the run after the kept range, iterated backwards to converge the CLVs", lo=0
    )
    keep_every: int = fld(
        0,
        "store vectors every this many steps (a multiple of record_every); 0 = about 10 evenly spaced records",
        lo=0,
    )
    tangency_deg: float = fld(
        1.0, "angles below this (degrees) count as near-tangencies", positive=True
    )


def check(cfg: BaseConfig) -> None:
    """The CLV window lies inside the one run, on its records and renormalisations."""
    ly, c = cfg.lyapunov, cfg.clv
    if not c.enabled:
        return
    re = ly.renorm_every
    if c.align % cfg.record_every:
        raise ConfigError(
            f"clv.align: the kept range starts on a record: a multiple of record_every="
            f"{cfg.record_every}, got {c.align}"
        )
    if ly.enabled and (c.align < ly.warmup or (c.align - ly.warmup) % re):
        raise ConfigError(
            f"clv.align: the CLVs use the run's tangents, which start at lyapunov.warmup="
            f"{ly.warmup}: align must be >= it (and a multiple of renorm_every={re} after "
            f"it), got {c.align}"
        )
    rest = cfg.steps - c.align - c.backward_transient
    n = c.steps or rest
    if rest < re:
        raise ConfigError(
            f"clv.align: the CLV window starts at clv.align={c.align} and needs "
            f"clv.backward_transient={c.backward_transient} steps after it, which leaves "
            f"no step of the run of {cfg.steps} steps; lower clv.align and "
            "clv.backward_transient, raise steps, or set clv.enabled=false"
        )
    if n < re or c.steps > rest:
        raise ConfigError(
            f"clv.steps: the CLV window (align {c.align} + steps {c.steps} + "
            f"backward_transient {c.backward_transient}) must fit in the run of "
            f"{cfg.steps} steps; at most {rest}, or 0 for the rest of the run"
        )
    if n % re or c.backward_transient % re:
        raise ConfigError(
            f"clv.steps: steps and backward_transient must be multiples of "
            f"lyapunov.renorm_every={re}"
        )
    if c.keep_every and (c.keep_every % cfg.record_every or c.keep_every % re):
        raise ConfigError(
            f"clv.keep_every: must be a multiple of record_every={cfg.record_every} and of "
            f"lyapunov.renorm_every={re}, got {c.keep_every}"
        )


def observers(cfg: BaseConfig, tmap) -> list:
    """The run's tangents (the one tracker the lyapunov and control stages share)."""
    return [tangent_tracker(cfg)]


def run(inputs: RunInputs) -> xr.Dataset:
    return clv_stage(inputs.cfg, inputs.tmap, inputs.batch, inputs.results)


def markdown(ds: xr.Dataset, report: ReportInputs) -> list[str]:
    return clv_markdown(ds)


def figures(ds: xr.Dataset, report: ReportInputs) -> None:
    clv_figures(ds, report.figures)


STAGE = Stage(
    "clv",
    enabled=lambda cfg: cfg.clv.enabled,
    run=run,
    markdown=markdown,
    figures=figures,
    observers=observers,
    validate=k_within_state("clv"),
    section=CLVConfig,
    check=check,
)
