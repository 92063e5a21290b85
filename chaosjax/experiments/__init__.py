"""Experiments: typed TOML configs, presets and the runner behind ``chaosjax run``.

The modules: :mod:`~chaosjax.experiments.plans` (preset or file → configs),
:mod:`~chaosjax.experiments.config` (``ExperimentConfig``, composed from the stages' sections),
:mod:`~chaosjax.experiments.stages` (one module per stage, and the registry),
:mod:`~chaosjax.experiments.builders` (config → training map) and
:mod:`~chaosjax.experiments.runner` (the run folder). No module of the package imports from
this one: it only gathers their names.
"""

from __future__ import annotations

from chaosjax.experiments.builders import build_dataset, build_training_map
from chaosjax.experiments.config import ConfigError, ExperimentConfig, to_toml
from chaosjax.experiments.plans import (
    DEFAULT_PRESET,
    load_config,
    load_plan,
    preset_dict,
    preset_names,
)
from chaosjax.experiments.runner import (
    Run,
    RunFolderError,
    report,
    run_experiment,
    run_plan,
)

__all__ = [
    "DEFAULT_PRESET",
    "ConfigError",
    "ExperimentConfig",
    "Run",
    "RunFolderError",
    "build_dataset",
    "build_training_map",
    "load_config",
    "load_plan",
    "preset_dict",
    "preset_names",
    "report",
    "run_experiment",
    "run_plan",
    "to_toml",
]
