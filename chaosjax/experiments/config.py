"""Typed, frozen experiment configs read from TOML, with ``--set a.b=value`` overrides.

Every field has a default, a one-line meaning and validation; errors name the field and what
is allowed (:class:`ConfigError`, a ``ValueError``). The sections live in
:mod:`chaosjax.experiments._sections`; the cross-checks between them and the TOML round trip here.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from chaosjax.experiments._sections import (
    BifurcationConfig,
    CLVConfig,
    ConfigError,
    ControlConfig,
    CurvatureConfig,
    DataConfig,
    DivergenceConfig,
    GrokkingConfig,
    InstabilityConfig,
    LandscapeConfig,
    LyapunovConfig,
    MarginalConfig,
    ModelConfig,
    OptimizerConfig,
    PredictionConfig,
    ReplicaConfig,
    ResponseConfig,
    ScaleConfig,
    SeriesConfig,
    StepConfig,
    TargetConfig,
    TrainingConfig,
    fld,
    section,
)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    name: str = fld("custom", "experiment name")
    description: str = fld("", "one-line description")
    runtime: str = fld("", "expected runtime on a 2-core CPU")
    size: str = fld(
        "",
        "a preset's named size (its [sizes.NAME] tables, e.g. 'gpu'); '' = the size that runs in minutes on a 2-core CPU",
    )
    precision: str = fld(
        "float64", "state dtype (float64 enables jax_enable_x64)", choices=("float32", "float64")
    )
    steps: int = fld(1000, "training steps", lo=1)
    record_every: int = fld(10, "record cadence (must divide steps)", lo=1)
    chunk_steps: int = fld(500, "steps per jitted chunk (checkpoint cadence)", lo=1)
    data: DataConfig = section(DataConfig, "dataset")
    model: ModelConfig = section(ModelConfig, "model")
    training: TrainingConfig = section(TrainingConfig, "loss and optimizer")
    optimizer: OptimizerConfig = section(OptimizerConfig, "your own optax transformation")
    step: StepConfig = section(StepConfig, "your own train step")
    replicas: ReplicaConfig = section(ReplicaConfig, "replica batch")
    lyapunov: LyapunovConfig = section(LyapunovConfig, "Lyapunov exponents")
    series: SeriesConfig = section(SeriesConfig, "loss-series diagnostics")
    bifurcation: BifurcationConfig = section(BifurcationConfig, "bifurcation diagram over η")
    divergence: DivergenceConfig = section(DivergenceConfig, "replica-divergence fits per ε")
    marginal: MarginalConfig = section(MarginalConfig, "marginal-stability test")
    target: TargetConfig = section(TargetConfig, "time to a target accuracy")
    prediction: PredictionConfig = section(PredictionConfig, "early FTLE against final loss")
    response: ResponseConfig = section(ResponseConfig, "training response (NTK)")
    instability: InstabilityConfig = section(InstabilityConfig, "instability metrics")
    grokking: GrokkingConfig = section(GrokkingConfig, "grokking against instability (slingshot)")
    landscape: LandscapeConfig = section(LandscapeConfig, "loss landscapes of the recorded runs")
    curvature: CurvatureConfig = section(CurvatureConfig, "curvature and the edge of stability")
    clv: CLVConfig = section(CLVConfig, "covariant Lyapunov vectors")
    control: ControlConfig = section(ControlConfig, "instability control against fixed η")
    scale: ScaleConfig = section(ScaleConfig, "devices and memory (processes: command-line flags)")

    def __post_init__(self):
        if self.steps % self.record_every:
            raise ConfigError(
                f"record_every: must divide steps={self.steps}, got {self.record_every}"
            )
        if self.record_every % self.replicas.distance_every:
            raise ConfigError(
                f"replicas.distance_every: must divide record_every={self.record_every}, got "
                f"{self.replicas.distance_every}"
            )
        ly = self.lyapunov
        n = ly.steps or self.steps
        if n % ly.renorm_every:
            raise ConfigError(
                f"lyapunov.renorm_every: must divide the Lyapunov steps ({n}), got {ly.renorm_every}"
            )
        if ly.ftle_window % ly.renorm_every:
            raise ConfigError(
                f"lyapunov.ftle_window: must be a multiple of renorm_every={ly.renorm_every}"
            )
        bf = self.bifurcation
        if bf.enabled and (len(bf.values) != 3 or int(bf.values[2]) != bf.values[2]
                           or bf.values[2] < 2 or not bf.values[0] < bf.values[1]):  # fmt: skip
            raise ConfigError(
                f"bifurcation.values: expected [first, last, count] with first < last and an "
                f"integer count >= 2, got {list(bf.values)}"
            )
        if bf.enabled and bf.n_samples * bf.max_period > bf.steps:
            raise ConfigError(
                f"bifurcation.steps: must hold n_samples·max_period = "
                f"{bf.n_samples * bf.max_period} steps (the sampled window), got {bf.steps}"
            )
        if ly.period_window == 1:
            raise ConfigError("lyapunov.period_window: must be 0 (off) or >= 2, got 1")
        if self.marginal.enabled and self.marginal.before_end >= self.steps:
            raise ConfigError(
                f"marginal.before_end: must be < steps={self.steps}, got {self.marginal.before_end}"
            )
        if self.instability.enabled and not self.lyapunov.enabled:
            raise ConfigError(
                "instability.enabled: needs lyapunov.enabled = true (the FTLE phases)"
            )
        self._check_factories()
        if self.grokking.enabled and self.step.factory:
            raise ConfigError(
                "grokking.enabled: needs train and test accuracy of a model with a forward pass; "
                "a step.factory has none"
            )
        if self.control.enabled:
            if self.training.optimizer not in ("sgd", "momentum", "nesterov"):
                raise ConfigError(
                    "control.enabled: the comparison runs need training.optimizer sgd, momentum "
                    f"or nesterov (their curvature is the Hessian), got {self.training.optimizer!r}"
                )
            if not self.curvature.enabled:
                raise ConfigError(
                    "control.enabled: needs curvature.enabled = true (sharpness of every run)"
                )
            if not (self.control.margins or self.control.ftle_targets):
                raise ConfigError("control.margins: give margins or ftle_targets to compare")
            if self.training.schedule != "constant":
                raise ConfigError(
                    "control.enabled: needs training.schedule = 'constant' (the controllers set η)"
                )
        self._check_tangent_windows()
        if self.prediction.enabled and not self.lyapunov.enabled:
            raise ConfigError("prediction.enabled: needs lyapunov.enabled = true (the early FTLE)")
        for name in ("fit_starts", "fit_widths"):
            r = getattr(ly, name)
            if len(r) != 3 or r[2] < 1 or r[1] < r[0] or r[0] < 0:
                raise ConfigError(
                    f"lyapunov.{name}: expected [first, last, stride] with 0 <= first <= last and "
                    f"stride >= 1, got {list(r)}"
                )

    def _check_factories(self):
        """Your model, optimizer and train step: what each replaces and what it excludes."""
        if self.step.factory:
            if self.model.factory:
                raise ConfigError(
                    "model.factory: a step.factory brings its own model; set one of the two"
                )
            if self.optimizer.factory:
                raise ConfigError(
                    "optimizer.factory: a step.factory brings its own optimizer; set one of the two"
                )
            if self.response.enabled:
                raise ConfigError(
                    "response.enabled: the NTK needs the model's forward pass, which a "
                    "step.factory does not expose; set response.enabled = false"
                )
            if self.curvature.mode == "subset":
                raise ConfigError(
                    "curvature.mode: a step.factory's loss takes its own batches: full or batch, "
                    "got 'subset'"
                )
        if (self.optimizer.factory or self.step.factory) and self.control.enabled:
            raise ConfigError(
                "control.enabled: the controllers drive a registry optimizer "
                "(training.optimizer), not optimizer.factory or step.factory"
            )

    def _check_tangent_windows(self):
        """The Lyapunov, CLV and control windows lie inside the one run, on its records."""
        ly, c, ctl = self.lyapunov, self.clv, self.control
        if ly.enabled and ly.warmup + ly.renorm_every > self.steps:
            raise ConfigError(
                f"lyapunov.warmup: leaves no renormalisation in the run of {self.steps} steps, "
                f"got {ly.warmup}"
            )
        if ly.enabled and ly.steps and ly.warmup + ly.steps > self.steps:
            raise ConfigError(
                f"lyapunov.steps: warmup {ly.warmup} + steps {ly.steps} end after the run "
                f"({self.steps} steps)"
            )
        if ctl.enabled and ly.enabled and ly.warmup > self.steps - ctl.lyapunov_steps:
            raise ConfigError(
                f"control.lyapunov_steps: λ1 over the last {ctl.lyapunov_steps} steps needs "
                f"lyapunov.warmup <= {self.steps - ctl.lyapunov_steps}, got {ly.warmup}"
            )
        if ctl.enabled and ctl.lyapunov_steps > self.steps:
            raise ConfigError(
                f"control.lyapunov_steps: must be <= steps={self.steps}, got {ctl.lyapunov_steps}"
            )
        if not c.enabled:
            return
        re = ly.renorm_every
        if c.align % self.record_every:
            raise ConfigError(
                f"clv.align: the kept range starts on a record: a multiple of record_every="
                f"{self.record_every}, got {c.align}"
            )
        if ly.enabled and (c.align < ly.warmup or (c.align - ly.warmup) % re):
            raise ConfigError(
                f"clv.align: the CLVs use the run's tangents, which start at lyapunov.warmup="
                f"{ly.warmup}: align must be >= it (and a multiple of renorm_every={re} after "
                f"it), got {c.align}"
            )
        rest = self.steps - c.align - c.backward_transient
        n = c.steps or rest
        if rest < re:
            raise ConfigError(
                f"clv.align: the CLV window starts at clv.align={c.align} and needs "
                f"clv.backward_transient={c.backward_transient} steps after it, which leaves "
                f"no step of the run of {self.steps} steps; lower clv.align and "
                "clv.backward_transient, raise steps, or set clv.enabled=false"
            )
        if n < re or c.steps > rest:
            raise ConfigError(
                f"clv.steps: the CLV window (align {c.align} + steps {c.steps} + "
                f"backward_transient {c.backward_transient}) must fit in the run of "
                f"{self.steps} steps; at most {rest}, or 0 for the rest of the run"
            )
        if n % re or c.backward_transient % re:
            raise ConfigError(
                f"clv.steps: steps and backward_transient must be multiples of "
                f"lyapunov.renorm_every={re}"
            )
        if c.keep_every and (c.keep_every % self.record_every or c.keep_every % re):
            raise ConfigError(
                f"clv.keep_every: must be a multiple of record_every={self.record_every} and of "
                f"lyapunov.renorm_every={re}, got {c.keep_every}"
            )


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
    "CLVConfig",
    "ConfigError",
    "CurvatureConfig",
    "DataConfig",
    "DivergenceConfig",
    "ExperimentConfig",
    "GrokkingConfig",
    "InstabilityConfig",
    "LandscapeConfig",
    "LyapunovConfig",
    "MarginalConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PredictionConfig",
    "ReplicaConfig",
    "ResponseConfig",
    "SeriesConfig",
    "StepConfig",
    "TargetConfig",
    "TrainingConfig",
    "apply_overrides",
    "describe",
    "from_dict",
    "load_file",
    "parse_toml",
    "to_dict",
    "to_toml",
]
