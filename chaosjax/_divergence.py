"""Divergence of perturbed replicas (the ensemble estimates of :mod:`chaosjax.lyapunov`):
the mean log distance over an ensemble, Danovski et al.'s best-window exponential fit and the
nonlinear growth of random perturbations over a fixed horizon.

Re-exported by :mod:`chaosjax.lyapunov`, where they are documented with the tangent-space
estimators.

References:
    Danovski, Soriano, Lacasa (2024). Dynamical stability and chaos in artificial neural
    network trajectories along training. arXiv:2404.05782.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from chaosjax._fit import MIN_POINTS, best_line_fit
from chaosjax._util import warn_if_below_resolution


def ensemble_log_distance(distances, times=None) -> tuple[np.ndarray, np.ndarray]:
    """Ensemble average of ln d(t) over replicas and its instantaneous slope.

    Args:
        distances: (replicas, n) distances of perturbed replicas to their references.
        times: (n,) step of each column (default 0, 1, …).

    Returns:
        ``(mean_log_d, slope)``, both (n,); the slope is d⟨ln d⟩/dt per step (central
        differences), the ensemble-averaged expansion rate of a non-autonomous system.
        Replicas with d ≤ 0 or non-finite d at a time are left out of that time's mean.
    """
    d = np.atleast_2d(np.asarray(distances, np.float64))
    t = np.arange(d.shape[1], dtype=np.float64) if times is None else np.asarray(times, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        logd = np.where(d > 0, np.log(d), np.nan)
    valid = np.isfinite(logd).any(axis=0)
    mean = np.full(d.shape[1], np.nan)
    mean[valid] = np.nanmean(logd[:, valid], axis=0)
    slope = np.gradient(mean, t) if d.shape[1] > 1 else np.full(1, np.nan)
    return mean, slope


#: Danovski et al.'s acceptance of a best-window fit (summaries repeat it)
ACCEPTANCE_RULE = (
    "a best-window fit is accepted when it holds at least 10 points, R² > 0.9 and slope > "
    "0.05 per step (Danovski et al.)"
)


@dataclasses.dataclass(frozen=True)
class WindowFit:
    """Best exponential fit of d(t) over a window: ln d ≈ intercept + slope·t.

    Attributes:
        slope: per step (NaN when no window holds enough points; ``reason`` says why).
        r2: the window's R²; start, stop: the window (steps); n_points: samples in it.
        min_r2, min_slope: the acceptance thresholds (Danovski et al.: 0.9 and 0.05).
    """

    slope: float
    intercept: float
    r2: float
    start: int
    stop: int
    n_points: int = 0
    reason: str = ""
    min_r2: float = 0.9
    min_slope: float = 0.05

    @property
    def accepted(self) -> bool:
        """R² > min_r2 and slope > min_slope (a window of ≥ 10 points by construction)."""
        return bool(
            np.isfinite(self.slope) and self.r2 > self.min_r2 and self.slope > self.min_slope
        )


def best_window_fit(
    times,
    distances,
    *,
    starts=range(0, 101, 5),
    widths=range(30, 101, 5),
    average: str = "mean",
    min_points: int = MIN_POINTS,
    min_r2: float = 0.9,
    min_slope: float = 0.05,
) -> WindowFit:
    """Danovski et al.'s exponential fit: fit ln d on every window [x1, x1 + w], keep the best R².

    Args:
        times: (n,) steps of the samples.
        distances: (n,) or (replicas, n); with several replicas d is first averaged
            (``"mean"``: ln of the mean distance, as in the paper; ``"log"``: mean of ln d).
        starts: window starts x1 (steps).
        widths: window widths w (steps).
        min_points: windows with fewer finite samples are skipped (at least 10: a window of
            fewer points is not a fit). Record the distances finely enough
            (``run_replicas(distance_every=1)``) for the windows to hold them.
        min_r2, min_slope: acceptance (:attr:`WindowFit.accepted`).

    Returns:
        :class:`WindowFit` (slope per step); NaN with a ``reason`` when no window holds
        ``min_points`` finite samples.
    """
    if int(min_points) != min_points or min_points < MIN_POINTS:
        raise ValueError(
            f"min_points: a window of fewer than {MIN_POINTS} points is not a fit, got {min_points!r}"
        )
    t = np.asarray(times, np.float64)
    d = np.asarray(distances, np.float64)
    if average not in ("mean", "log"):
        raise ValueError(f"average: must be 'mean' or 'log', got {average!r}")
    if d.ndim == 2:
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (diverged) → NaN
            y = (
                np.log(np.nanmean(d, axis=0))
                if average == "mean"
                else np.nanmean(np.log(d), axis=0)
            )
    elif d.ndim == 1:
        with np.errstate(divide="ignore", invalid="ignore"):
            y = np.log(d)
    else:
        raise ValueError(f"distances: expected shape (n,) or (replicas, n), got {d.shape}")
    if y.shape[0] != t.shape[0]:
        raise ValueError(f"times: length {t.shape[0]} differs from the distances' {y.shape[0]}")
    thresholds = {"min_r2": float(min_r2), "min_slope": float(min_slope)}
    windows, most = [], 0
    for x1 in starts:
        for w in widths:
            sel = (t >= x1) & (t <= x1 + w) & np.isfinite(y)
            n = int(sel.sum())
            most = max(most, n)
            if n >= min_points:
                windows.append(((int(x1), int(x1 + w), n), t[sel], y[sel]))
    found = best_line_fit(windows)
    if found is None:
        spacing = float(np.median(np.diff(t))) if t.size > 1 else float("nan")
        reason = (
            f"no window holds {min_points} finite points (at most {most}; samples every "
            f"{spacing:g} steps): record the distances every step over the fit range"
        )
        nan = float("nan")
        return WindowFit(nan, nan, nan, -1, -1, most, reason, **thresholds)
    f, (x1, x2, n) = found
    return WindowFit(f.slope, f.intercept, f.r2, x1, x2, n, "", **thresholds)


def local_growth_rates(
    step: Callable,
    states,
    *,
    n_perturbed: int = 16,
    eps: float = 1e-8,
    delta_t: int = 10,
    key=None,
    t0: int = 0,
    args=None,
) -> np.ndarray:
    """Nonlinear growth of random perturbations from chosen states.

    From each state, ``n_perturbed`` random perturbations of norm ``eps`` are evolved
    with the reference for ``delta_t`` steps (one replica run: a reference group per state);
    the rate is ln(‖δ(Δt)‖/ε)/Δt (per step).

    Args:
        step: ``step(x, t)`` (``step(x, t, args)`` with ``args``) on a flat array state.
        states: (n_states, dim) starting states (all at time ``t0``).

    Returns:
        Rates of shape (n_states, n_perturbed), float64 (NaN where a replica diverged).
    """
    from chaosjax import engine
    from chaosjax.replicas import ReplicaBatch

    x = jnp.atleast_2d(jnp.asarray(states))
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError("states: floating arrays required")
    if int(n_perturbed) != n_perturbed or n_perturbed < 1:
        raise ValueError(f"n_perturbed: must be a positive integer, got {n_perturbed!r}")
    if int(delta_t) != delta_t or delta_t < 1:
        raise ValueError(f"delta_t: must be a positive integer, got {delta_t!r}")
    warn_if_below_resolution(float(eps), x.dtype, float(jnp.sqrt(jnp.mean(x**2))), what="eps")
    key = jax.random.PRNGKey(0) if key is None else key
    n, m = int(x.shape[0]), int(n_perturbed)
    u = jax.random.normal(key, (n, m, x.shape[1]), x.dtype)
    u = eps * u / jnp.linalg.norm(u, axis=-1, keepdims=True)
    rows = jnp.concatenate([x[:, None, :], x[:, None, :] + u], axis=1).reshape(n * (m + 1), -1)
    hp = {}
    if args is not None:
        hp = jax.tree_util.tree_map(
            lambda a: jnp.broadcast_to(a, (n * (m + 1), *jnp.shape(a))), args
        )
    batch = ReplicaBatch(
        states=rows,
        hparams=hp,
        reference=np.repeat((m + 1) * np.arange(n), m + 1).astype(np.int32),
        coords={"member": np.tile(np.arange(m + 1), n)},
    )
    res = engine.run_replicas(
        step,
        batch,
        steps=int(delta_t),
        record_every=int(delta_t),
        observables=("distance_l2",),
        t0=int(t0),
        progress=False,
    )
    d = res.records["distance_l2"][:, -1].reshape(n, m + 1)[:, 1:]
    norms = np.asarray(jnp.linalg.norm(u, axis=-1), np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(d / norms) / int(delta_t)
