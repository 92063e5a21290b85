"""Preset and TOML file → the runs of ``chaosjax run``: ``[variants.NAME]`` tables, ``[sizes.NAME]``
tables and ``--set a.b=value`` overrides, resolved into one :class:`ExperimentConfig` per run."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from chaosjax.experiments.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    from_dict,
    load_file,
    parse_toml,
)

DEFAULT_PRESET = "quickstart"


def preset_names() -> list[str]:
    """Names of the bundled presets (``chaosjax presets`` lists them with descriptions)."""
    folder = resources.files("chaosjax.experiments").joinpath("presets")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def preset_dict(name: str) -> dict:
    """The parsed TOML of preset ``name`` (a :class:`ConfigError` naming the allowed ones)."""
    names = preset_names()
    if name not in names:
        raise ConfigError(f"preset: unknown {name!r}; allowed: {', '.join(names)}")
    text = resources.files("chaosjax.experiments").joinpath(f"presets/{name}.toml").read_text()
    return parse_toml(text, f"preset {name}")


def _source(target: str | None) -> dict:
    target = target or DEFAULT_PRESET
    if target.endswith(".toml") or Path(target).is_file():
        return load_file(target)
    return preset_dict(target)  # a preset name, even where a folder of that name exists


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_plan(
    target: str | None = None,
    overrides: list[str] | None = None,
    variants: list[str] | None = None,
) -> list[tuple[str | None, ExperimentConfig]]:
    """The runs of a preset or TOML file: ``[(None, config)]``, or one ``(variant, config)``
    per ``[variants.NAME]`` table (merged over the base; overrides apply to every variant).

    ``size = "NAME"`` (in the file or as an override) merges the ``[sizes.NAME]`` table over
    every run (after its variant, before the overrides): a preset's larger size for a GPU.
    ``variants`` keeps only the named variants (in the preset's order)."""
    data = _source(target)
    chosen = variants
    variants = data.pop("variants", None)
    if chosen:
        known = list(variants or {})
        unknown = [v for v in chosen if v not in known]
        if unknown:
            raise ConfigError(
                f"--variant: unknown {unknown[0]!r}; allowed: "
                + (", ".join(known) if known else "none (this config has no variants)")
            )
        variants = {k: v for k, v in variants.items() if k in chosen}
    sizes = data.pop("sizes", None) or {}
    overrides = list(overrides or [])
    if not isinstance(sizes, dict) or not all(isinstance(v, dict) for v in sizes.values()):
        raise ConfigError("sizes: expected tables [sizes.NAME] of config overrides")
    size = apply_overrides(data, overrides).get("size", "")
    if size and size not in sizes:
        raise ConfigError(
            f"size: unknown {size!r}; allowed: "
            + (", ".join(sizes) if sizes else "none (this config has no [sizes] tables)")
        )
    sized = sizes.get(size, {}) if size else {}
    overrides = overrides + _restated_description(data, overrides)
    if not variants:
        merged = _merge(data, sized)
        return [(None, from_dict(ExperimentConfig, apply_overrides(merged, overrides)))]
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise ConfigError("variants: expected tables [variants.NAME] of config overrides")
    plan = []
    for name, extra in variants.items():
        merged = _merge(_merge(data, extra), sized)
        merged["name"] = f"{data.get('name', 'custom')}/{name}"
        try:
            plan.append((name, from_dict(ExperimentConfig, apply_overrides(merged, overrides))))
        except ConfigError as e:
            raise ConfigError(f"variant {name}: {e}") from None
    return plan


def _restated_description(data: dict, overrides: list[str]) -> list[str]:
    """A preset's prose describes its own values: after overrides of what it runs (anything
    but ``scale.*``, ``size`` and ``description``) it is replaced by a description that names
    the overrides, and the summary's "What was run" lines state the resolved values."""
    changed = [
        o
        for o in overrides
        if not o.split("=", 1)[0].strip().startswith(("scale.", "size", "description"))
    ]
    if not changed or any(o.split("=", 1)[0].strip() == "description" for o in overrides):
        return []
    text = (
        f"{data.get('name', 'config')} with --set {', '.join(changed)} (the preset's own "
        "description no longer applies; the resolved values are below)"
    )
    return [f"description={json.dumps(text)}"]


def load_config(target: str | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """The config of a preset name or a TOML file path, with ``a.b=value`` overrides applied
    (a preset with variants: use :func:`load_plan`)."""
    plan = load_plan(target, overrides)
    if len(plan) != 1 or plan[0][0] is not None:
        raise ConfigError(
            f"preset: {target!r} has variants ({', '.join(n for n, _ in plan)}); use load_plan"
        )
    return plan[0][1]


__all__ = ["DEFAULT_PRESET", "load_config", "load_plan", "preset_dict", "preset_names"]
