"""The ``control`` stage: the fixed learning rates against the sharpness-margin and FTLE
controllers of :mod:`chaosjax.control` on the same seeds (the numbers:
:mod:`chaosjax.experiments.controlled`)."""

from __future__ import annotations

import dataclasses

import xarray as xr

from chaosjax.experiments._sections import BaseConfig, ConfigError, fld
from chaosjax.experiments.analyses import tangent_tracker
from chaosjax.experiments.controlled import (
    build_controlled_maps,
    control_figures,
    control_markdown,
    control_stage,
)
from chaosjax.experiments.stages.base import ReportInputs, RunInputs, Stage


@dataclasses.dataclass(frozen=True)
class ControlConfig:
    """instability control against fixed η"""

    enabled: bool = fld(
        False,
        "compare the fixed learning rates with controlled runs (chaosjax.control) of the same seeds",
    )
    margins: tuple[float, ...] = fld(
        [0.5, 1.0, 1.5],
        "sharpness-margin controller: η·λmax as a fraction of the optimizer's threshold",
        positive=True,
    )
    ftle_targets: tuple[float, ...] = fld(
        [], "FTLE controller: running top exponent to hold (per step), e.g. 0.01"
    )
    every: int = fld(5, "sharpness controller: steps between estimates", lo=1)
    smoothing: float = fld(
        0.5,
        "sharpness controller: geometric step towards the target η (1 = jump)",
        positive=True,
        hi=1.0,
    )
    max_change: float = fld(2.0, "largest factor η may change by per update", lo=1.0)
    ftle_window: int = fld(
        50, "FTLE controller: averaging window and η update interval (steps)", lo=1
    )
    ftle_gain: float = fld(
        20.0, "FTLE controller: log-η change per unit exponent error", positive=True
    )
    initial_lr: float = fld(
        0.0, "initial η of the controlled runs; 0 = the smallest fixed η", lo=0.0
    )
    target_loss: float = fld(
        0.0, "regression: report the first step the test loss falls below this; 0 = off", lo=0.0
    )
    lyapunov_steps: int = fld(
        200, "λ1 over the last this many steps of every run (its own tangents)", lo=1
    )
    spike_factor: float = fld(2.0, "episodes: loss above this × its running minimum", lo=1.0)
    recover_factor: float = fld(
        1.1, "episodes: recovered when the loss is back within this × the baseline", lo=1.0
    )
    recovery: int = fld(
        0, "episodes: steps within which the loss must recover; 0 = a quarter of the run", lo=0
    )


def check(cfg: BaseConfig) -> None:
    """A registry optimizer whose curvature is the Hessian, a constant schedule, settings to
    compare, and λ1's window inside the run."""
    ctl, ly = cfg.control, cfg.lyapunov
    if not ctl.enabled:
        return
    if cfg.optimizer.factory or cfg.step.factory:
        raise ConfigError(
            "control.enabled: the controllers drive a registry optimizer "
            "(training.optimizer), not optimizer.factory or step.factory"
        )
    if cfg.training.optimizer not in ("sgd", "momentum", "nesterov"):
        raise ConfigError(
            "control.enabled: the comparison runs need training.optimizer sgd, momentum "
            f"or nesterov (their curvature is the Hessian), got {cfg.training.optimizer!r}"
        )
    if not cfg.curvature.enabled:
        raise ConfigError(
            "control.enabled: needs curvature.enabled = true (sharpness of every run)"
        )
    if not (ctl.margins or ctl.ftle_targets):
        raise ConfigError("control.margins: give margins or ftle_targets to compare")
    if cfg.training.schedule != "constant":
        raise ConfigError(
            "control.enabled: needs training.schedule = 'constant' (the controllers set η)"
        )
    if ly.enabled and ly.warmup > cfg.steps - ctl.lyapunov_steps:
        raise ConfigError(
            f"control.lyapunov_steps: λ1 over the last {ctl.lyapunov_steps} steps needs "
            f"lyapunov.warmup <= {cfg.steps - ctl.lyapunov_steps}, got {ly.warmup}"
        )
    if ctl.lyapunov_steps > cfg.steps:
        raise ConfigError(
            f"control.lyapunov_steps: must be <= steps={cfg.steps}, got {ctl.lyapunov_steps}"
        )


def validate(cfg: BaseConfig, tmap) -> None:
    """Build the controlled maps once: bad controller settings fail before the run folder is
    touched."""
    try:
        build_controlled_maps(cfg)
    except ValueError as e:
        raise ConfigError(f"control: {e}") from None


def observers(cfg: BaseConfig, tmap) -> list:
    """The run's tangents (λ1 over the last control.lyapunov_steps steps)."""
    return [tangent_tracker(cfg)]


def run(inputs: RunInputs) -> xr.Dataset:
    i = inputs
    return control_stage(i.cfg, i.tmap, i.batch, i.results, i.folder, i.progress)


def markdown(ds: xr.Dataset, report: ReportInputs) -> list[str]:
    return control_markdown(ds)


def figures(ds: xr.Dataset, report: ReportInputs) -> None:
    control_figures(ds, report.figures)


STAGE = Stage(
    "control",
    enabled=lambda cfg: cfg.control.enabled,
    run=run,
    markdown=markdown,
    figures=figures,
    requires=("curvature",),
    observers=observers,
    validate=validate,
    section=ControlConfig,
    check=check,
)
