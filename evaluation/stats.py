"""Statistics for side-by-side studies: Wilson and bootstrap intervals, Fleiss' kappa, Krippendorff's alpha."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Hashable, Iterable, Sequence

import numpy as np


def wilson_interval(successes: float, n: float, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927); (nan, nan) when n == 0."""
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (centre - half, centre + half)


def bootstrap_interval(
    groups: Sequence[Sequence[float]], num_samples: int = 2000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile interval of the mean score, resampling whole groups (e.g. all votes on one prompt) with
    replacement."""
    if not groups:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    sums = np.array([float(np.sum(g)) for g in groups])
    counts = np.array([len(g) for g in groups], dtype=np.float64)
    idx = rng.integers(0, len(groups), size=(num_samples, len(groups)))
    means = sums[idx].sum(1) / np.maximum(counts[idx].sum(1), 1)
    return (float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2)))


def fleiss_kappa(ratings: Iterable[Sequence[Hashable]]) -> float:
    """Fleiss' kappa (Fleiss 1971) for items each rated by the same number of raters (items with fewer are dropped);
    NaN where it is undefined (every rating in one category: chance agreement is 1)."""
    items = [list(r) for r in ratings]
    if not items:
        return math.nan
    n = Counter(len(r) for r in items).most_common(1)[0][0]
    items = [r for r in items if len(r) == n]
    if n < 2 or not items:
        return math.nan
    categories = sorted({c for r in items for c in r}, key=str)
    table = np.array([[r.count(c) for c in categories] for r in items], dtype=np.float64)
    p_j = table.sum(0) / table.sum()
    p_i = ((table * (table - 1)).sum(1)) / (n * (n - 1))
    p_bar, p_e = p_i.mean(), (p_j**2).sum()
    return float((p_bar - p_e) / (1 - p_e)) if p_e < 1 else math.nan


def krippendorff_alpha_nominal(units: Iterable[Sequence[Hashable]]) -> float:
    """Krippendorff's alpha for nominal data (Krippendorff 2004); units may have different numbers of ratings.

    NaN where alpha is undefined: no unit with two ratings, or every pairable rating the same value (the expected
    disagreement is 0; the reference ``krippendorff`` package raises there)."""
    coincidence: dict[tuple, float] = defaultdict(float)
    for values in units:
        values = [v for v in values if v is not None]
        m = len(values)
        if m < 2:
            continue
        counts = Counter(values)
        for c, k in counts.items():
            for d, k2 in counts.items():
                coincidence[(c, d)] += (k * (k2 - (1 if c == d else 0))) / (m - 1)
    if not coincidence:
        return math.nan
    totals: dict[Hashable, float] = defaultdict(float)
    for (c, _), v in coincidence.items():
        totals[c] += v
    n = sum(totals.values())
    observed = sum(v for (c, d), v in coincidence.items() if c != d)
    expected = sum(totals[c] * totals[d] for c in totals for d in totals if c != d) / (n - 1)
    return 1.0 - observed / expected if expected > 0 else math.nan
