"""The ``marginal`` stage: each reference run's recorded state ``before_end`` steps before the
end, perturbed and trained on next to an unperturbed continuation (the numbers:
:mod:`chaosjax.experiments.danovski`)."""

from __future__ import annotations

import dataclasses

import xarray as xr

from chaosjax.experiments._sections import BaseConfig, ConfigError, fld
from chaosjax.experiments.danovski import marginal_markdown, marginal_snapshots, marginal_stage
from chaosjax.experiments.stages.base import ReportInputs, RunInputs, Stage


@dataclasses.dataclass(frozen=True)
class MarginalConfig:
    """marginal-stability test"""

    enabled: bool = fld(
        False, "perturb each reference run's state `before_end` steps before the end"
    )
    before_end: int = fld(1000, "steps before the end where the perturbation is applied", lo=1)
    eps: tuple[float, ...] = fld([1e-12, 1e-8, 1e-4], "perturbation sizes", positive=True)
    n_perturbed: int = fld(5, "perturbed copies per ε", lo=1)


def check(cfg: BaseConfig) -> None:
    if cfg.marginal.enabled and cfg.marginal.before_end >= cfg.steps:
        raise ConfigError(
            f"marginal.before_end: must be < steps={cfg.steps}, got {cfg.marginal.before_end}"
        )


def observers(cfg: BaseConfig, tmap) -> list:
    """The state of each reference run where the test perturbs it (of the recorded run)."""
    return [marginal_snapshots(cfg)]


def run(inputs: RunInputs) -> xr.Dataset:
    i = inputs
    return marginal_stage(i.cfg, i.tmap, i.batch, i.results, i.progress)


def markdown(ds: xr.Dataset, report: ReportInputs) -> list[str]:
    return marginal_markdown(ds)


STAGE = Stage(
    "marginal",
    enabled=lambda cfg: cfg.marginal.enabled,
    run=run,
    markdown=markdown,
    observers=observers,
    section=MarginalConfig,
    check=check,
)
