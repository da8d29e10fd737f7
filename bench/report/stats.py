"""The statistics the reports print: few, standard, and honest about small samples.

Ten seeds per variant is a small sample, so every rate comes with an interval that stays sensible
at 0/10 and 10/10 (Wilson), every median with a bootstrap interval, and every comparison with an
exact test rather than a normal approximation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

Numbers = Sequence[float] | np.ndarray


def _finite(values: Numbers) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).ravel()
    return a[np.isfinite(a)]


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n; (nan, nan) when n == 0.

    Unlike the normal approximation it never leaves [0, 1] and is not empty at k = 0 or k = n,
    which matters at ten seeds (7/10 -> [0.40, 0.89]).
    """
    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    z = stats.norm.ppf(0.5 + confidence / 2)
    p = k / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    # At k = 0 (k = n) the bound is exactly 0 (1) in exact arithmetic; floats miss it by 1e-16.
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def median_iqr(values: Numbers) -> tuple[float, float, float]:
    """(median, 25th percentile, 75th percentile) of the finite values; NaNs when none."""
    a = _finite(values)
    if len(a) == 0:
        return (math.nan, math.nan, math.nan)
    q25, med, q75 = np.percentile(a, [25, 50, 75])
    return (float(med), float(q25), float(q75))


def bootstrap_median_ci(
    values: Numbers, confidence: float = 0.95, n_boot: int = 4000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of the finite values.

    Seeded, so the same results give the same page. With one value the interval is that value;
    with none it is (nan, nan).
    """
    a = _finite(values)
    if len(a) == 0:
        return (math.nan, math.nan)
    if len(a) == 1:
        return (float(a[0]), float(a[0]))
    rng = np.random.default_rng(seed)
    medians = np.median(a[rng.integers(0, len(a), size=(n_boot, len(a)))], axis=1)
    lo, hi = np.percentile(medians, [50 * (1 - confidence), 50 * (1 + confidence)])
    return (float(lo), float(hi))


def fisher_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided Fisher exact test p-value for k1/n1 vs k2/n2 successes; nan if a group is empty.

    Exact, because with ten seeds per variant the chi-squared approximation is not valid.
    """
    if n1 <= 0 or n2 <= 0:
        return math.nan
    table = [[k1, n1 - k1], [k2, n2 - k2]]
    return float(stats.fisher_exact(table, alternative="two-sided").pvalue)


def prob_superiority(a: Numbers, b: Numbers) -> float:
    """P(X > Y) + P(X = Y) / 2 for X drawn from `a` and Y from `b` (finite values only).

    The common-language effect size: the chance that a random seed of A ends with a higher
    value than a random seed of B, ties counting half. Equals Mann-Whitney U / (n_a n_b).
    """
    x, y = _finite(a), _finite(b)
    if len(x) == 0 or len(y) == 0:
        return math.nan
    diff = x[:, None] - y[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def mann_whitney_p(a: Numbers, b: Numbers) -> float:
    """Two-sided Mann-Whitney U test p-value (finite values); nan when a group is empty."""
    x, y = _finite(a), _finite(b)
    if len(x) == 0 or len(y) == 0:
        return math.nan
    if np.all(x == x[0]) and np.all(y == x[0]):
        return 1.0  # identical constants: scipy warns and returns nan, but there is no difference
    return float(stats.mannwhitneyu(x, y, alternative="two-sided").pvalue)


def ecdf(values: Numbers, n_total: int) -> tuple[np.ndarray, np.ndarray]:
    """Step ECDF of `values` scaled by `n_total` observations (runs that never got there count).

    Returns (x, y) with y[i] = fraction of the n_total runs with value <= x[i]; the curve ends at
    len(values) / n_total, not at 1, so a variant that converges in 3 of 10 seeds plateaus at 0.3.
    """
    a = np.sort(_finite(values))
    if n_total <= 0:
        return a, np.zeros_like(a)
    return a, np.arange(1, len(a) + 1) / n_total
