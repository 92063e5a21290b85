"""The core of an experiment config: :func:`fld` (a field with its default, one-line meaning and
bounds), :class:`ConfigError` (naming the field), the sections every run has (data, model,
training, optimizer, step, replicas, scale) and :class:`BaseConfig`, the top level without the
stages' sections.

Each stage declares its own section in its module (:mod:`chaosjax.experiments.stages`);
:mod:`chaosjax.experiments.config` composes ``ExperimentConfig`` from :class:`BaseConfig`, the
registered stages' sections and ``scale``. Choices that name a registry entry (datasets, losses,
activations, optimizers) are read from that registry.
"""

from __future__ import annotations

import dataclasses

from chaosjax.datasets import LOADERS
from chaosjax.losses import LOSSES
from chaosjax.models import ACTIVATIONS, INITS
from chaosjax.optimizers import OPTIMIZERS


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range."""


def fld(default, doc: str, *, choices=None, lo=None, hi=None, positive=False):
    """A config field with its documentation and bounds."""
    meta = {"doc": doc, "choices": choices, "lo": lo, "hi": hi, "positive": positive}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=tuple(default): d, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls, doc: str):
    """A nested config section with its documentation."""
    return dataclasses.field(default_factory=cls, metadata={"doc": doc})


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: str = fld("two_moons", "dataset", choices=tuple(LOADERS))
    path: str = fld(
        "",
        "your data: an .npz file with x_train, y_train (optional x_test, y_test); replaces name",
    )
    seed: int = fld(0, "seed of the train/test split and of generated data", lo=0)
    n_samples: int = fld(
        200, "samples of generated datasets (two_moons, circles, blobs, teacher_student)", lo=4
    )
    noise: float = fld(0.1, "noise of generated datasets", lo=0.0)
    test_fraction: float = fld(0.2, "held-out fraction (digits and generated sets)", lo=0.0, hi=1.0)
    standardize: bool = fld(False, "standardise inputs by the training mean and std")
    chebyshev_k: int = fld(3, "degree k of the Chebyshev target T_k", lo=0)
    n_points: int = fld(20, "training points of the Chebyshev toy", lo=2)
    modulus: int = fld(23, "p of modular_addition: (a + b) mod p as tokens [a, b, =]", lo=2)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    kind: str = fld("mlp", "network", choices=("mlp", "cnn", "resnet", "transformer"))
    factory: str = fld(
        "",
        "your model: 'package.module:function' or './file.py:function' taking any of rngs, key, dataset, dtype, n_features, n_outputs, input_shape and returning an nnx.Module or (apply_fn, params); replaces kind",
    )
    hidden: tuple[int, ...] = fld([32], "hidden widths (mlp) or conv channels (cnn)")
    activation: str = fld("tanh", "hidden activation", choices=tuple(ACTIVATIONS))
    init: tuple[str, ...] = fld(
        ["lecun"],
        "weight init per layer (one value: all layers): N(0, s²/fan_in), Xavier, He, N(0, s²) or U(±s/√fan_in)",
        choices=INITS,
    )
    init_scale: tuple[float, ...] = fld(
        [1.0], "init gain s per layer (one value: all layers)", positive=True
    )
    bias: bool = fld(True, "layers have biases (initialised to 0)")
    output_bias: bool = fld(True, "the output layer has a bias (mlp)")
    output_activation: str = fld(
        "identity",
        "output activation (mlp); tanh bounds the outputs",
        choices=("identity", "tanh", "sigmoid"),
    )
    width: int = fld(8, "channels of the first stage (resnet)", lo=1)
    depth: int = fld(2, "stages; the width doubles per stage (resnet)", lo=1)
    blocks_per_stage: int = fld(1, "residual blocks per stage (resnet)", lo=1)
    batch_norm: bool = fld(True, "BatchNorm after each convolution (resnet)")
    d_model: int = fld(32, "embedding width (transformer)", lo=1)
    n_heads: int = fld(4, "attention heads, dividing d_model (transformer)", lo=1)
    layers: int = fld(1, "attention blocks (transformer)", lo=1)
    causal: bool = fld(True, "causal attention mask (transformer)")
    dropout: float = fld(0.0, "dropout rate in training (transformer)", lo=0.0, hi=1.0)


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    loss: str = fld("mse", "loss: ½‖f−y‖² mean or softmax cross-entropy", choices=tuple(LOSSES))
    optimizer: str = fld("sgd", "optimizer", choices=tuple(OPTIMIZERS))
    weight_decay: float = fld(1e-4, "decoupled weight decay (adamw)", lo=0.0)
    b1: float = fld(0.9, "first-moment decay β1 (adam, adamw)", lo=0.0, hi=1.0)
    b2: float = fld(0.999, "second-moment decay β2 (adam, adamw)", lo=0.0, hi=1.0)
    learning_rates: tuple[float, ...] = fld(
        [0.1], "learning-rate grid η (one vmapped batch)", positive=True
    )
    momentum: float = fld(0.9, "momentum β (momentum / nesterov)", lo=0.0, hi=1.0)
    batch_size: int = fld(0, "minibatch size; 0 = full batch", lo=0)
    batch_seed: int = fld(0, "seed of the minibatch schedule fold_in(key, t)", lo=0)
    schedule: str = fld(
        "constant", "learning-rate schedule", choices=("constant", "cosine", "step")
    )
    drop_steps: tuple[int, ...] = fld(
        [], "steps at which a 'step' schedule multiplies η by drop_factor"
    )
    drop_factor: float = fld(0.1, "factor of a 'step' schedule", positive=True)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    factory: str = fld(
        "",
        "your optimizer: 'package.module:function' taking learning_rate (each value of training.learning_rates) and optionally steps, returning an optax GradientTransformation; replaces training.optimizer and schedule",
    )
    kind: str = fld(
        "",
        "the registry optimizer your factory builds, for its stability threshold; '' = none",
        choices=("", *OPTIMIZERS),
    )


@dataclasses.dataclass(frozen=True)
class StepConfig:
    factory: str = fld(
        "",
        "your train step: 'package.module:function' taking any of dataset, dtype, key, seed, learning_rate, steps and returning a dict of TrainingMap.from_step arguments (train_step, state, batch_fn, loss_fn, ...) or a StepMap; replaces model, training and optimizer",
    )


@dataclasses.dataclass(frozen=True)
class ReplicaConfig:
    seeds: tuple[int, ...] = fld([0, 1], "independent initialisations (one group each)")
    n_perturbed: int = fld(4, "perturbed replicas per group and ε", lo=0)
    eps: tuple[float, ...] = fld([1e-8], "perturbation sizes ε", positive=True)
    distribution: str = fld(
        "uniform", "U(−ε, ε) or N(0, ε²) entries", choices=("uniform", "gaussian")
    )
    target: str = fld("weights", "what is perturbed", choices=("weights", "params", "all"))
    loss_bound: float = fld(1e8, "a replica whose loss exceeds this has diverged", positive=True)
    distance_every: int = fld(
        1,
        "replica distances every this many steps (their own axis; a divisor of record_every): a fit of the separation needs at least 10 points per window",
        lo=1,
    )


@dataclasses.dataclass(frozen=True)
class ScaleConfig:
    devices: int = fld(
        0,
        "devices per process sharing the replica axis; 0 = every local accelerator (one CPU device)",
        lo=0,
    )
    memory_limit: str = fld(
        "", "device memory a run may use, e.g. '8GiB'; '' = 80% of each device's memory"
    )


@dataclasses.dataclass(frozen=True)
class BaseConfig:
    """The top level of every experiment config without the stages' sections.

    :mod:`chaosjax.experiments.config` composes ``ExperimentConfig`` from it: a subclass with one
    section per built-in stage and ``scale``. The stage modules, from which that class is
    built, annotate their configs with this base (they cannot import the composed class).
    """

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
    data: DataConfig = dataclasses.field(default_factory=DataConfig, metadata={"doc": "dataset"})
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig, metadata={"doc": "model"})
    training: TrainingConfig = dataclasses.field(
        default_factory=TrainingConfig, metadata={"doc": "loss and optimizer"}
    )
    optimizer: OptimizerConfig = dataclasses.field(
        default_factory=OptimizerConfig, metadata={"doc": "your own optax transformation"}
    )
    step: StepConfig = dataclasses.field(
        default_factory=StepConfig, metadata={"doc": "your own train step"}
    )
    replicas: ReplicaConfig = dataclasses.field(
        default_factory=ReplicaConfig, metadata={"doc": "replica batch"}
    )

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
        if self.step.factory and self.model.factory:
            raise ConfigError(
                "model.factory: a step.factory brings its own model; set one of the two"
            )
        if self.step.factory and self.optimizer.factory:
            raise ConfigError(
                "optimizer.factory: a step.factory brings its own optimizer; set one of the two"
            )


__all__ = [
    "BaseConfig",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ReplicaConfig",
    "ScaleConfig",
    "StepConfig",
    "TrainingConfig",
    "fld",
    "section",
]
