"""The report's statistics against known values and against scipy's own implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from bench.report import stats


@pytest.mark.parametrize(
    "k, n, lo, hi",
    [
        (7, 10, 0.3968, 0.8922),  # the example: [0.40, 0.89]
        (0, 10, 0.0, 0.2775),  # never empty at 0/n ...
        (10, 10, 0.7225, 1.0),  # ... nor at n/n
        (2, 10, 0.0567, 0.5098),
        (50, 100, 0.4038, 0.5962),
    ],
)
def test_wilson_interval_known_values(k: int, n: int, lo: float, hi: float) -> None:
    got = stats.wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)
    assert 0 <= got[0] <= k / n <= got[1] <= 1


def test_wilson_interval_matches_scipy() -> None:
    for k, n in [(3, 7), (1, 20), (19, 20), (33, 50)]:
        ci = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert stats.wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_wilson_interval_edge_cases() -> None:
    assert all(math.isnan(v) for v in stats.wilson_interval(0, 0))
    with pytest.raises(ValueError):
        stats.wilson_interval(11, 10)
    narrow, wide = stats.wilson_interval(7, 10, 0.5), stats.wilson_interval(7, 10, 0.99)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]


def test_median_iqr_ignores_nan() -> None:
    med, q25, q75 = stats.median_iqr([1.0, 2.0, 3.0, 4.0, 5.0, np.nan])
    assert (med, q25, q75) == (3.0, 2.0, 4.0)
    assert all(math.isnan(v) for v in stats.median_iqr([np.nan]))


def test_bootstrap_median_ci_is_deterministic_and_sensible() -> None:
    values = [8000, 10000, 12000, 14000, 16000, 18000, 20000]
    a = stats.bootstrap_median_ci(values)
    assert a == stats.bootstrap_median_ci(values)  # seeded: same results, same page
    assert min(values) <= a[0] <= np.median(values) <= a[1] <= max(values)
    assert stats.bootstrap_median_ci([5.0]) == (5.0, 5.0)
    assert all(math.isnan(v) for v in stats.bootstrap_median_ci([]))
    # More data, narrower interval.
    rng = np.random.default_rng(0)
    small = stats.bootstrap_median_ci(rng.normal(0, 1, 10))
    large = stats.bootstrap_median_ci(rng.normal(0, 1, 1000))
    assert large[1] - large[0] < small[1] - small[0]


def test_fisher_p() -> None:
    assert stats.fisher_p(7, 10, 2, 10) == pytest.approx(0.06978, abs=1e-4)
    assert stats.fisher_p(10, 10, 7, 10) == pytest.approx(
        sps.fisher_exact([[10, 0], [7, 3]]).pvalue
    )
    assert stats.fisher_p(5, 10, 5, 10) == pytest.approx(1.0)
    assert math.isnan(stats.fisher_p(1, 0, 1, 2))


def test_prob_superiority_is_mann_whitney_u_over_pairs() -> None:
    a = [0.99, 0.98, 0.98, 0.70, 0.985]
    b = [0.98, 0.60, 0.99, 0.50]
    u = sps.mannwhitneyu(a, b).statistic  # ties count half in U as well
    assert stats.prob_superiority(a, b) == pytest.approx(u / (len(a) * len(b)))
    assert stats.prob_superiority(a, b) + stats.prob_superiority(b, a) == pytest.approx(1.0)
    assert stats.prob_superiority([1, 2], [1, 2]) == 0.5
    assert stats.prob_superiority([3, 4], [1, 2]) == 1.0
    assert math.isnan(stats.prob_superiority([], [1.0]))
    assert stats.prob_superiority([1.0, np.nan], [0.0]) == 1.0  # NaN (no final) left out


def test_mann_whitney_p() -> None:
    a, b = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]
    assert stats.mann_whitney_p(a, b) == pytest.approx(sps.mannwhitneyu(a, b).pvalue)
    assert stats.mann_whitney_p([0.99] * 3, [0.99] * 4) == 1.0
    assert math.isnan(stats.mann_whitney_p([], [1]))


def test_ecdf_plateaus_at_the_success_rate() -> None:
    x, y = stats.ecdf([30, 10, 20, np.nan], n_total=10)
    assert x.tolist() == [10, 20, 30]
    assert y.tolist() == pytest.approx([0.1, 0.2, 0.3])
