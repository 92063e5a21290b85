"""Loss landscapes along the directions that matter: 1-D and 2-D slices, filter-normalised
random directions (Li et al. 2018), top Hessian eigenvectors, covariant Lyapunov vectors,
replica separations, and the principal plane of a recorded trajectory.

Its names are not re-exported at the top level (``slice`` would shadow the builtin)::

    from chaosjax import landscape
    d = landscape.directions("hessian", tmap, state, k=1)
    s = landscape.slice(tmap, state, d, span=0.5, num=51)

Every grid is evaluated as one jitted program: ``lax.map`` over chunks of grid points, each
chunk ``vmap``-ed, the chunk size planned from a memory estimate of one evaluation (as the
replica engine plans its batches) — no Python loop over grid points.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

DIRECTION_KINDS = ("random", "filter", "hessian", "clv", "separation")


class Slice(NamedTuple):
    """A loss slice θ + α u (+ β v).

    Attributes:
        alphas: (num,) coordinates along the first direction, ``linspace(-span, span, num)``.
        betas: (num,) along the second direction, or None for a 1-D slice.
        values: (num,) or (num, num) the loss, ``values[i, j]`` at (alphas[i], betas[j]).
        center: the loss at θ (α = β = 0).
        directions: (n_dir, dim) the flat directions used.
    """

    alphas: np.ndarray
    betas: np.ndarray | None
    values: np.ndarray
    center: float
    directions: np.ndarray


class TrajectoryPlane(NamedTuple):
    """Principal directions of a trajectory θ_0 … θ_T around its end point.

    Attributes:
        directions: (k, dim) orthonormal directions (PCA of θ_t − θ_T).
        coordinates: (T + 1, k) the trajectory in them.
        explained: (k,) fraction of the variance of θ_t − θ_T each direction explains.
        origin: (dim,) θ_T.
    """

    directions: np.ndarray
    coordinates: np.ndarray
    explained: np.ndarray
    origin: np.ndarray


# ---------------------------------------------------------------------------------------------
# the loss and its flat parameters


def _flat_loss(loss, params) -> tuple[Callable, jax.Array, Callable | None]:
    """``(loss(flat p), flat θ, unravel)`` of a loss and parameters: a training map and one of
    its states (the loss its step differentiates, as the curvature), a callable of a pytree,
    or a callable of a flat vector."""
    from chaosjax._layout import layout_of
    from chaosjax._map import is_training_map

    if is_training_map(loss):
        batch, _ = loss.curvature_batch(0, "full")
        f = Partial(_map_loss, loss, params, batch)  # a pytree: one compiled program per map
        return f, loss.flat_params(params), loss.unravel_params
    if not callable(loss):
        raise TypeError(
            f"loss: expected a callable loss(params) or a TrainingMap, got {type(loss).__name__}"
        )
    if isinstance(params, jax.Array | np.ndarray) and np.ndim(params) == 1:
        p = jnp.asarray(params)
        return loss, p, None
    layout = layout_of(params, what="params")
    return _TreeLoss(loss, layout), layout.ravel(params), layout.unravel


class _TreeLoss:
    """``loss(unravel(p))``, equal (and hashing equal) for the same loss and layout, so a
    repeated slice reuses its compiled program."""

    def __init__(self, loss, layout):
        self.loss, self.layout = loss, layout

    def __call__(self, p):
        return self.loss(self.layout.unravel(p))

    def __hash__(self):
        return hash((self.loss, self.layout))

    def __eq__(self, other):
        return (
            isinstance(other, _TreeLoss) and other.loss is self.loss and other.layout == self.layout
        )


def _map_loss(tmap, state, batch, p):
    """The loss a map's step differentiates (train mode, dropout off) at flat parameters."""
    return tmap.batch_loss(tmap.unravel_params(p), batch, state)


def _as_directions(directions, p: jax.Array, params) -> jax.Array:
    """(n_dir, dim) flat directions from a flat vector, a pytree like ``params``, an array
    (n_dir, dim) or a sequence of those."""
    from chaosjax._layout import layout_of

    def flat(d):
        if isinstance(d, jax.Array | np.ndarray) and np.ndim(d) == 1:
            return jnp.asarray(d, p.dtype)
        if isinstance(params, jax.Array | np.ndarray):
            raise TypeError("directions: flat vectors (dim,) for flat parameters")
        return layout_of(params, what="directions").ravel(d).astype(p.dtype)

    if isinstance(directions, jax.Array | np.ndarray) and np.ndim(directions) == 2:
        d = jnp.asarray(directions, p.dtype)
    elif isinstance(directions, list | tuple):
        d = jnp.stack([flat(x) for x in directions])
    else:
        d = flat(directions)[None]
    if d.shape[0] not in (1, 2) or d.shape[1] != p.shape[0]:
        raise ValueError(
            f"directions: one or two directions of dimension {p.shape[0]}, got shape "
            f"{tuple(d.shape)}"
        )
    if not bool(jnp.all(jnp.isfinite(d))):
        raise ValueError("directions: contain NaN or infinite entries")
    return d


# ---------------------------------------------------------------------------------------------
# slices


def slice(
    loss,
    params,
    directions,
    *,
    span: float = 1.0,
    num: int = 51,
    chunk_size: int | None = None,
    memory_limit=None,
) -> Slice:
    """The loss on a 1-D or 2-D grid θ + α u (+ β v), α, β ∈ ``linspace(-span, span, num)``.

    Args:
        loss: a :class:`chaosjax.TrainingMap` (then ``params`` is one of its states and the
            loss is the one its step differentiates: train mode, full training set), or a
            callable ``loss(params) -> scalar`` of a pytree or a flat vector.
        params: the centre θ (a state of the map, a pytree, or a flat vector).
        directions: one or two directions: flat vectors (dim,), pytrees like ``params``, or an
            array (n_dir, dim) — e.g. from :func:`directions` or :func:`trajectory_plane`. Used
            as given (no normalisation here).
        span: half-width of the grid along each direction, in units of the direction.
        num: points per axis (>= 2).
        chunk_size: grid points per vmapped evaluation (default: planned from a memory
            estimate of one evaluation against ``memory_limit``).
        memory_limit: bytes (or a string like ``"2GiB"``) the evaluation may use (default:
            80 % of the device's memory).

    Returns:
        :class:`Slice`, values (num,) or (num, num).
    """
    from chaosjax.sharding import device_memory_limit, estimate_bytes, parse_bytes

    if int(num) != num or num < 2:
        raise ValueError(f"num: must be an integer >= 2, got {num!r}")
    if not np.isfinite(span) or span <= 0:
        raise ValueError(f"span: must be a positive number, got {span!r}")
    f, p, _ = _flat_loss(loss, params)
    d = _as_directions(directions, p, params)
    num = int(num)
    grid = np.linspace(-float(span), float(span), num).astype(np.asarray(p).dtype)
    axis = jnp.asarray(grid)
    if d.shape[0] == 1:
        coeffs = axis[:, None]
    else:
        a, b = jnp.meshgrid(axis, axis, indexing="ij")
        coeffs = jnp.stack([a.ravel(), b.ravel()], axis=1)
    n = int(coeffs.shape[0])

    f = f if isinstance(f, Partial) else Partial(f)

    if chunk_size is None:
        limit = parse_bytes(memory_limit) or device_memory_limit()
        one = estimate_bytes(
            lambda c: jax.vmap(lambda ci: f(p + ci @ d))(c),
            jax.ShapeDtypeStruct((1, d.shape[0]), p.dtype),
        )
        chunk_size = int(max(1, min(n, limit // max(one, 1))))
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    n_chunks = -(-n // chunk_size)
    padded = jnp.concatenate([coeffs, jnp.zeros((n_chunks * chunk_size - n, d.shape[0]), p.dtype)])
    values = _grid_values(f, p, d, padded.reshape(n_chunks, chunk_size, d.shape[0]))
    values = np.asarray(values).reshape(-1)[:n]
    center = float(f(p))
    return Slice(
        alphas=grid,
        betas=None if d.shape[0] == 1 else grid,
        values=values if d.shape[0] == 1 else values.reshape(num, num),
        center=center,
        directions=np.asarray(d),
    )


@jax.jit
def _grid_values(f: Partial, p, d, chunks: jax.Array) -> jax.Array:
    """``f(p + c @ d)`` for every row c of ``chunks`` (n_chunks, chunk, n_dir): one program,
    ``lax.map`` over the chunks, each vmapped (compiled once per loss, shapes and chunking)."""
    return jax.lax.map(jax.vmap(lambda c: f(p + c @ d)), chunks)


# ---------------------------------------------------------------------------------------------
# directions


def filter_normalize(direction, params, *, bias: str = "zero"):
    """Li et al.'s filter normalisation of a direction pytree like ``params``: every filter
    (the slice of a kernel at one output unit: the last axis of a Flax kernel, dense or
    convolutional) is rescaled to the norm of the matching filter of θ. One-dimensional leaves
    (biases, normalisation scales and offsets) are set to zero (``bias="zero"``, Li et al.'s
    choice) or rescaled to the leaf's norm (``bias="filter"``)."""
    if bias not in ("zero", "filter"):
        raise ValueError(f"bias: unknown {bias!r}; allowed: zero, filter")

    def one(d, w):
        d, w = jnp.asarray(d), jnp.asarray(w)
        if w.ndim <= 1:
            if bias == "zero":
                return jnp.zeros_like(d)
            return d * jnp.linalg.norm(w) / jnp.maximum(jnp.linalg.norm(d), 1e-30)
        axes = tuple(range(w.ndim - 1))
        wn = jnp.sqrt(jnp.sum(w * w, axis=axes, keepdims=True))
        dn = jnp.sqrt(jnp.sum(d * d, axis=axes, keepdims=True))
        return d * wn / jnp.maximum(dn, 1e-30)

    return jax.tree_util.tree_map(one, direction, params)


def directions(kind: str, loss=None, params=None, *, k: int = 1, key=None, **kwargs) -> np.ndarray:
    """Directions for :func:`slice`, as flat rows (k, dim) in the parameters' flat layout.

    Kinds:
        ``"filter"``: ``k`` Gaussian directions filter-normalised against θ (Li et al. 2018;
            :func:`filter_normalize`, ``bias=`` passed on). ``"random"``: ``k`` Gaussian
            directions scaled to ‖θ‖ as a whole.
        ``"hessian"``: the top-k Hessian eigenvectors at θ (unit norm; largest algebraic;
            ``n_matvecs=`` passed on).
        ``"clv"``: the first ``k`` covariant Lyapunov vectors of ``clv=`` (a
            :class:`chaosjax.CLVResult` of this map) at kept index ``index=`` (default the
            last), restricted to the parameters and normalised to unit norm.
        ``"separation"``: the parameter difference ``other − params`` of a perturbed replica
            (``other=``, a state of the same map) from its reference, unit norm.

    Args:
        loss: a :class:`chaosjax.TrainingMap` (``params`` one of its states) or a callable of a
            pytree or flat vector (as for :func:`slice`).
        params: the centre θ.
        k: number of directions.
        key: PRNG key (random kinds; default ``PRNGKey(0)``).
    """
    if kind not in DIRECTION_KINDS:
        raise ValueError(f"kind: unknown {kind!r}; allowed: {', '.join(DIRECTION_KINDS)}")
    if int(k) != k or k < 1:
        raise ValueError(f"k: must be an integer >= 1, got {k!r}")
    if loss is None or params is None:
        raise TypeError("directions: pass the loss (or training map) and params (or state)")
    from chaosjax._map import is_training_map

    f, p, unravel = _flat_loss(loss, params)
    dim = p.shape[0]
    key = jax.random.PRNGKey(0) if key is None else key
    if kind in ("filter", "random"):
        if kind == "filter" and unravel is not None:
            same = _ravel_like(unravel(p), p)
            if same.shape != p.shape or not bool(jnp.all(same == p)):  # pragma: no cover
                raise ValueError("params: the flat layout is not the pytree's leaf order")
        out = []
        for i in range(int(k)):
            g = jax.random.normal(jax.random.fold_in(key, i), (dim,), p.dtype)
            if kind == "random":
                g = g * jnp.linalg.norm(p) / jnp.linalg.norm(g)
            else:
                if unravel is None:
                    raise ValueError(
                        "kind: 'filter' needs the parameters' structure (a pytree or a "
                        "training map), not a flat vector"
                    )
                tree = filter_normalize(unravel(g), unravel(p), **kwargs)
                g = _ravel_like(tree, p)
            out.append(g)
        return np.asarray(jnp.stack(out))
    if kind == "hessian":
        from chaosjax.curvature import hessian_eigs

        res = hessian_eigs(f, p, int(k), **kwargs)
        return np.asarray(res.eigenvectors)
    n_params = loss.n_params if is_training_map(loss) else dim
    if kind == "clv":
        clv = kwargs.get("clv")
        if clv is None:
            raise TypeError("directions: kind 'clv' needs clv= (a CLVResult of this map)")
        vecs = np.asarray(clv.vectors)
        if vecs.ndim != 3:
            raise ValueError("clv: one run's CLVResult (vectors (n_kept, dim, k)), not a batch")
        index = int(kwargs.get("index", -1))
        if k > vecs.shape[2]:
            raise ValueError(f"k: the CLVResult holds {vecs.shape[2]} vectors, got {k}")
        v = vecs[index, :n_params, : int(k)].T
        return v / np.linalg.norm(v, axis=1, keepdims=True)
    other = kwargs.get("other")
    if other is None:
        raise TypeError("directions: kind 'separation' needs other= (a perturbed replica)")
    q = loss.flat_params(other) if is_training_map(loss) else _flat(other, params)
    diff = np.asarray(q - p, np.float64)
    norm = np.linalg.norm(diff)
    if norm == 0:
        raise ValueError("other: equals params; the separation has no direction")
    return (diff / norm)[None].astype(np.asarray(p).dtype)


def _flat(tree, like) -> jax.Array:
    from chaosjax._layout import layout_of

    if isinstance(tree, jax.Array | np.ndarray) and np.ndim(tree) == 1:
        return jnp.asarray(tree)
    return layout_of(like, what="params").ravel(tree)


def _ravel_like(tree, p: jax.Array) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.concatenate([jnp.ravel(x) for x in leaves]).astype(p.dtype)


def trajectory_plane(states, k: int = 2) -> TrajectoryPlane:
    """Principal directions of a trajectory of flat parameter vectors ``states`` (T + 1, dim)
    around its last point: the top-``k`` right singular vectors of θ_t − θ_T, the
    trajectory's coordinates in them and the variance each explains."""
    x = np.asarray(states, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"states: expected (T + 1 >= 2, dim) flat states, got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("states: contain NaN or infinite entries (a diverged run?)")
    k = int(k)
    if not 1 <= k <= min(x.shape):
        raise ValueError(f"k: must be in [1, {min(x.shape)}], got {k}")
    origin = x[-1]
    c = x - origin
    _, s, vt = np.linalg.svd(c, full_matrices=False)
    total = float(np.sum(s**2))
    explained = (s[:k] ** 2 / total) if total > 0 else np.full(k, np.nan)
    dirs = vt[:k]
    # a sign convention: the trajectory starts on the negative side of each direction
    sign = np.where(c[0] @ dirs.T > 0, -1.0, 1.0)
    dirs = dirs * sign[:, None]
    return TrajectoryPlane(dirs, c @ dirs.T, explained, origin)


def quadratic_model(alphas: Sequence[float], eigenvalue: float, center: float) -> np.ndarray:
    """L(θ) + ½ λ α² along a unit eigenvector of eigenvalue λ (the gradient term omitted)."""
    a = np.asarray(alphas, np.float64)
    return center + 0.5 * float(eigenvalue) * a**2


def project(states, plane: TrajectoryPlane) -> np.ndarray:
    """Coordinates of flat states (n, dim) in a plane's directions around its origin."""
    return (np.asarray(states, np.float64) - plane.origin) @ plane.directions.T


__all__ = [
    "DIRECTION_KINDS",
    "Slice",
    "TrajectoryPlane",
    "directions",
    "filter_normalize",
    "project",
    "quadratic_model",
    "slice",
    "trajectory_plane",
]
