"""What a stage is: :class:`Stage` (its declaration) and what its functions see
(:class:`RunInputs`, :class:`ReportInputs`). The registry is :mod:`chaosjax.experiments.stages`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import xarray as xr

from chaosjax.experiments._sections import BaseConfig, ConfigError


@dataclasses.dataclass(frozen=True)
class RunInputs:
    """What a stage's ``run`` sees: the config, the training map, the replica batch, the
    results of the run, the datasets of the stages that ran before it (by name), whether to
    show progress, and the run folder (for stages that checkpoint runs of their own)."""

    cfg: BaseConfig
    tmap: Any
    batch: Any
    results: Any
    groups: Mapping[str, xr.Dataset]
    progress: bool = False
    folder: Path | None = None


@dataclasses.dataclass(frozen=True)
class ReportInputs:
    """What a stage's ``markdown`` and ``figures`` see: the stored results, every stored stage
    dataset (by name), and the figures folder."""

    results: Any
    groups: Mapping[str, xr.Dataset]
    figures: Path


@dataclasses.dataclass(frozen=True)
class Stage:
    """One analysis of a run.

    Attributes:
        name: the zarr group, the key in ``inputs.groups`` and the config table of ``section``
            (an identifier).
        enabled: ``enabled(cfg) -> bool``.
        run: ``run(inputs: RunInputs) -> xarray.Dataset``.
        markdown: ``markdown(ds, report: ReportInputs) -> list[str]`` (lines of summary.md).
        figures: ``figures(ds, report) -> None``, writing PNGs into ``report.figures``.
        requires: stages that must be enabled and run first.
        observers: ``observers(cfg, tmap) -> list`` of observers this stage needs inside the run
            (the same observer asked for by two stages runs once).
        validate: ``validate(cfg, tmap)``, raising :class:`ConfigError` before the run folder
            is touched (the checks that need the training map).
        section: the frozen dataclass of the stage's config table ``[name]`` (fields made with
            :func:`~chaosjax.experiments._sections.fld`; its docstring is its one-line meaning),
            or None. Only the built-in stages' sections are tables of ``ExperimentConfig``,
            which is composed from them when :mod:`chaosjax.experiments.config` is imported.
        check: ``check(cfg)``, raising :class:`ConfigError`: the cross-checks between this
            stage's section and the rest of the config, run whenever a config is built.
    """

    name: str
    enabled: Callable[[BaseConfig], bool]
    run: Callable[[RunInputs], xr.Dataset]
    markdown: Callable[[xr.Dataset, ReportInputs], list[str]]
    figures: Callable[[xr.Dataset, ReportInputs], None] | None = None
    requires: tuple[str, ...] = ()
    observers: Callable[[BaseConfig, Any], list] | None = None
    validate: Callable[[BaseConfig, Any], None] | None = None
    section: type | None = None
    check: Callable[[BaseConfig], None] | None = None

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"name: a stage name must be an identifier, got {self.name!r}")
        for field in ("enabled", "run", "markdown"):
            if not callable(getattr(self, field)):
                raise TypeError(f"{field}: stage {self.name!r} needs a callable")
        if self.section is not None and not dataclasses.is_dataclass(self.section):
            raise TypeError(f"section: stage {self.name!r} needs a dataclass, got {self.section!r}")


# ---------------------------------------------------------------------------------------------
# map checks that several stages share


def k_within_state(name: str) -> Callable[[BaseConfig, Any], None]:
    """``validate``: ``cfg.<name>.k`` (tangent directions) fits in the state dimension."""

    def validate(cfg, tmap):
        k = getattr(cfg, name).k
        if k > tmap.dim:
            raise ConfigError(f"{name}.k: must be <= the state dimension {tmap.dim}, got {k}")

    return validate


def needs_loss_fn(name: str) -> Callable[[BaseConfig, Any], None]:
    """``validate``: the map has the ``loss_fn(params, batch)`` the Hessian is taken of."""

    def validate(cfg, tmap):
        if not getattr(tmap, "_loss_fn", True):
            raise ConfigError(
                f"{name}.enabled: the Hessian needs loss_fn(params, batch) from "
                f"step.factory; return it or set {name}.enabled = false"
            )

    return validate


__all__ = ["ReportInputs", "RunInputs", "Stage", "k_within_state", "needs_loss_fn"]
