"""The sections of an experiment config: one frozen dataclass per TOML table, each field with
its default, one-line meaning and bounds (:func:`fld`); :class:`ConfigError` names the field.

:mod:`chaosjax.experiments.config` composes them into ``ExperimentConfig`` and re-exports them.
"""

from __future__ import annotations

import dataclasses

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
