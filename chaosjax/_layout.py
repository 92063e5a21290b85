"""The one flat layout of a pytree state: dynamical float leaves as one vector, the rest carried.

Every analysis acts on a state through this split. The *dynamical* coordinates are the float
leaves (parameters, optimizer moments, the coordinates of a map): tangents, perturbations and
distances act on them, concatenated in ``jax.tree_util`` order into one vector ``x`` of shape
(dim,). Every other leaf — integer counters, PRNG keys, and leaves marked as carried (running
statistics that do not feed back into the dynamics) — is *carried*: advanced exactly by the
step, never perturbed, never tangent, never in a distance. ``ravel_pytree`` would turn
integers into floats and into spurious tangent directions; this layout never does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class MapState(NamedTuple):
    """The state of a map that carries more than its dynamical coordinates.

    Attributes:
        x: (dim,) the dynamical coordinates (a training map's parameters first, then its float
            optimizer moments).
        carry: what the step advances exactly but never differentiates, perturbs or measures
            a distance on (BatchNorm statistics, step counters, PRNG keys, …). Every leaf of
            ``carry`` is carried by :func:`layout_of`, floats included.
    """

    x: Any
    carry: Any


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """One leaf of a layout: its path ``name``, ``shape`` and ``dtype``; dynamical leaves have
    an ``offset`` and ``size`` in the flat vector (carried leaves: offset −1)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    size: int
    dynamic: bool

    @property
    def is_weight(self) -> bool:
        """Kernels and weight matrices (not biases, scales or 1-D leaves)."""
        last = self.name.rsplit("/", 1)[-1]
        return last in ("kernel", "w", "weight", "W", "embedding") or (
            len(self.shape) >= 2 and last != "bias"
        )


def path_name(path) -> str:
    """A readable name of a pytree path: ``layer_0/kernel``."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                parts.append(k.name)
        else:
            parts.append(str(k).strip(".[]'\""))
    return "/".join(parts) or "x"


def is_float(x) -> bool:
    """True for floating leaves (PRNG key arrays and integers are not)."""
    dt = getattr(x, "dtype", None)
    if dt is None:
        dt = jnp.asarray(x).dtype
    try:
        return bool(jnp.issubdtype(dt, jnp.floating))
    except TypeError:  # extended dtypes (typed PRNG keys)
        return False


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a pytree state maps to ``(x, carried)``: the flat vector of its dynamical leaves
    (dtype ``dtype``, shape (dim,)) and the tuple of its carried leaves.

    Layouts are static (hashable): they travel as static arguments of jitted programs.
    """

    treedef: Any
    leaves: tuple[LeafSpec, ...]
    dtype: str

    @property
    def dim(self) -> int:
        return sum(s.size for s in self.leaves if s.dynamic)

    @property
    def n_carried(self) -> int:
        return sum(1 for s in self.leaves if not s.dynamic)

    @property
    def trivial(self) -> bool:
        """The state is itself a flat float vector (no pytree, nothing carried)."""
        return (
            jax.tree_util.treedef_is_leaf(self.treedef)
            and self.treedef.num_leaves == 1
            and self.leaves[0].dynamic
            and len(self.leaves[0].shape) == 1
            and self.leaves[0].dtype == self.dtype
        )

    @property
    def dynamic_leaves(self) -> tuple[LeafSpec, ...]:
        return tuple(s for s in self.leaves if s.dynamic)

    def split(self, tree) -> tuple[jax.Array, tuple]:
        """One (unbatched) state → ``(x (dim,), carried leaves)``."""
        if self.trivial:
            return jnp.asarray(tree), ()
        if not self.leaves:
            return jnp.zeros((0,), self.dtype), ()
        leaves = self.treedef.flatten_up_to(tree)
        vec = [jnp.ravel(v).astype(self.dtype) for v, s in zip(leaves, self.leaves) if s.dynamic]
        carried = tuple(v for v, s in zip(leaves, self.leaves) if not s.dynamic)
        if not vec:
            return jnp.zeros((0,), self.dtype), carried
        return (jnp.concatenate(vec) if len(vec) > 1 else vec[0]), carried

    def merge(self, x, carried=()) -> Any:
        """``(x (dim,), carried leaves)`` → one state (the inverse of :meth:`split`)."""
        if self.trivial:
            return x
        out, ci = [], 0
        for s in self.leaves:
            if s.dynamic:
                out.append(x[s.offset : s.offset + s.size].reshape(s.shape).astype(s.dtype))
            else:
                out.append(carried[ci])
                ci += 1
        return jax.tree_util.tree_unflatten(self.treedef, out)

    def ravel(self, tree) -> jax.Array:
        """The flat vector of a tree with this layout's structure (carried leaves dropped)."""
        return self.split(tree)[0]

    def unravel(self, x) -> Any:
        """The tree of a flat vector (a layout with no carried leaves)."""
        if self.n_carried:
            raise ValueError("unravel: this layout carries leaves; use merge(x, carried)")
        return self.merge(x)

    def weight_mask(self) -> np.ndarray:
        """Boolean (dim,) mask of weight entries (kernels; not biases)."""
        m = np.zeros(self.dim, bool)
        for s in self.dynamic_leaves:
            m[s.offset : s.offset + s.size] = s.is_weight
        return m

    def groups(self) -> dict[str, tuple[int, int]]:
        """Ranges of the flat vector per parent path (a layer's kernel and bias together)."""
        out: dict[str, list[int]] = {}
        for s in self.dynamic_leaves:
            group = s.name.rsplit("/", 1)[0] if "/" in s.name else s.name
            lo, hi = out.get(group, [s.offset, s.offset + s.size])
            out[group] = [min(lo, s.offset), max(hi, s.offset + s.size)]
        return {k: (v[0], v[1]) for k, v in out.items()}


def layout_of(
    tree,
    *,
    batched: bool = False,
    carried: Callable[[str, Any], bool] | None = None,
    dtype=None,
    what: str = "state",
) -> Layout:
    """The layout of a pytree state.

    Args:
        tree: an example state (arrays or ``jax.ShapeDtypeStruct``); with ``batched=True``
            every leaf has a leading batch axis that is not part of the layout.
        carried: optional ``carried(name, leaf) -> bool`` marking float leaves that are
            carried rather than dynamical (e.g. running statistics).
        dtype: dtype of the flat vector (default: the result type of the dynamical leaves).
        what: the name used in error messages.

    A tree without leaves (an empty optimizer state) has dim 0. In a :class:`MapState` only
    ``x`` is dynamical.
    """
    if isinstance(tree, MapState):
        user = carried

        def carried(name, leaf):
            return name == "carry" or name.startswith("carry/") or bool(user and user(name, leaf))

    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    specs, dyn_dtypes = [], []
    for path, leaf in flat:
        name = path_name(path)
        shape = tuple(jnp.shape(leaf))[1:] if batched else tuple(jnp.shape(leaf))
        dt = leaf.dtype if hasattr(leaf, "dtype") else jnp.asarray(leaf).dtype
        dynamic = is_float(leaf) and not (carried is not None and carried(name, leaf))
        size = int(math.prod(shape))
        specs.append(
            LeafSpec(name, shape, np.dtype(dt).name if dynamic else str(dt), -1, size, dynamic)
        )
        if dynamic:
            dyn_dtypes.append(dt)
    if dtype is None:
        dtype = jnp.result_type(*dyn_dtypes) if dyn_dtypes else jnp.asarray(0.0).dtype
    pos, out = 0, []
    for s in specs:
        if s.dynamic:
            out.append(dataclasses.replace(s, offset=pos))
            pos += s.size
        else:
            out.append(s)
    return Layout(treedef, tuple(out), jnp.dtype(dtype).name)


def plain_flow(step, x, carry, t, args, *, layout: Layout, has_args: bool):
    """A plain ``step(x, t)`` (``step(x, t, args)``) on a pytree state in the engine's form
    ``(x, carry, t, args) -> (x′, carry′, 0)``: the state merged from its float coordinates and
    carried leaves, stepped, and split again (the one adapter of the engine, the orbit solver
    and the smoothness check)."""
    s = layout.merge(x, carry)
    y = step(s, t, args) if has_args else step(s, t)
    x2, c2 = layout.split(y)
    return x2.astype(x.dtype), tuple(c2), jnp.zeros((), x.dtype)


def split_state(state) -> tuple[Any, Any]:
    """``(x, carry)`` of a state (``carry`` is None for a flat state)."""
    if isinstance(state, MapState):
        return state.x, state.carry
    return state, None


__all__ = [
    "Layout",
    "LeafSpec",
    "MapState",
    "is_float",
    "layout_of",
    "path_name",
    "plain_flow",
    "split_state",
]
