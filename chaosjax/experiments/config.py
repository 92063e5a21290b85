"""Typed, frozen experiment configs read from TOML, with ``--set a.b=value`` overrides.

Every field has a default, a one-line meaning and validation; errors name the field and what
is allowed (:class:`ConfigError`, a ``ValueError``). ``ExperimentConfig`` is composed here from
:class:`~chaosjax.experiments._sections.BaseConfig` (the core sections), the section of each
built-in stage (:data:`chaosjax.experiments.stages.BUILTIN_STAGES`, one module per stage with
its section and its checks) and ``scale``; the TOML round trip is here too.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chaosjax.experiments._sections import (
    BaseConfig,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    ReplicaConfig,
    ScaleConfig,
    StepConfig,
    TrainingConfig,
    section,
)
from chaosjax.experiments.stages import BUILTIN_STAGES, STAGES, Stage

#: where the stage tables of a written config stood before ``ExperimentConfig`` was composed
#: from the registry (whose order is the run order): run folders store the config text and
#: ``--resume`` compares it, so these tables keep their places; a new stage's table follows them
_STORED_ORDER = ("lyapunov", "series", "bifurcation", "divergence", "marginal", "target",
                 "prediction", "response", "instability", "grokking", "landscape", "curvature",
                 "clv", "control")  # fmt: skip


def config_class(stages: Sequence[Stage] = BUILTIN_STAGES, name: str = "ExperimentConfig"):
    """The frozen config dataclass of ``stages``: the fields of :class:`BaseConfig`, one table
    per stage with a ``section`` (named after the stage), then ``scale``.

    Building one runs the core checks, then the ``check`` of each of ``stages`` and of every
    stage in the registry (a registered stage replaces its namesake), in that order."""
    place = {n: i for i, n in enumerate(_STORED_ORDER)}
    tables = sorted(
        (s for s in stages if s.section is not None), key=lambda s: place.get(s.name, len(place))
    )
    fields = [(s.name, s.section, section(s.section, (s.section.__doc__ or "").strip()))
              for s in tables]  # fmt: skip
    doc = "devices and memory (processes: command-line flags)"
    fields.append(("scale", ScaleConfig, section(ScaleConfig, doc)))
    own = tuple(stages)

    def __post_init__(self):
        BaseConfig.__post_init__(self)
        checks = {s.name: s.check for s in own}
        checks.update((s.name, s.check) for s in STAGES.values())
        for check in checks.values():
            if check is not None:
                check(self)

    cls = dataclasses.make_dataclass(
        name,
        fields,
        bases=(BaseConfig,),
        frozen=True,
        namespace={
            "__post_init__": __post_init__,
            "__doc__": "A resolved experiment config: the core sections, one section per "
            "stage, then scale (see chaosjax.experiments.config.config_class).",
        },
    )
    cls.__module__ = __name__
    return cls


#: the config of ``chaosjax run``: the core sections and one table per built-in stage
ExperimentConfig = config_class()


# ---------------------------------------------------------------------------------------------
# dict <-> config


def _check_value(path: str, f: dataclasses.Field, tp, value):
    meta = f.metadata
    origin = typing.get_origin(tp)
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, list | tuple):
            value = [value]
        return tuple(_check_scalar(f"{path}[{i}]", meta, item_tp, v) for i, v in enumerate(value))
    return _check_scalar(path, meta, tp, value)


def _check_scalar(path, meta, tp, value):
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"{path}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{path}: unknown {value!r}; allowed: {', '.join(meta['choices'])}")
    if meta.get("positive") and not value > 0:
        raise ConfigError(f"{path}: must be > 0, got {value!r}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and value < lo:
        raise ConfigError(f"{path}: must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{path}: must be <= {hi}, got {value!r}")
    return value


def _resolve_type(cls, name):
    hints = typing.get_type_hints(cls)
    tp = hints[name]
    if isinstance(tp, types.UnionType):
        tp = typing.get_args(tp)[0]
    return tp


def from_dict(cls, data: dict[str, Any], prefix: str = ""):
    """Build config ``cls`` from a (TOML) dict, validating every key and value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix + unknown[0]
        raise ConfigError(
            f"{where}: unknown key; allowed in {prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        tp = _resolve_type(cls, name)
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(prefix + name, f, tp, value)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # pragma: no cover - defensive
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def to_dict(cfg) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = (
            to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
        )
    return out


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return (
            repr(v)
            if v == v and abs(v) != float("inf")
            else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
        )
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def to_toml(cfg) -> str:
    """The resolved config as TOML text (reads back to the same config)."""
    d = to_dict(cfg)
    lines, tables = [], []
    for k, v in d.items():
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def parse_toml(text: str, source: str = "config") -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML ({e})") from None


def load_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"config: cannot read {path} ({e.strerror or e})") from None
    return parse_toml(text, str(path))


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set: expected key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set: bad key in {item!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as TOML, else taken as strings)."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set: {'.'.join(path)}: {p} is not a table")
        node[path[-1]] = value
    return data


def describe(cls=ExperimentConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, meaning) for every field, for documentation and ``--help``."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = _resolve_type(cls, f.name)
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, prefix + f.name + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            doc = f.metadata.get("doc", "")
            if f.metadata.get("choices"):
                doc += f" ({' | '.join(f.metadata['choices'])})"
            rows.append((prefix + f.name, _toml_value(default), doc))
    return rows


__all__ = [
    "BaseConfig",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ReplicaConfig",
    "ScaleConfig",
    "StepConfig",
    "TrainingConfig",
    "apply_overrides",
    "config_class",
    "describe",
    "from_dict",
    "load_file",
    "parse_toml",
    "to_dict",
    "to_toml",
]
