"""Replica batches: perturbed, independently initialised and hyper-parameter replicas, and
:func:`run_replicas`, the one driver that runs them (see :mod:`chaosjax.engine`).

A chunk is one jitted ``lax.scan`` over ``chunk_steps`` steps of the vmapped step; observers
(tangents, curvature, response) advance inside it on the very states that are recorded; the
host loop between chunks updates the progress bar, appends the records to a zarr stream and
writes a checkpoint, so an interrupted run resumes to the same arrays. A replica whose state
or loss stops being finite (or whose loss exceeds ``loss_bound``) is flagged with its step and
frozen; its later records are NaN and the rest of the batch goes on.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from chaosjax._layout import Layout, layout_of, split_state
from chaosjax._map import is_training_map
from chaosjax._util import warn_if_below_resolution
from chaosjax.engine import (
    GENERIC_OBSERVABLES,
    TRAINING_OBSERVABLES,
    Checkpoint,
    replica_memory,
    run_replicas,
)
from chaosjax.results import ReplicaResults

DISTRIBUTIONS = ("uniform", "gaussian")
TARGETS = ("weights", "params", "all")


# ---------------------------------------------------------------------------------------------
# building replica batches


@dataclasses.dataclass
class ReplicaBatch:
    """A batch of R replicas.

    Attributes:
        states: initial states, shape (R, dim).
        hparams: {name: (R,)} hyper-parameters per replica (training maps only).
        reference: (R,) index of each replica's unperturbed reference replica (itself for a
            reference); distances are measured to it.
        coords: {name: (R,)} labels: ``seed``, each grid hyper-parameter, ``eps``, ``member``
            (0 = the reference of its group).
        carry: the carried (non-dynamical) leaves of the states, each (R, ...): integer
            counters, PRNG keys, running statistics; empty for flat float states.
        layout: how a plain map's pytree state splits into ``states`` and ``carry`` (None:
            the states are flat vectors).

    For a plain step ``hparams`` may be any pytree with a leading axis R: it is passed to
    the step as a third argument, ``step(x, t, hparams)``.
    """

    states: jax.Array
    hparams: Any
    reference: np.ndarray
    coords: dict[str, np.ndarray]
    carry: tuple = ()
    layout: Layout | None = None

    def subset(self, rows) -> ReplicaBatch:
        """The replicas at ``rows`` (each with its reference among them), in that order."""
        rows = np.asarray(rows, np.int64)
        pos = {int(r): i for i, r in enumerate(rows)}
        try:
            ref = np.asarray([pos[int(self.reference[r])] for r in rows], np.int32)
        except KeyError:
            raise ValueError("rows: every replica's reference must be among the rows") from None
        return ReplicaBatch(
            states=self.states[rows],
            hparams=jax.tree_util.tree_map(lambda v: v[rows], self.hparams),
            reference=ref,
            coords={k: np.asarray(v)[rows] for k, v in self.coords.items()},
            carry=jax.tree_util.tree_map(lambda c: c[rows], self.carry),
            layout=self.layout,
        )

    def __len__(self) -> int:
        return int(self.states.shape[0])


def perturbation(key, shape, eps: float, distribution: str = "uniform", dtype=None) -> jax.Array:
    """A random perturbation: U(−ε, ε) (``"uniform"``) or N(0, ε²) (``"gaussian"``) entries."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"distribution: unknown {distribution!r}; allowed: {', '.join(DISTRIBUTIONS)}"
        )
    dtype = dtype or jnp.asarray(0.0).dtype
    if distribution == "uniform":
        return jax.random.uniform(key, shape, dtype, minval=-eps, maxval=eps)
    return eps * jax.random.normal(key, shape, dtype)


def perturbation_mask(model, target: str, dim: int) -> np.ndarray:
    """Which state entries a perturbation touches: ``"weights"`` (kernels only),
    ``"params"`` (all parameters) or ``"all"`` (parameters and optimizer moments)."""
    if target not in TARGETS:
        raise ValueError(f"target: unknown {target!r}; allowed: {', '.join(TARGETS)}")
    mask = np.zeros(dim, bool)
    if not is_training_map(model):
        if target != "all":
            raise ValueError(f"target: {target!r} needs a TrainingMap; use 'all' for a plain state")
        mask[:] = True
    elif target == "weights":
        mask[: model.n_params] = model.weight_mask
    elif target == "params":
        mask[: model.n_params] = True
    else:
        mask[:] = True
    return mask


def _as_list(name, value, kind=float) -> list:
    if isinstance(value, str) or not isinstance(value, Sequence | np.ndarray):
        value = [value]
    out = list(value)
    if not out:
        raise ValueError(f"{name}: must not be empty")
    try:
        return [kind(v) for v in out]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {kind.__name__} values, got {value!r}") from None


def _checked_grid(model, grid, is_tm: bool) -> tuple[dict, dict]:
    """(grid, per_seed): the grid as {name: [values]} or {name: {seed: [values]}}, every name a
    hyper-parameter of the map, and its per-seed entries."""
    grid = dict(grid or {})
    if grid and not is_tm:
        raise ValueError("grid: hyper-parameter grids need a TrainingMap")
    for k in grid:
        if k not in model.hparams:
            raise ValueError(
                f"grid: unknown hyper-parameter {k!r}; allowed: {sorted(model.hparams)}"
            )
    per_seed = {k: v for k, v in grid.items() if isinstance(v, Mapping)}
    grid = {
        k: (
            {int(s): _as_list(f"grid.{k}[{s}]", vs) for s, vs in v.items()}
            if isinstance(v, Mapping)
            else _as_list(f"grid.{k}", v)
        )
        for k, v in grid.items()
    }
    return grid, per_seed


def _grid_points(grid: dict, seed_list: list) -> list[tuple]:
    """Index tuples of every grid point (one index per hyper-parameter); [()] without a grid."""
    sizes = []
    for k, v in grid.items():
        if isinstance(v, dict):
            if set(v) != set(seed_list):
                raise ValueError(
                    f"grid.{k}: per-seed values need exactly the seeds {seed_list}, got {sorted(v)}"
                )
            lengths = {len(vs) for vs in v.values()}
            if len(lengths) != 1:
                raise ValueError(f"grid.{k}: every seed needs the same number of values")
            sizes.append(lengths.pop())
        else:
            sizes.append(len(v))
    return list(itertools.product(*[range(n) for n in sizes])) if grid else [()]


def make_replicas(
    model,
    *,
    base=None,
    seeds: int | Sequence[int] | None = None,
    grid: Mapping[str, Sequence[float]] | None = None,
    n_perturbed: int = 0,
    eps: float | Sequence[float] = 1e-8,
    distribution: str = "uniform",
    target: str | None = None,
    perturb_seed: int = 0,
) -> ReplicaBatch:
    """Build replicas: independent seeds × hyper-parameter grid × (reference + perturbed).

    For every seed and every grid point there is one *reference* replica (member 0), followed
    by ``n_perturbed`` replicas per ε in ``eps`` (members 1, 2, …). Perturbations depend on
    (perturb_seed, seed, member) only, so the same perturbation is used at every grid point.

    Args:
        model: a :class:`TrainingMap`, or a ``step(x, t)`` callable for plain maps.
        base: base state: (dim,) for a training map (default ``model.init()``); for a plain
            map any pytree state — its float leaves are the dynamical coordinates, its
            integer leaves and keys are carried unperturbed (see :mod:`chaosjax._layout`).
        seeds: independent initialisations ``model.init_from_key(seed)`` (replaces ``base``).
        grid: {hyper-parameter: values}, e.g. ``{"learning_rate": [0.01, 1.0, 5.0]}``; values
            may be set per seed as {seed: values} (the same number for every seed), e.g. η =
            c/λ0 of each seed's own initial sharpness: ``{"learning_rate": {0: [0.1, 0.5],
            1: [0.12, 0.6]}}``. The coordinate ``grid_index`` then says which grid point a
            replica is (its hyper-parameter coordinate holds its own value).
        n_perturbed: perturbed replicas per ε and group.
        eps: perturbation size(s) ε.
        distribution: ``"uniform"`` U(−ε, ε) or ``"gaussian"`` N(0, ε²).
        target: ``"weights"`` (default for training maps; kernels only, as Danovski et al.),
            ``"params"`` or ``"all"`` (default and only choice for plain states).
        perturb_seed: seed of the perturbations.

    Returns:
        A :class:`ReplicaBatch` with states (R, dim).
    """
    is_tm = is_training_map(model)
    target = target or ("weights" if is_tm else "all")
    if int(n_perturbed) != n_perturbed or n_perturbed < 0:
        raise ValueError(f"n_perturbed: must be a non-negative integer, got {n_perturbed!r}")
    eps_list = _as_list("eps", eps)
    if any(not e > 0 for e in eps_list):
        raise ValueError(f"eps: must be > 0, got {eps!r}")
    if seeds is not None and base is not None:
        raise ValueError("seeds: give either seeds (independent inits) or base, not both")
    grid, per_seed = _checked_grid(model, grid, is_tm)

    layout, carry = None, ()
    if seeds is not None:
        seed_list = _as_list("seeds", seeds, int)
        if not is_tm:
            raise ValueError("seeds: independent initialisations need a TrainingMap with init_fn")
        bases = [model.init_from_key(s) for s in seed_list]
    else:
        if base is None:
            if not is_tm:
                raise ValueError("base: the initial state is required for a plain step function")
            base = model.init()
        if is_tm:
            x0 = split_state(base)[0]
            if jnp.ndim(x0) != 1 or jnp.shape(x0)[0] != model.dim:
                raise ValueError(
                    f"base: expected a state of {model.dim} dynamical coordinates (from "
                    f"model.init()), got shape {jnp.shape(x0)}"
                )
        else:
            layout = layout_of(base, what="base")
            if layout.dim == 0:
                raise TypeError("base: the state has no floating-point leaves to perturb")
            base, carry = layout.split(base)
            layout = None if layout.trivial else layout
        seed_list = [0]
        bases = [base]
    row_carry = None  # a training map's carry per seed (None: the map carries nothing)
    if is_tm:
        split = [split_state(b) for b in bases]
        bases = [jnp.asarray(x) for x, _ in split]
        if split[0][1] is not None:
            row_carry = [c for _, c in split]
    dim = int(bases[0].shape[0])
    dtype = bases[0].dtype
    mask = perturbation_mask(model, target, dim)
    if n_perturbed:
        scale = float(np.sqrt(np.mean(np.asarray(bases[0])[mask] ** 2))) if mask.any() else 1.0
        for e in eps_list:
            warn_if_below_resolution(e, dtype, max(scale, 1e-12), what="eps")

    members = [(0.0, 0)] + [(e, m) for e in eps_list for m in range(1, n_perturbed + 1)]
    combos = _grid_points(grid, seed_list)
    states, refs, coords = [], [], {"seed": [], "eps": [], "member": []}
    for k in grid:
        coords[k] = []
    if per_seed:
        coords["grid_index"] = []
    hp_rows, carry_rows = [], []
    pkey = jax.random.PRNGKey(perturb_seed)
    mask_j = jnp.asarray(mask)
    for si, (seed, b) in enumerate(zip(seed_list, bases)):
        for gi, index in enumerate(combos):
            combo = tuple(
                (v[seed] if isinstance(v, dict) else v)[i] for v, i in zip(grid.values(), index)
            )
            ref_index = len(states)
            for j, (e, m) in enumerate(members):
                if m == 0:
                    s = b
                else:
                    key = jax.random.fold_in(jax.random.fold_in(pkey, si), j)
                    s = b + jnp.where(mask_j, perturbation(key, (dim,), e, distribution, dtype), 0)
                states.append(s)
                if row_carry is not None:
                    carry_rows.append(row_carry[si])
                refs.append(ref_index)
                coords["seed"].append(seed)
                coords["eps"].append(e)
                coords["member"].append(m)
                for k, v in zip(grid, combo):
                    coords[k].append(v)
                if per_seed:
                    coords["grid_index"].append(gi)
                hp_rows.append(dict(zip(grid, combo)))
    hparams = {}
    if is_tm:
        for k, v in model.hparams.items():
            hparams[k] = jnp.asarray([row.get(k, float(v)) for row in hp_rows], v.dtype)
    n = len(states)
    if carry_rows:  # a training map's carry: one row per replica, the seed's own
        carry = jax.tree_util.tree_map(lambda *c: jnp.stack(c), *carry_rows)
    else:
        carry = tuple(jnp.broadcast_to(c, (n, *jnp.shape(c))) for c in carry)
    return ReplicaBatch(
        states=jnp.stack(states),
        hparams=hparams,
        reference=np.asarray(refs, np.int32),
        coords={k: np.asarray(v) for k, v in coords.items()},
        carry=carry,
        layout=layout,
    )


def distances_to_reference(results: ReplicaResults, name: str = "distance_l1") -> np.ndarray:
    """The perturbed replicas' distance records (members > 0), shape (n_perturbed_total, n)
    at the steps ``results.steps_of(name)``."""
    if name not in results.records:
        raise ValueError(f"{name}: not recorded; recorded: {sorted(results.records)}")
    return results.records[name][results.coords["member"] > 0]


__all__ = [
    "DISTRIBUTIONS",
    "GENERIC_OBSERVABLES",
    "TARGETS",
    "TRAINING_OBSERVABLES",
    "Checkpoint",
    "ReplicaBatch",
    "distances_to_reference",
    "make_replicas",
    "perturbation",
    "perturbation_mask",
    "replica_memory",
    "run_replicas",
]
