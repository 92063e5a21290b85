"""Config → the objects of a run: precision, dataset, model, optimizer, the training map.

The runner, the controlled-instability stage and ``chaosjax report`` build from here; this
module imports neither a stage nor :mod:`~chaosjax.experiments.config` (which is composed from
the stages), so the control stage can build its maps here without an import cycle.
"""

from __future__ import annotations

import numpy as np

from chaosjax.experiments._sections import BaseConfig, ConfigError
from chaosjax.experiments.factories import load_reference, user_model, user_optimizer, user_step


def set_precision(precision: str) -> None:
    import jax

    if precision == "float64":
        jax.config.update("jax_enable_x64", True)


def build_dataset(cfg: BaseConfig):
    """The :class:`~chaosjax.datasets.Dataset` of a config's ``[data]`` section (a built-in
    dataset by name, or ``data.path``: your ``.npz``)."""
    from chaosjax import datasets

    d = cfg.data
    if d.path:
        try:
            return datasets.Dataset.from_npz(d.path)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
        except (ValueError, TypeError) as e:
            msg = str(e).splitlines()[0]
            raise ConfigError(msg if msg.startswith("data.path") else f"data.path: {msg}") from None
    common = {"seed": d.seed}
    if d.name == "iris":
        ds = datasets.iris(standardize=d.standardize, **common)
    elif d.name == "digits":
        ds = datasets.digits(standardize=d.standardize, test_fraction=d.test_fraction, **common)
    elif d.name == "chebyshev":
        ds = datasets.chebyshev(d.chebyshev_k, d.n_points)
    elif d.name == "one_point":
        ds = datasets.one_point()
    elif d.name == "modular_addition":
        if not 0.0 < d.test_fraction < 1.0:
            raise ConfigError(
                f"data.test_fraction: modular_addition needs a value in (0, 1), got {d.test_fraction}"
            )
        ds = datasets.modular_addition(d.modulus, train_fraction=1.0 - d.test_fraction, **common)
    elif d.name == "teacher_student":
        ds = datasets.teacher_student(
            d.n_samples, noise=d.noise, test_fraction=d.test_fraction, **common
        )
    elif d.name in ("two_moons", "circles", "blobs"):
        kw = {"noise": d.noise} if d.name != "blobs" else {}
        ds = datasets.load(
            d.name,
            n=d.n_samples,
            test_fraction=d.test_fraction,
            standardize=d.standardize,
            **kw,
            **common,
        )
    else:  # pragma: no cover - validated by the config
        raise ConfigError(f"data.name: unknown {d.name!r}")
    return ds


def _model_factory(cfg: BaseConfig, ds, dtype):
    """``factory(rngs) -> nnx.Module`` of a built-in ``model.kind``."""
    from chaosjax import models

    m = cfg.model
    n_out = ds.n_outputs
    token_ids = np.issubdtype(ds.x_train.dtype, np.integer)
    if token_ids != (m.kind == "transformer"):
        raise ConfigError(
            f"model.kind: {m.kind!r} does not fit {ds.name}'s inputs ("
            + ("integer token ids: use 'transformer'" if token_ids else "float features")
            + ")"
        )
    if m.kind == "mlp":
        widths = (ds.n_features, *m.hidden, n_out)

        def per_layer(values, name):
            n = len(widths) - 1
            if len(values) == 1:
                return values[0]
            if len(values) != n:
                raise ConfigError(
                    f"{name}: give one value or one per layer ({n}), got {list(values)}"
                )
            return tuple(values)

        init = per_layer(m.init, "model.init")
        init_scale = per_layer(m.init_scale, "model.init_scale")

        def factory(rngs):
            return models.MLP(
                widths,
                activation=m.activation,
                init=init,
                init_scale=init_scale,
                bias=m.bias,
                output_bias=m.output_bias,
                output_activation=m.output_activation,
                rngs=rngs,
                dtype=dtype,
            )

        return factory
    if m.kind == "transformer":
        if len(ds.input_shape) != 1:
            raise ConfigError(
                f"model.kind: 'transformer' needs token sequences (n, length), {ds.name} has "
                f"inputs of shape {ds.input_shape}"
            )
        if m.d_model % m.n_heads:
            raise ConfigError(f"model.n_heads: must divide d_model={m.d_model}, got {m.n_heads}")
        vocab = int(max(ds.x_train.max(), ds.x_test.max() if ds.has_test else 0)) + 1

        def factory(rngs):
            return models.Transformer(
                vocab,
                ds.input_shape[0],
                n_out,
                d_model=m.d_model,
                n_heads=m.n_heads,
                layers=m.layers,
                causal=m.causal,
                dropout=m.dropout,
                rngs=rngs,
                dtype=dtype,
            )

        return factory
    shape = ds.input_shape
    if len(shape) != 3:
        side = round(np.sqrt(ds.n_features))
        if side * side != ds.n_features:
            raise ConfigError(
                f"model.kind: {m.kind!r} needs images (n, H, W, C) or square single-channel "
                f"rows; {ds.name} has {ds.n_features} features"
            )
        shape = (side, side, 1)
    if m.kind == "cnn":

        def factory(rngs):
            return models.CNN(
                shape, n_out, channels=m.hidden, activation=m.activation, rngs=rngs, dtype=dtype
            )

        return factory

    def factory(rngs):
        return models.ResNet(
            shape,
            n_out,
            width=m.width,
            depth=m.depth,
            blocks_per_stage=m.blocks_per_stage,
            batch_norm=m.batch_norm,
            activation=m.activation,
            rngs=rngs,
            dtype=dtype,
        )

    return factory


def _step_map(cfg: BaseConfig, ds, dtype):
    """The :class:`~chaosjax.StepMap` of ``step.factory``."""
    import jax

    from chaosjax.training import TrainingMap

    fn = load_reference(cfg.step.factory, "step.factory")
    t = cfg.training
    data = {"x_train": ds.x_train, "y_train": ds.y_train, "x_test": ds.x_test, "y_test": ds.y_test}

    def offer(key):
        return {
            "dataset": ds,
            "dtype": dtype,
            "key": key,
            "learning_rate": t.learning_rates[0],
            "steps": cfg.steps,
        }

    out = user_step(fn, offer(jax.random.PRNGKey(cfg.replicas.seeds[0])))
    if not isinstance(out, dict):
        return out
    kwargs = {"data": data, "dtype": dtype, "name": cfg.name, **out}
    if "init_fn" not in kwargs:

        def init_fn(key):
            return user_step(fn, offer(key))["state"]

        kwargs["init_fn"] = init_fn
    train_step, state = kwargs.pop("train_step"), kwargs.pop("state")
    try:
        return TrainingMap.from_step(train_step, state, **kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"step.factory: {str(e).splitlines()[0]}") from e


def build_training_map(cfg: BaseConfig, ds=None, *, controller: str | None = None):
    """The :class:`TrainingMap` of a config (learning rate = the first grid value).

    ``model.factory``, ``optimizer.factory`` and ``step.factory`` bring your own model,
    optax transformation or train step (:mod:`chaosjax.experiments.factories`).
    ``controller="sharpness"`` or ``"ftle"``: the same network, data and seeds with the
    optimizer driven by :func:`chaosjax.control.sharpness_margin` / :func:`~chaosjax.control.ftle_target`
    (settings from ``[control]``; hyper-parameter ``margin`` / ``target``, vmappable)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from chaosjax.optimizers import OPTIMIZERS
    from chaosjax.training import TrainingMap

    ds = ds if ds is not None else build_dataset(cfg)
    dtype = jnp.float64 if cfg.precision == "float64" else jnp.float32
    if cfg.step.factory:
        return _step_map(cfg, ds, dtype)
    t = cfg.training
    key0 = jax.random.PRNGKey(cfg.replicas.seeds[0])
    if cfg.model.factory:
        user_fn = load_reference(cfg.model.factory, "model.factory")
        kind, model = user_model(user_fn, ds, dtype, key0)
        factory = None  # independent seeds call the factory with their key (init_fn below)
    else:
        factory = _model_factory(cfg, ds, dtype)
        kind, model = "nnx", factory(nnx.Rngs(key0))

    spec = OPTIMIZERS[t.optimizer]
    hparams = {k: getattr(t, k) for k in spec.defaults if k in _TRAINING_HPARAMS}
    schedule_options = {}
    if t.schedule == "step":
        if not t.drop_steps:
            raise ConfigError("training.drop_steps: a 'step' schedule needs at least one drop step")
        schedule_options = {"boundaries": list(t.drop_steps), "factor": t.drop_factor}
    elif t.schedule == "cosine":
        schedule_options = {"decay_steps": cfg.steps}
    optimizer, lr, name, schedule = t.optimizer, t.learning_rates[0], cfg.name, t.schedule
    kind_kw = {}
    if controller is not None:
        optimizer, hparams, lr = _controller(cfg, controller, hparams)
        schedule, schedule_options, name = "constant", {}, f"{cfg.name}/{controller}"
    elif cfg.optimizer.factory:
        user_tx = load_reference(cfg.optimizer.factory, "optimizer.factory")
        optimizer, takes_lr = user_optimizer(user_tx, cfg.steps)
        if not takes_lr:
            if len(t.learning_rates) > 1:
                raise ConfigError(
                    "training.learning_rates: a grid needs optimizer.factory to take "
                    "learning_rate; give one value"
                )
            lr = None
        hparams, schedule, schedule_options = {}, "constant", {}
        kind_kw = {"optimizer_kind": cfg.optimizer.kind or None}
    common = {
        "loss": t.loss,
        "optimizer": optimizer,
        "learning_rate": lr,
        "hparams": hparams,
        "schedule": schedule,
        "schedule_options": schedule_options,
        "batch_size": t.batch_size or None,
        "batch_seed": t.batch_seed,
        "dtype": dtype,
        "name": name,
        **kind_kw,
    }
    try:
        if kind == "nnx" and factory is not None:
            return TrainingMap.from_nnx(model, ds, model_factory=factory, **common)
        if kind == "nnx":
            from chaosjax import nnx_adapter

            def init_fn(key):
                fresh = user_model(user_fn, ds, dtype, key)[1]
                return nnx_adapter.init_params(lambda _: fresh, dtype, key)

            return TrainingMap.from_nnx(model, ds, init_fn=init_fn, **common)

        def init_fn(key):
            return user_model(user_fn, ds, dtype, key)[1][1]

        return TrainingMap(model[0], model[1], ds, init_fn=init_fn, **common)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        if not (cfg.model.factory or cfg.optimizer.factory):
            raise
        field = "model.factory" if cfg.model.factory else "optimizer.factory"
        raise ConfigError(f"{field}: {str(e).splitlines()[0]}") from e


# registry hyper-parameters the [training] section sets
_TRAINING_HPARAMS = ("momentum", "weight_decay", "b1", "b2")


def _controller(cfg: BaseConfig, kind: str, base_hparams: dict):
    """(optimizer factory, hyper-parameters, initial η) of a controlled run."""
    import functools

    from chaosjax import control

    c, t = cfg.control, cfg.training
    lr = c.initial_lr or min(t.learning_rates)
    common = {"optimizer": t.optimizer, "max_change": c.max_change}
    if kind == "sharpness":
        factory = functools.partial(
            control.sharpness_margin, every=c.every, smoothing=c.smoothing, **common
        )
        first = {"margin": (c.margins or [1.0])[0]}
    elif kind == "ftle":
        factory = functools.partial(
            control.ftle_target, window=c.ftle_window, gain=c.ftle_gain, **common
        )
        first = {"target": (c.ftle_targets or [0.0])[0]}
    else:
        raise ValueError(f"controller: unknown {kind!r}; allowed: sharpness, ftle")
    return factory, {**base_hparams, **first}, lr


__all__ = ["build_dataset", "build_training_map", "set_precision"]
