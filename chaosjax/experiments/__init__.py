"""Experiments: typed TOML configs, presets and the runner behind ``chaosjax run``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from chaosjax.experiments.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    from_dict,
    load_file,
    parse_toml,
    to_toml,
)
from chaosjax.experiments.runner import Run, RunFolderError, report, run_experiment

DEFAULT_PRESET = "quickstart"


def preset_names() -> list[str]:
    folder = resources.files("chaosjax.experiments").joinpath("presets")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def preset_dict(name: str) -> dict:
    names = preset_names()
    if name not in names:
        raise ConfigError(f"preset: unknown {name!r}; allowed: {', '.join(names)}")
    text = resources.files("chaosjax.experiments").joinpath(f"presets/{name}.toml").read_text()
    return parse_toml(text, f"preset {name}")


def load_config(target: str | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """The config of a preset name or a TOML file path, with ``a.b=value`` overrides applied."""
    target = target or DEFAULT_PRESET
    if target.endswith(".toml") or Path(target).exists():
        data = load_file(target)
    else:
        data = preset_dict(target)
    return from_dict(ExperimentConfig, apply_overrides(data, list(overrides or [])))


__all__ = [
    "DEFAULT_PRESET",
    "ConfigError",
    "ExperimentConfig",
    "Run",
    "RunFolderError",
    "load_config",
    "preset_dict",
    "preset_names",
    "report",
    "run_experiment",
    "to_toml",
]
