import numpy as np
import pytest

from chaosjax import series


def logistic(n, x0=0.3):
    x = np.empty(n)
    x[0] = x0
    for i in range(1, n):
        x[i] = 4 * x[i - 1] * (1 - x[i - 1])
    return x


def test_monotone_decay_is_regular():
    d = np.exp(-0.01 * np.arange(3000))
    assert series.fraction_increasing(d) == 0.0
    assert series.zero_one_test(d) < 0.5
    assert len(series.spikes(d)) == 0


def test_period_two():
    p = np.tile([1.0, 0.2], 2000)
    acf = series.autocorrelation(p, 5, n_surrogates=200)
    assert abs(acf.acf[1] + 1) < 1e-3 and abs(acf.acf[2] - 1) < 1e-3
    assert 1 in acf.significant
    assert abs(series.zero_one_test(p)) < 0.1
    assert series.fraction_increasing(p) == pytest.approx(0.5, abs=1e-3)
    f, pw = series.power_spectrum(p)
    assert abs(f[np.argmax(pw)] - 0.5) < 1e-9


def test_logistic_is_chaotic():
    x = logistic(10_000)
    assert series.zero_one_test(x) > 0.9
    r = series.expansion_rate(x, e=1e-3)
    assert r.expanding and r.slope > 0.5 and r.pvalue < 0.05 and r.n_pairs > 100
    # shuffled noise: no autocorrelation beyond the band at most lags
    acf = series.autocorrelation(x, 20, n_surrogates=300)
    assert len(acf.significant) <= 4  # lag 0 plus chance exceedances


def test_quasi_periodic_is_regular():
    t = np.arange(5000)
    assert abs(series.zero_one_test(np.sin(0.3 * t) + np.sin(np.sqrt(2) * t))) < 0.1


def test_inserted_laminar_stretches_are_recovered():
    y = logistic(3000)
    for a, b in [(500, 620), (1500, 1550), (2200, 2400)]:
        y[a:b] = y[a]
    seg = series.laminar_segments(y, min_length=20)
    np.testing.assert_array_equal(seg.laminar, [[500, 619], [1500, 1549], [2200, 2399]])
    np.testing.assert_array_equal(seg.laminar_lengths, [119, 49, 199])
    st = seg.stats()
    assert st["n_laminar"] == 3 and st["max_laminar"] == 199
    assert seg.burst_lengths.sum() + seg.laminar_lengths.sum() == 2999


def test_spikes_and_catapults():
    x = np.r_[np.linspace(1, 0.1, 50), 0.5, 0.9, 0.3, 0.08, np.linspace(0.08, 0.01, 30)]
    ep = series.spikes(x, factor=2.0)
    assert len(ep) == 1 and ep.start[0] == 50 and ep.peak[0] == 51
    assert ep.height[0] == pytest.approx(0.9 / 0.1)


def test_analogues_without_pairs_is_nan():
    r = series.expansion_rate(np.exp(np.linspace(0, 1, 200)), e=1e-9, m_range=range(5, 10))
    assert np.isnan(r.slope) and not r.expanding and r.n_pairs == 0 and r.reason


@pytest.mark.parametrize(
    "call, msg",
    [
        (lambda: series.fraction_increasing([1.0]), "at least"),
        (lambda: series.zero_one_test(np.r_[np.ones(30), np.nan]), "NaN"),
        (lambda: series.spikes(np.ones(10), factor=0.5), "factor"),
        (lambda: series.autocorrelation(np.ones((3, 3))), "1-D"),
    ],
)
def test_bad_input(call, msg):
    with pytest.raises(ValueError, match=msg):
        call()


def test_phase_rule():
    from chaosjax.experiments.protocols import phases

    t = np.arange(1, 11) * 100
    f = np.array([1.0, 0.9, 0.6, 0.3, 0.2, 0.12, 0.05, 0.02, -0.01, 0.03])
    exp_end, ref_start = phases(f, t)
    assert exp_end == 300  # windows ending at 100–300 have FTLE ≥ 0.5·max
    assert ref_start == 600  # windows after 600 stay within 0.1·max
    assert np.isnan(phases(np.full(5, np.nan), t[:5])[0])
