"""Typed, frozen experiment configs read from TOML, with ``--set a.b=value`` overrides.

Every field has a default, a one-line meaning and validation; errors name the field and what
is allowed (:class:`ConfigError`, a ``ValueError``).

Length: every field of every section, with its help text, bounds and allowed values, is
declared here once; the config reference and ``chaosjax config`` are generated from it.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

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
    name: str = fld(
        "two_moons",
        "dataset",
        choices=(
            "iris",
            "digits",
            "two_moons",
            "circles",
            "blobs",
            "teacher_student",
            "chebyshev",
            "modular_addition",
            "one_point",
        ),
    )
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
    activation: str = fld(
        "tanh",
        "hidden activation",
        choices=("tanh", "relu", "sigmoid", "gelu", "silu", "elu", "softplus", "identity"),
    )
    init: tuple[str, ...] = fld(
        ["lecun"],
        "weight init per layer (one value: all layers): N(0, s²/fan_in), He, Xavier, N(0, s²) or U(±s/√fan_in)",
        choices=("lecun", "he", "xavier", "normal", "uniform"),
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
    loss: str = fld(
        "mse", "loss: ½‖f−y‖² mean or softmax cross-entropy", choices=("mse", "cross_entropy")
    )
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
class LyapunovConfig:
    enabled: bool = fld(True, "compute tangent-space exponents of each (seed, η) reference run")
    k: int = fld(4, "number of exponents (top-k spectrum)", lo=1)
    steps: int = fld(0, "accumulated steps from t = warmup; 0 = to the end of the run", lo=0)
    warmup: int = fld(0, "steps of the run before its tangents start", lo=0)
    renorm_every: int = fld(1, "steps between QR renormalisations", lo=1)
    ftle_window: int = fld(100, "window of the finite-time exponents (steps)", lo=1)
    period_window: int = fld(
        128,
        "last states of each reference run the period detector examines (regime labels "
        "periodic / frozen / dead plateau; at most the run's steps); 0 = off",
        lo=0,
    )
    fit_starts: tuple[int, ...] = fld(
        [0, 100, 5], "replica-distance fit: window starts range [first, last, stride]"
    )
    fit_widths: tuple[int, ...] = fld(
        [30, 100, 5], "replica-distance fit: window widths range [first, last, stride]"
    )


@dataclasses.dataclass(frozen=True)
class BifurcationConfig:
    enabled: bool = fld(
        False, "a bifurcation diagram over η from the first seed's initial state (one batched run)"
    )
    values: tuple[float, ...] = fld(
        [0.5, 1.5, 101], "the η grid: [first, last, count], evenly spaced", positive=True
    )
    steps: int = fld(2000, "steps of the diagram's run per η", lo=2)
    n_samples: int = fld(64, "attractor samples kept per η (the loss)", lo=2)
    max_period: int = fld(16, "largest period detected", lo=1)
    refine_tol: float = fld(1e-4, "width to which period changes are bisected", positive=True)


@dataclasses.dataclass(frozen=True)
class SeriesConfig:
    enabled: bool = fld(False, "loss-series diagnostics of each reference run (per seed)")
    start: int = fld(
        0, "first step of the window every loss-series diagnostic is computed on", lo=0
    )
    max_lag: int = fld(50, "largest ACF lag (records)", lo=1)
    n_surrogates: int = fld(
        1000, "shuffled surrogates of the ACF band (3rd–97th percentile)", lo=10
    )
    spike_factor: float = fld(2.0, "spike: loss above this × its running minimum", positive=True)
    laminar_min_length: int = fld(20, "shortest laminar phase (records)", lo=1)
    analogue_e: float = fld(5e-5, "analogue radius e of the expansion-rate method", positive=True)


@dataclasses.dataclass(frozen=True)
class DivergenceConfig:
    enabled: bool = fld(
        False, "best-window fits per (seed, η, ε) with Danovski et al.'s acceptance rule"
    )
    min_r2: float = fld(0.9, "accept a fit only with R² above this", lo=0.0, hi=1.0)
    min_slope: float = fld(0.05, "accept a fit only with a slope above this (per step)")
    histogram_eps: float = fld(1e-8, "ε whose slope histogram is drawn", positive=True)


@dataclasses.dataclass(frozen=True)
class MarginalConfig:
    enabled: bool = fld(
        False, "perturb each reference run's state `before_end` steps before the end"
    )
    before_end: int = fld(1000, "steps before the end where the perturbation is applied", lo=1)
    eps: tuple[float, ...] = fld([1e-12, 1e-8, 1e-4], "perturbation sizes", positive=True)
    n_perturbed: int = fld(5, "perturbed copies per ε", lo=1)


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    test_accuracy: float = fld(
        0.0, "report the first step each run reaches this test accuracy; 0 = off", lo=0.0, hi=1.0
    )


@dataclasses.dataclass(frozen=True)
class PredictionConfig:
    enabled: bool = fld(
        False, "correlate the early FTLE (lyapunov stage) with the final training loss across seeds"
    )


@dataclasses.dataclass(frozen=True)
class ResponseConfig:
    enabled: bool = fld(
        False, "track the empirical NTK of every replica (training response, aging)"
    )
    n_probes: int = fld(32, "training inputs the NTK is measured on", lo=2)
    fragility_eps: float = fld(
        1e-4, "perturbation size of the fragility probe at the end", positive=True
    )


@dataclasses.dataclass(frozen=True)
class InstabilityConfig:
    enabled: bool = fld(False, "per-layer separation of perturbed replicas and phases of training")
    separation_factor: float = fld(
        10.0, "a layer has separated when its distance exceeds this × its start", positive=True
    )
    reconverge_fraction: float = fld(
        0.5,
        "a layer has re-converged when its final distance is below this × its peak",
        positive=True,
    )


@dataclasses.dataclass(frozen=True)
class LandscapeConfig:
    enabled: bool = fld(
        False,
        "loss slices at the end of each reference run: along the top Hessian eigenvector and on the trajectory's principal plane",
    )
    num: int = fld(81, "points of the 1-D slice", lo=3)
    num_2d: int = fld(41, "points per axis of the 2-D slice", lo=3)
    snapshots: int = fld(100, "recorded states of each reference run kept for its plane", lo=3)
    n_matvecs: int = fld(64, "Lanczos steps of the top eigenvector at the end", lo=2)


@dataclasses.dataclass(frozen=True)
class GrokkingConfig:
    enabled: bool = fld(
        False,
        "does the jump in test accuracy (grokking) coincide with loss spikes, sharpness crossings and positive FTLEs",
    )
    accuracy: float = fld(
        0.9, "a run groks when its test accuracy first reaches this", lo=0.0, hi=1.0
    )
    window: int = fld(
        0, "steps before the jump searched for each indicator; 0 = a tenth of the run", lo=0
    )
    spike_factor: float = fld(
        2.0,
        "a loss spike: training loss above this × its minimum over spike_lookback records",
        lo=1.0,
    )
    spike_lookback: int = fld(
        5, "records before a point that a loss spike is measured against", lo=1
    )
    layer: str = fld(
        "", "the layer whose norm is reported; '' = 'head' if the model has one, else its last"
    )


@dataclasses.dataclass(frozen=True)
class CurvatureConfig:
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


@dataclasses.dataclass(frozen=True)
class CLVConfig:
    enabled: bool = fld(False, "compute covariant Lyapunov vectors of each (seed, η) reference run")
    k: int = fld(4, "number of covariant vectors", lo=1)
    steps: int = fld(
        0,
        "steps over which CLVs are computed, from t = align; 0 = the rest of the run before the backward transient",
        lo=0,
    )
    align: int = fld(
        100,
        "start of the kept range: the run's tangents (lyapunov.renorm_every) align until then; a multiple of record_every, >= lyapunov.warmup",
        lo=0,
    )
    backward_transient: int = fld(
        200, "steps of the run after the kept range, iterated backwards to converge the CLVs", lo=0
    )
    keep_every: int = fld(
        0,
        "store vectors every this many steps (a multiple of record_every); 0 = about 10 evenly spaced records",
        lo=0,
    )
    tangency_deg: float = fld(
        1.0, "angles below this (degrees) count as near-tangencies", positive=True
    )


@dataclasses.dataclass(frozen=True)
class ControlConfig:
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


#: renamed fields: their old names still work for one release (with a DeprecationWarning)
RENAMED_FIELDS = {
    "landscape.num_matvecs": "landscape.n_matvecs",
    "curvature.num_blocks": "curvature.n_blocks",
}


def _renamed(data: dict[str, Any], prefix: str) -> dict[str, Any]:
    from chaosjax._util import warn_renamed

    out = dict(data)
    for old, new in RENAMED_FIELDS.items():
        section, _, key = old.rpartition(".")
        if prefix != (section + "." if section else "") or key not in out:
            continue
        new_key = new.rpartition(".")[2]
        if new_key in out:
            raise ConfigError(f"{new}: given twice (also as its old name {old})")
        warn_renamed(old, new, stacklevel=4)
        out[new_key] = out.pop(key)
    return out


def from_dict(cls, data: dict[str, Any], prefix: str = ""):
    """Build config ``cls`` from a (TOML) dict, validating every key and value (old names of
    renamed fields, :data:`RENAMED_FIELDS`, are accepted for one release)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table, got {data!r}")
    data = _renamed(data, prefix)
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
