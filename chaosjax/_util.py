"""Small shared helpers: traceable step functions, dtype checks, atomic files, environment info."""

from __future__ import annotations

import functools
import inspect
import json
import os
import platform
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial


def as_traceable(step: Callable) -> Partial:
    """Wrap ``step(x, t)`` as a :class:`jax.tree_util.Partial` whose array data are pytree leaves.

    A bound method of a registered pytree (``TrainingMap.step``, ``systems.Henon().step``)
    becomes ``Partial(Class.step, obj)``, so its datasets and parameters are passed into
    ``jax.jit`` as *arguments* instead of being closed over and constant-folded. A plain
    function becomes an argument-free ``Partial`` (the function itself is static).

    Args:
        step: any callable ``step(x, t) -> x``.

    Returns:
        A ``Partial`` that calls like ``step`` and can be passed to jitted functions.
    """
    if isinstance(step, Partial):
        return step
    if not callable(step):
        raise TypeError(f"step: expected a callable step(x, t) -> x, got {type(step).__name__}")
    owner = getattr(step, "__self__", None)
    func = getattr(step, "__func__", None)
    if owner is not None and func is not None and _is_registered_pytree(owner):
        return Partial(func, owner)
    return Partial(step)


def _is_registered_pytree(obj: Any) -> bool:
    leaves, treedef = jax.tree_util.tree_flatten(obj)
    return not (treedef.num_leaves == 1 and leaves and leaves[0] is obj)


def check_step_signature(step: Callable) -> None:
    """Raise a clear ``TypeError`` when ``step`` cannot be called as ``step(x, t)``."""
    target = step.func if isinstance(step, Partial) else step
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return
    params = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    has_varargs = any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values())
    n_bound = len(step.args) if isinstance(step, Partial) else 0
    if not has_varargs and len(params) - n_bound != 2:
        raise TypeError(
            "step: expected a function step(x, t) -> x taking exactly two positional "
            f"arguments, got signature {sig}"
        )


def one_line(e: BaseException) -> str:
    """``"TypeName: first line of the message"``: an exception as one line of an error."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def x64_enabled() -> bool:
    return bool(jax.config.jax_enable_x64)


def float_dtype(precision: str | None = None):
    """The float dtype for ``precision`` ('float32' or 'float64'; None: the default float)."""
    if precision is None:
        return jnp.asarray(0.0).dtype
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision: must be 'float32' or 'float64', got {precision!r}")
    if precision == "float64" and not x64_enabled():
        raise ValueError(
            "precision: 'float64' needs jax_enable_x64; call "
            "jax.config.update('jax_enable_x64', True) before creating arrays"
        )
    return jnp.float64 if precision == "float64" else jnp.float32


def warn_if_below_resolution(eps: float, dtype, scale: float = 1.0, what: str = "eps") -> None:
    """Warn when a perturbation of size ``eps`` on values of size ``scale`` is lost in ``dtype``."""
    res = float(jnp.finfo(dtype).eps) * max(abs(scale), 1e-30)
    if 0 < eps < 10 * res:
        hint = "" if x64_enabled() else " (enable jax_enable_x64 and use float64)"
        warnings.warn(
            f"{what}={eps:g} is below the resolution of {jnp.dtype(dtype).name} for values "
            f"of size {scale:g} (about {res:.1e}); the perturbation is rounded away{hint}",
            stacklevel=3,
        )


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def environment_info() -> dict[str, str]:
    """Versions and device of this process, for result attributes and benchmark tables."""
    return {**dict(_environment_info()), "x64": str(x64_enabled())}


@functools.lru_cache(maxsize=1)
def _environment_info() -> tuple:
    import importlib.metadata as md

    info = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("chaosjax", "jax", "jaxlib", "optax", "flax", "numpy", "xarray", "zarr"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = "not installed"
    devs = jax.devices()
    info["backend"] = jax.default_backend()
    info["device"] = f"{len(devs)} x {devs[0].device_kind}"
    return tuple(info.items())


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays and tuples to plain JSON types."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray | jax.Array):
        return to_jsonable(np.asarray(obj).tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def fmt(x, spec: str = ".3g") -> str:
    """A number for a report: ``format(x, spec)``, or ``"n/a"`` for None and non-finite values."""
    if x is None:
        return "n/a"
    try:
        if not np.isfinite(x):
            return "n/a"
    except TypeError:
        pass
    return format(x, spec)


def finite_median(x) -> float:
    """Median of the finite entries of ``x``, NaN when there are none."""
    x = np.asarray(x, np.float64).ravel()
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else float("nan")


def dumps(obj: Any) -> str:
    return json.dumps(to_jsonable(obj), sort_keys=True)


class _FrozenDict(tuple):
    """A dict stored in a pytree's static data (sorted items: hashable, comparable)."""


def _freeze(v):
    return _FrozenDict(sorted(v.items())) if isinstance(v, dict) else v


def _thaw(v):
    return dict(v) if isinstance(v, _FrozenDict) else v


class FieldsPytree:
    """Pytree base for the maps: the attributes named in ``_DYNAMIC`` (arrays: data,
    hyper-parameters, initial states) are the children; every other attribute of the instance
    is static data, found from the instance itself. A field is declared once, by setting it in
    ``__init__``, so flattening (``jit``, ``vmap``, ``replace``) cannot drop one. Static values
    must be hashable (dicts are stored as sorted items)."""

    _DYNAMIC: tuple[str, ...] = ()

    def tree_flatten(self):
        dyn = self._DYNAMIC
        static = tuple(sorted((k, _freeze(v)) for k, v in vars(self).items() if k not in dyn))
        return tuple(getattr(self, k) for k in dyn), static

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        for k, v in aux:
            object.__setattr__(obj, k, _thaw(v))
        for k, v in zip(cls._DYNAMIC, children):
            object.__setattr__(obj, k, v)
        return obj


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside chaosjax, JAX and optax (the
    user's line), however deep inside the library the warning was raised."""
    import sys
    import warnings

    level, frame = 1, sys._getframe(1)
    while frame is not None and any(
        part in frame.f_code.co_filename for part in ("/chaosjax/", "/jax/", "/optax/")
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """The DeprecationWarning of a renamed argument, attribute or config field."""
    warnings.warn(
        f"{old}: renamed {new!r}; the old name works for one release",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def renamed(**old_to_new: str):
    """Decorator: accept the old keyword names of a renamed argument for one release, with a
    DeprecationWarning naming the new one (both given: TypeError)."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{new}: given twice (also as its old name {old!r})")
                    warn_renamed(old, new)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return inner

    return wrap
