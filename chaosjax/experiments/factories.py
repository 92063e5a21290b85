"""Your own model, optimizer and train step from a config: ``"package.module:function"`` or
``"./file.py:function"`` references, loaded and checked with one-line errors naming the field.

A factory is called with the keyword arguments it accepts among those chaosjax offers (a
``**kwargs`` factory receives all of them):

- ``model.factory``: ``rngs`` (``nnx.Rngs`` of the seed), ``key`` (a PRNG key of the seed),
  ``dataset`` (the :class:`~chaosjax.datasets.Dataset`), ``dtype``, ``n_features``,
  ``n_outputs``, ``input_shape``; returns an ``nnx.Module`` or ``(apply_fn, params)``.
- ``optimizer.factory``: ``learning_rate`` (each value of ``training.learning_rates``; taken
  inside the run, so a grid vmaps), ``steps`` (the run length, for schedules); returns an
  optax ``GradientTransformation``.
- ``step.factory``: ``dataset``, ``dtype``, ``key``, ``seed``, ``learning_rate``, ``steps``;
  returns a dict with ``train_step``, ``state`` and ``batch_fn`` (and optionally ``loss_fn``,
  ``params``, ``init_fn``, ``eval_batch``, ``test_batch``, ``data``, ``optimizer_kind``,
  ``hparams``) — the arguments of :meth:`chaosjax.TrainingMap.from_step` — or a ready
  :class:`chaosjax.StepMap`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chaosjax._util import one_line
from chaosjax.experiments._sections import ConfigError

STEP_KEYS = (
    "train_step",
    "state",
    "batch_fn",
    "loss_fn",
    "params",
    "init_fn",
    "eval_batch",
    "test_batch",
    "data",
    "optimizer_kind",
    "learning_rate",
    "hparams",
    "carried",
    "name",
)


def load_reference(ref: str, field: str) -> Callable:
    """The callable named by ``"package.module:function"`` or ``"path/to/file.py:function"``
    (a relative path is taken from the current directory).

    Raises:
        ConfigError naming ``field`` when the reference is malformed, the module or file cannot
        be imported, or the attribute is missing or not callable.
    """
    form = "'package.module:function' or './file.py:function'"
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise ConfigError(f"{field}: expected {form}, got {ref!r}")
    where, attr = (s.strip() for s in ref.split(":"))
    if not where or not attr or not attr.replace(".", "_").isidentifier():
        raise ConfigError(f"{field}: expected {form}, got {ref!r}")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser()
        if not path.is_file():
            raise ConfigError(f"{field}: no such file {path}")
        name = f"chaosjax_user_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(name, None)
            raise ConfigError(f"{field}: importing {path} failed ({one_line(e)})") from e
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ConfigError(f"{field}: cannot import module {where!r} ({one_line(e)})") from e
        except Exception as e:
            raise ConfigError(f"{field}: importing {where!r} failed ({one_line(e)})") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{field}: {where!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{field}: {ref!r} is a {type(obj).__name__}, not a callable")
    return obj


def call_factory(fn: Callable, field: str, offered: dict[str, Any]) -> Any:
    """``fn`` called with the keyword arguments it accepts among ``offered``; a required
    argument chaosjax cannot give, or an exception inside ``fn``, is one ConfigError line."""
    name = getattr(fn, "__name__", "factory")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    kwargs = dict(offered)
    if sig is not None:
        params = sig.parameters.values()
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            accepted = {
                p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            }
            kwargs = {k: v for k, v in offered.items() if k in accepted}
        missing = [
            p.name
            for p in params
            if p.default is p.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and p.name not in kwargs
        ]
        if missing:
            raise ConfigError(
                f"{field}: {name}() needs argument {missing[0]!r}, which chaosjax cannot give; "
                f"it offers: {', '.join(offered)}"
            )
    try:
        return fn(**kwargs)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{field}: {name}() failed ({one_line(e)})") from e


def model_offer(ds, dtype, seed_key) -> dict[str, Any]:
    """The keyword arguments a model factory may take, for one seed's key."""
    from flax import nnx

    return {
        "rngs": nnx.Rngs(seed_key),
        "key": seed_key,
        "dataset": ds,
        "dtype": dtype,
        "n_features": ds.n_features,
        "n_outputs": ds.n_outputs,
        "input_shape": ds.input_shape,
    }


def user_model(fn: Callable, ds, dtype, key) -> tuple[str, Any]:
    """``("nnx", module)`` or ``("apply", (apply_fn, params))`` from a model factory."""
    from flax import nnx

    out = call_factory(fn, "model.factory", model_offer(ds, dtype, key))
    if isinstance(out, nnx.Module):
        return "nnx", out
    if isinstance(out, tuple) and len(out) == 2 and callable(out[0]):
        return "apply", out
    raise ConfigError(
        f"model.factory: {getattr(fn, '__name__', 'factory')}() returned "
        f"{type(out).__name__}; expected an nnx.Module or (apply_fn, params)"
    )


def user_optimizer(fn: Callable, steps: int) -> tuple[Callable, bool]:
    """``(make(**hparams) -> GradientTransformation, takes_learning_rate)`` of an optimizer
    factory, its return type checked once."""
    import optax

    probe = {"learning_rate": 1e-3, "steps": steps}
    out = call_factory(fn, "optimizer.factory", probe)
    if not isinstance(out, optax.GradientTransformation):
        raise ConfigError(
            f"optimizer.factory: {getattr(fn, '__name__', 'factory')}() returned "
            f"{type(out).__name__}; expected an optax GradientTransformation"
        )
    accepted = _accepted(fn)
    takes_lr = accepted is None or "learning_rate" in accepted
    fixed = {"steps": steps} if accepted is None or "steps" in accepted else {}

    def make(**hparams):
        return fn(**fixed, **hparams)

    make.__name__ = getattr(fn, "__name__", "custom")
    return make, takes_lr


def _accepted(fn) -> set[str] | None:
    """Keyword names ``fn`` takes (None: any)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def user_step(fn: Callable, offered: dict[str, Any]) -> dict[str, Any] | Any:
    """The from_step arguments (a dict) or a ready StepMap from a step factory."""
    from chaosjax.stepmap import StepMap

    out = call_factory(fn, "step.factory", offered)
    if isinstance(out, StepMap):
        return out
    if not isinstance(out, dict):
        raise ConfigError(
            f"step.factory: {getattr(fn, '__name__', 'factory')}() returned "
            f"{type(out).__name__}; expected a dict with train_step, state, batch_fn "
            "(and optionally loss_fn, params, ...) or a chaosjax.StepMap"
        )
    missing = [k for k in ("train_step", "state", "batch_fn") if k not in out]
    if missing:
        raise ConfigError(
            f"step.factory: the returned dict lacks {', '.join(missing)}; keys found: "
            f"{', '.join(sorted(out)) or 'none'}"
        )
    unknown = sorted(set(out) - set(STEP_KEYS))
    if unknown:
        raise ConfigError(
            f"step.factory: unknown keys {unknown} in the returned dict; allowed: "
            f"{', '.join(STEP_KEYS)}"
        )
    return out


__all__ = ["call_factory", "load_reference", "user_model", "user_optimizer", "user_step"]
