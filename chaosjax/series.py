"""Diagnostics of a scalar series (e.g. a logged training loss): numbers, not only plots.

* :func:`fraction_increasing` — share of steps where the series goes up;
* :func:`spikes` — episodes above ``factor`` × the running minimum (spikes, catapults);
* :func:`autocorrelation` — ACF with a band from shuffled surrogates;
* :func:`power_spectrum` — periodogram of the detrended series;
* :func:`laminar_segments` — laminar/burst segmentation and laminar-length statistics
  (intermittency);
* :func:`zero_one_test` — Gottwald & Melbourne's 0–1 test for chaos (K ≈ 0 regular, ≈ 1
  chaotic; NaN on a frozen series, see :func:`negligible_variation`);
* :func:`expansion_rate` — local expansion rates by the method of analogues (Danovski et al.),
  detrended, with a Theiler window, per step.

All inputs are 1-D arrays; NaN entries are not allowed (divergent runs should be cut first).

References:
    Gottwald, Melbourne (2009). On the implementation of the 0–1 test for chaos. SIAM J.
    Appl. Dyn. Syst. 8.
    Danovski, Soriano, Lacasa (2024). arXiv:2404.05782.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from chaosjax._fit import best_line_fit


def _series(x, name: str = "x", min_len: int = 3) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D series, got shape {x.shape}")
    if x.size < min_len:
        raise ValueError(f"{name}: needs at least {min_len} values, got {x.size}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or inf; cut the series before a divergence")
    return x


def fraction_increasing(x) -> float:
    """Fraction of steps with x[t+1] > x[t]."""
    x = _series(x, min_len=2)
    return float(np.mean(np.diff(x) > 0))


@dataclasses.dataclass(frozen=True)
class Episodes:
    """Contiguous episodes: ``start``/``stop`` (stop exclusive), ``peak`` index and
    ``height`` (x[peak] / reference at the start)."""

    start: np.ndarray
    stop: np.ndarray
    peak: np.ndarray
    height: np.ndarray

    def __len__(self) -> int:
        return int(self.start.size)


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and stop (exclusive) of the runs of True in a boolean mask."""
    m = np.concatenate([[False], mask, [False]]).astype(np.int8)
    d = np.diff(m)
    return np.flatnonzero(d == 1), np.flatnonzero(d == -1)


def spike_mask(x, *, factor: float = 2.0, lookback: int | None = None) -> np.ndarray:
    """Boolean (n,): where x exceeds ``factor`` × its baseline — its running minimum
    (``lookback=None``), or its minimum over the ``lookback`` points before (a sudden rise,
    not the slow drift of a series that climbs back). NaN points never fire and are left out of
    the baselines."""
    x = np.asarray(x, np.float64)
    if x.ndim != 1:
        raise ValueError(f"x: expected a 1-D series, got shape {x.shape}")
    if not factor > 1:
        raise ValueError(f"factor: must be > 1, got {factor!r}")
    if lookback is not None and (int(lookback) != lookback or lookback < 1):
        raise ValueError(f"lookback: must be an integer >= 1 or None, got {lookback!r}")
    finite = np.isfinite(x)
    if lookback is None:
        base = np.minimum.accumulate(np.where(finite, x, np.inf))
    else:
        base = np.full(x.shape, np.inf)
        for i in range(1, x.size):
            prev = x[max(0, i - int(lookback)) : i]
            prev = prev[np.isfinite(prev)]
            base[i] = prev.min() if prev.size else np.inf
    return finite & np.isfinite(base) & (x > factor * base)


def spikes(x, *, factor: float = 2.0, min_length: int = 1) -> Episodes:
    """Episodes where x exceeds ``factor`` × its running minimum (spikes, catapults).

    Returns:
        :class:`Episodes`; ``height`` is the peak over the running minimum at the start.
    """
    x = _series(x, min_len=2)
    runmin = np.minimum.accumulate(x)
    above = spike_mask(x, factor=factor)
    start, stop = _runs(above)
    keep = (stop - start) >= min_length
    start, stop = start[keep], stop[keep]
    peak = np.array([s + int(np.argmax(x[s:e])) for s, e in zip(start, stop)], dtype=int)
    height = np.array([x[p] / runmin[s] for p, s in zip(peak, start)])
    return Episodes(start, stop, peak, height)


@dataclasses.dataclass(frozen=True)
class ACF:
    """Autocorrelation ``acf`` (max_lag + 1,) and the surrogate band ``low``/``high``."""

    lags: np.ndarray
    acf: np.ndarray
    low: np.ndarray
    high: np.ndarray

    @property
    def significant(self) -> np.ndarray:
        """Lags whose ACF lies outside the surrogate band."""
        return self.lags[(self.acf < self.low) | (self.acf > self.high)]


def _acf(x: np.ndarray, max_lag: int) -> np.ndarray:
    x = x - x.mean()
    n = x.size
    f = np.fft.rfft(x, 2 * n)
    c = np.fft.irfft(f * np.conj(f))[: max_lag + 1]
    return c / c[0] if c[0] > 0 else np.full(max_lag + 1, np.nan)


def autocorrelation(
    x,
    max_lag: int = 50,
    *,
    start: int = 0,
    n_surrogates: int = 1000,
    band: tuple[float, float] = (3.0, 97.0),
    seed: int = 0,
) -> ACF:
    """Autocorrelation of x[start:] with a band from shuffled surrogates.

    The band is the (band[0], band[1]) percentile range of the ACF of ``n_surrogates``
    random permutations of the series (Danovski et al. use 1000 surrogates, 3rd–97th).
    """
    x = _series(x)[int(start) :]
    if x.size < 3:
        raise ValueError(f"start: leaves fewer than 3 values of the series, got start={start}")
    max_lag = int(min(max_lag, x.size - 1))
    acf = _acf(x, max_lag)
    rng = np.random.default_rng(seed)
    sur = np.stack([_acf(rng.permutation(x), max_lag) for _ in range(int(n_surrogates))])
    lo, hi = np.percentile(sur, band, axis=0)
    return ACF(np.arange(max_lag + 1), acf, lo, hi)


def power_spectrum(x, dt: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Periodogram of the linearly detrended series: ``(frequencies, power)``."""
    x = _series(x)
    t = np.arange(x.size)
    x = x - np.polyval(np.polyfit(t, x, 1), t)
    p = np.abs(np.fft.rfft(x)) ** 2 / x.size
    return np.fft.rfftfreq(x.size, dt), p


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """Laminar/burst segmentation.

    Attributes:
        laminar: (n, 2) start/stop (exclusive, in steps of the series) of laminar phases.
        bursts: (m, 2) start/stop of bursts.
        threshold: |Δx| threshold used.
    """

    laminar: np.ndarray
    bursts: np.ndarray
    threshold: float

    @property
    def laminar_lengths(self) -> np.ndarray:
        return self.laminar[:, 1] - self.laminar[:, 0]

    @property
    def burst_lengths(self) -> np.ndarray:
        return self.bursts[:, 1] - self.bursts[:, 0]

    def stats(self) -> dict[str, float]:
        """Mean, median and max laminar length, laminar fraction, counts."""
        ll = self.laminar_lengths
        total = ll.sum() + self.burst_lengths.sum()
        return {
            "n_laminar": int(ll.size),
            "n_bursts": int(self.bursts.shape[0]),
            "mean_laminar": float(ll.mean()) if ll.size else float("nan"),
            "median_laminar": float(np.median(ll)) if ll.size else float("nan"),
            "max_laminar": float(ll.max()) if ll.size else float("nan"),
            "laminar_fraction": float(ll.sum() / total) if total else float("nan"),
        }


def laminar_segments(x, *, threshold: float | None = None, min_length: int = 5) -> Segmentation:
    """Segment a series into laminar phases (|x[t+1] − x[t]| ≤ threshold for at least
    ``min_length`` consecutive steps) and bursts (everything else).

    Args:
        threshold: default 1% of the standard deviation of the increments — laminar means
            nearly frozen relative to the typical step.
        min_length: shortest laminar phase, in increments.

    Lengths count increments (a laminar phase of length L spans L + 1 values).
    """
    x = _series(x)
    dx = np.abs(np.diff(x))
    thr = 0.01 * float(np.std(np.diff(x))) if threshold is None else float(threshold)
    if thr < 0:
        raise ValueError(f"threshold: must be >= 0, got {threshold!r}")
    start, stop = _runs(dx <= thr)
    keep = (stop - start) >= int(min_length)
    lam = np.stack([start[keep], stop[keep]], axis=1) if keep.any() else np.zeros((0, 2), int)
    bursts = []
    pos = 0
    for s, e in lam:
        if s > pos:
            bursts.append((pos, s))
        pos = e
    if pos < dx.size:
        bursts.append((pos, dx.size))
    return Segmentation(lam, np.asarray(bursts, int).reshape(-1, 2), thr)


def negligible_variation(x, rtol: float = 1e-8) -> str:
    """Why a series is too flat for a chaos diagnostic ('' when it is not): its spread (standard
    deviation) is below ``rtol`` × its level (|mean|) — a frozen plateau, or the round-off of a
    frozen value (float32 round-off is about 1e-7 of the level: pass ``rtol`` of a few times the
    run's machine epsilon)."""
    x = _series(x, min_len=2)
    level = max(abs(float(np.mean(x))), np.finfo(np.float64).tiny)
    spread = float(np.std(x))
    if spread <= rtol * level:
        return (
            f"the series varies by {spread / level:.1e} of its level (at most {rtol:g}): a frozen "
            "plateau or round-off, not dynamics"
        )
    return ""


def zero_one_test(
    x, *, n_c: int = 100, ncut: int | None = None, seed: int = 0, rtol: float = 1e-8
) -> float:
    """Gottwald & Melbourne's 0–1 test for chaos (correlation method).

    For random frequencies c ∈ (π/5, 4π/5), the translation variables
    p(n) = Σ φ_j cos(jc), q(n) = Σ φ_j sin(jc) of the demeaned series φ are formed; K_c is
    the correlation between n and their mean-square displacement M(n), n ≤ ncut (default
    N/10). Returns K = median over c: ≈ 0 for regular dynamics, ≈ 1 for chaos.

    NaN when the series' variation is negligible against its level
    (:func:`negligible_variation` with ``rtol``): on a frozen series the test reads round-off
    as noise and calls it chaotic.
    """
    x = _series(x, min_len=20)
    if negligible_variation(x, rtol):
        return float("nan")
    phi = x - x.mean()
    n = phi.size
    ncut = max(2, n // 10) if ncut is None else int(ncut)
    j = np.arange(1, n + 1)
    m_len = n - ncut
    nn = np.arange(1, ncut + 1)
    rng = np.random.default_rng(seed)
    ks = []
    for c in rng.uniform(math.pi / 5, 4 * math.pi / 5, int(n_c)):
        z = np.cumsum(phi * np.exp(1j * j * c))  # p + i q
        # M(n) = mean_{i < m_len} |z[i+n] − z[i]|² via sums and an FFT cross-correlation
        a = z[:m_len]
        f = np.fft.fft(np.concatenate([a, np.zeros(n)]))
        g = np.fft.fft(np.concatenate([z, np.zeros(m_len)]))
        cross = np.fft.ifft(np.conj(f) * g)[: ncut + 1]  # Σ_i conj(z_i) z_{i+n}
        abs2 = np.abs(z) ** 2
        csum = np.concatenate([[0.0], np.cumsum(abs2)])
        shifted = csum[nn + m_len] - csum[nn]
        m = (shifted + csum[m_len] - 2 * cross[1:].real) / m_len
        if np.std(m) == 0:
            ks.append(0.0)
            continue
        ks.append(float(np.corrcoef(nn, m)[0, 1]))
    return float(np.median(ks))


@dataclasses.dataclass(frozen=True)
class ExpansionRate:
    """Method of analogues: ``slope`` of ln⟨|x(t0+k) − x(t1+k)|⟩ against k, per step, over the
    best window k = 1…``m`` (highest R²), its ``pvalue`` (slope ≠ 0, two-sided t test),
    ``expanding`` (slope > 0 and p ≤ 0.05), the mean divergence ``curve`` for k = 0…m_max,
    the number of analogue pairs and, when the slope is NaN, the ``reason``."""

    slope: float
    r2: float
    m: int
    pvalue: float
    expanding: bool
    curve: np.ndarray
    n_pairs: int
    reason: str = ""


DETRENDS = ("linear", "none")


def expansion_rate(
    x,
    *,
    e: float = 5e-5,
    n_samples: int = 1000,
    m_range=range(5, 26),
    theiler: int | None = None,
    detrend: str = "linear",
    embedding: int = 1,
    dt: float = 1.0,
    seed: int = 0,
) -> ExpansionRate:
    """Local expansion rate of a scalar series by the method of analogues.

    The series is first detrended (``"linear"``: its least-squares line removed), so a slow
    drift is not read as divergence. ``n_samples`` reference times t0 are drawn; their
    analogues are the times t1 with |x(t1) − x(t0)| < ``e`` outside the Theiler window
    |t1 − t0| > ``theiler`` (default: the largest horizon max(m_range), so the two pieces of
    trajectory compared do not overlap — a drifting series then has no analogue at all); the
    divergence D(k) = ⟨|x(t0+k) − x(t1+k)|⟩ over all pairs is fitted as ln D(k) = a + s·k on
    k = 1…m for every m in ``m_range``, keeping the best R² (Danovski et al.).

    A scalar value alone does not fix a state: analogues must move the same way at their
    times (sign of x(t + 1) − x(t)), and with ``embedding`` = d > 1 match the delay vector
    (x(t), …, x(t + d − 1)) within ``e`` in every entry (d = 1: Danovski et al.'s scalar
    analogues). A detrended series with negligible variation (a straight line) is refused.

    Limits: two phases of a smooth periodic signal also separate (algebraically) and can read
    as expanding; judge a series with the FTLEs and the 0–1 test as well.

    Args:
        dt: steps between samples (a loss recorded every 10 steps: ``dt=10``); rates are per
            step.

    Returns:
        :class:`ExpansionRate`; NaN slope with a ``reason`` when no analogue pair exists.
    """
    x = _series(x)
    if detrend not in DETRENDS:
        raise ValueError(f"detrend: unknown {detrend!r}; allowed: {', '.join(DETRENDS)}")
    if not dt > 0:
        raise ValueError(f"dt: must be > 0, got {dt!r}")
    m_max = int(max(m_range))
    theiler = m_max if theiler is None else int(theiler)
    if theiler < 0:
        raise ValueError(f"theiler: must be >= 0, got {theiler}")
    if int(embedding) != embedding or embedding < 1:
        raise ValueError(f"embedding: must be a positive integer, got {embedding!r}")
    n = x.size - max(m_max, int(embedding) - 1, 1)
    if n < 2:
        raise ValueError(f"x: needs more than max(m_range) + 1 = {m_max + 1} values")
    nan = float("nan")
    if detrend == "linear":
        t = np.arange(x.size, dtype=np.float64)
        resid = x - np.polyval(np.polyfit(t, x, 1), t)
        if float(np.std(resid)) <= 1e-8 * max(float(np.std(x)), np.finfo(np.float64).tiny):
            reason = "the detrended series has no variation left (a straight line)"
            return ExpansionRate(nan, nan, -1, nan, False, np.full(m_max + 1, nan), 0, reason)
        x = resid
    rng = np.random.default_rng(seed)
    t0s = rng.choice(n, size=min(int(n_samples), n), replace=False)
    order = np.argsort(x[:n])
    xs = x[:n][order]
    sums = np.zeros(m_max + 1)
    pairs = 0
    for t0 in t0s:
        lo = np.searchsorted(xs, x[t0] - e, side="right")
        hi = np.searchsorted(xs, x[t0] + e, side="left")
        t1 = order[lo:hi]
        t1 = t1[np.abs(t1 - t0) > theiler]
        t1 = t1[np.sign(x[t1 + 1] - x[t1]) == np.sign(x[t0 + 1] - x[t0])]
        for j in range(1, embedding):
            t1 = t1[np.abs(x[t1 + j] - x[t0 + j]) < e]
        if t1.size == 0:
            continue
        ks = np.arange(m_max + 1)
        d = np.abs(x[t0 + ks][None, :] - x[t1[:, None] + ks[None, :]])
        sums += d.sum(axis=0)
        pairs += t1.size
    if pairs == 0:
        reason = (
            f"no analogue pairs within e = {e:g} outside the Theiler window of {theiler} "
            "samples: the series does not return near its past state (a drift, or e too small)"
        )
        return ExpansionRate(nan, nan, -1, nan, False, np.full(m_max + 1, np.nan), 0, reason)
    curve = sums / pairs
    with np.errstate(divide="ignore"):
        y = np.log(curve)
    windows = ((int(m), np.arange(1, int(m) + 1, dtype=float), y[1 : int(m) + 1]) for m in m_range)
    best = best_line_fit(
        (m, k, yy) for m, k, yy in windows if k.size >= 3 and np.isfinite(yy).all()
    )
    if best is None:
        reason = "the analogue divergence is zero or not finite at every horizon"
        return ExpansionRate(nan, nan, -1, nan, False, curve, pairs, reason)
    f, m = best
    slope = f.slope / dt
    expanding = bool(slope > 0 and f.pvalue <= 0.05)
    return ExpansionRate(slope, f.r2, m, f.pvalue, expanding, curve, pairs)


__all__ = [
    "ACF",
    "Episodes",
    "ExpansionRate",
    "Segmentation",
    "autocorrelation",
    "expansion_rate",
    "fraction_increasing",
    "laminar_segments",
    "negligible_variation",
    "power_spectrum",
    "spike_mask",
    "spikes",
    "zero_one_test",
]
