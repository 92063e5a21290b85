"""The ``curvature`` stage: the top Hessian eigenvalues of every replica at each record
(tracked inside the run), the edge-of-stability verdict, trace and spectral density (the
numbers: :mod:`chaosjax.experiments._curvature_stage`)."""

from __future__ import annotations

import dataclasses

import xarray as xr

from chaosjax.experiments._curvature_stage import (
    curvature_figures,
    curvature_markdown,
    curvature_stage,
    curvature_tracker,
)
from chaosjax.experiments._sections import BaseConfig, ConfigError, fld
from chaosjax.experiments.stages.base import ReportInputs, RunInputs, Stage, needs_loss_fn


@dataclasses.dataclass(frozen=True)
class CurvatureConfig:
    """curvature and the edge of stability"""

    enabled: bool = fld(True, "track the top Hessian eigenvalues of every replica at each record")
    k: int = fld(2, "tracked eigenpairs", lo=1)
    operator: str = fld(
        "auto",
        "operator (auto: preconditioned for Adam/RMSProp)",
        choices=("auto", "hessian", "preconditioned"),
    )
    mode: str = fld("full", "loss of the curvature", choices=("full", "subset", "batch"))
    subset: int = fld(
        0, "examples of the 'subset' mode (first n of the training set); 0 = all", lo=0
    )
    n_blocks: int = fld(2, "warm-start Krylov blocks per record", lo=1)
    cold_matvecs: int = fld(64, "Lanczos steps of the first record", lo=2)
    tol: float = fld(
        1e-3,
        "relative eigen-residual a sharpness record must reach to count as converged",
        positive=True,
        hi=0.5,
    )
    max_matvecs: int = fld(
        512, "cap on Hessian-vector products per record and replica (restarts until tol)", lo=1
    )
    restart_blocks: int = fld(8, "Krylov blocks of each restart of an unconverged record", lo=1)
    trace_probes: int = fld(
        30, "Hutchinson probes of the trace at the start and end; 0 = off", lo=0
    )
    density_matvecs: int = fld(
        40, "Lanczos steps per SLQ run of the spectral density; 0 = off", lo=0
    )
    density_runs: int = fld(4, "SLQ runs", lo=1)


def check(cfg: BaseConfig) -> None:
    """A step.factory's loss takes its own batches: no 'subset' mode."""
    if cfg.step.factory and cfg.curvature.mode == "subset":
        raise ConfigError(
            "curvature.mode: a step.factory's loss takes its own batches: full or batch, "
            "got 'subset'"
        )


def observers(cfg: BaseConfig, tmap) -> list:
    return [curvature_tracker(cfg)]


def run(inputs: RunInputs) -> xr.Dataset:
    return curvature_stage(inputs.cfg, inputs.tmap, inputs.batch, inputs.results)


def markdown(ds: xr.Dataset, report: ReportInputs) -> list[str]:
    if "sharpness" not in report.results.records:
        return []
    return curvature_markdown(ds, report.results, report.groups.get("lyapunov"))


def figures(ds: xr.Dataset, report: ReportInputs) -> None:
    if "sharpness" in report.results.records:
        curvature_figures(ds, report.results, report.figures)


STAGE = Stage(
    "curvature",
    enabled=lambda cfg: cfg.curvature.enabled,
    run=run,
    markdown=markdown,
    figures=figures,
    observers=observers,
    validate=needs_loss_fn("curvature"),
    section=CurvatureConfig,
    check=check,
)
