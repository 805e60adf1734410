"""Paired analysis of an ablation: effects prompt by prompt within seeds, combined over seeds, and the power of the
design.

Cells of one seed share their data order, their diffusion noise at every step and the sampling noise of every
evaluation prompt (common random numbers), so their scores on one prompt pair up. For an effect (a factor's level
minus its reference) and a metric scored per image:

1. within seed ``s``, per prompt ``p``: ``d_sp`` = mean score of the cells at the level minus mean score of the
   cells at the reference (in a half fraction, two cells each); the seed's effect is ``theta_s = mean_p d_sp`` with
   sampling variance ``v_s = var_p(d_sp) / n_p`` (prompts as a sample of the prompt distribution);
2. over seeds, a random-effects combination: DerSimonian-Laird between-seed variance ``tau^2`` of the effect (what
   training randomness adds), weights ``1 / (v_s + tau^2)``, and the Hartung-Knapp-Sidik-Jonkman interval on
   ``S - 1`` degrees of freedom (IntHout, Ioannidis & Borm 2014: near-nominal coverage with few studies; a seeded
   simulation in tests/test_paired.py checks it).

The unpaired counterpart ``v_s`` (what the same prompt counts would give had every cell drawn its own sampling noise:
the sum of the cells' own prompt variances) measures what the pairing buys. Power: the seed-level effect has standard
deviation ``sigma_e = sqrt(tau^2 + v)``; the design tests it with a one-sample t-test over ``S`` seeds (two-sided,
alpha 0.05), whose power at effect ``delta`` is the non-central t tail with ``nc = delta sqrt(S) / sigma_e``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
from scipy import integrate, optimize, stats


@dataclass(frozen=True)
class SeedEffect:
    """One seed's paired effect: the estimate, its paired and unpaired sampling variances, prompts used."""

    estimate: float
    variance: float
    unpaired_variance: float
    prompts: int


def seed_effect(level: np.ndarray, reference: np.ndarray) -> SeedEffect:
    """From per-prompt scores ``[cells, prompts]`` of the level's and the reference's cells (same prompts, same
    columns); prompts with a missing score in any cell are left out."""
    level, reference = np.atleast_2d(np.asarray(level, float)), np.atleast_2d(np.asarray(reference, float))
    keep = ~(np.isnan(level).any(0) | np.isnan(reference).any(0))
    a, b = level[:, keep], reference[:, keep]
    n = int(keep.sum())
    if n < 2:
        return SeedEffect(math.nan, math.nan, math.nan, n)
    d = a.mean(0) - b.mean(0)
    unpaired = (a.var(1, ddof=1).sum() / a.shape[0] ** 2 + b.var(1, ddof=1).sum() / b.shape[0] ** 2) / n
    return SeedEffect(float(d.mean()), float(d.var(ddof=1) / n), float(unpaired), n)


@dataclass(frozen=True)
class Combined:
    """An effect combined over seeds: estimate, 95% half-width, between-seed variance, seeds."""

    estimate: float
    half_width: float
    tau2: float
    seeds: int
    se: float


def random_effects(estimates: Sequence[float], variances: Sequence[float], level: float = 0.95) -> Combined:
    """DerSimonian-Laird random-effects mean with the Hartung-Knapp-Sidik-Jonkman interval (t on S-1 df)."""
    y, v = np.asarray(estimates, float), np.asarray(variances, float)
    ok = ~(np.isnan(y) | np.isnan(v))
    y, v = y[ok], np.maximum(v[ok], 1e-12)
    s = len(y)
    if s == 0:
        return Combined(math.nan, math.nan, math.nan, 0, math.nan)
    if s == 1:
        return Combined(float(y[0]), math.nan, math.nan, 1, float(math.sqrt(v[0])))
    w = 1 / v
    fixed = float((w * y).sum() / w.sum())
    q = float((w * (y - fixed) ** 2).sum())
    tau2 = max(0.0, (q - (s - 1)) / (w.sum() - (w**2).sum() / w.sum()))
    w_star = 1 / (v + tau2)
    mean = float((w_star * y).sum() / w_star.sum())
    q_hk = float((w_star * (y - mean) ** 2).sum() / (s - 1))
    se = math.sqrt(q_hk / w_star.sum())
    return Combined(mean, float(stats.t.ppf(0.5 + level / 2, s - 1) * se), float(tau2), s, se)


def power(delta: float, sigma: float, seeds: int, alpha: float = 0.05) -> float:
    """Power of the two-sided one-sample t-test over ``seeds`` seed-level effects of SD ``sigma`` at effect
    ``delta``."""
    if seeds < 2 or not sigma > 0:
        return math.nan
    df = seeds - 1
    crit = float(stats.t.ppf(1 - alpha / 2, df))
    nc = abs(delta) * math.sqrt(seeds) / sigma
    p = float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))
    return p if not math.isnan(p) else _t_test_power(crit, df, nc)


def _t_test_power(crit: float, df: int, nc: float) -> float:
    """P(|T| > crit) for T non-central t (``df``, ``nc``), by integrating over the chi-square: T = (Z + nc) /
    sqrt(V / df), so P(T > c) = E_V[Phi(nc - c sqrt(V / df))]. Used where scipy's non-central t returns NaN (it
    does for small ``df``, e.g. 2 seeds at nc ~ 13, where the power is ~0.65, not 0 or 1)."""

    def upper(v: float) -> float:
        return float(stats.norm.sf(crit * math.sqrt(v / df) - nc) * stats.chi2.pdf(v, df))

    def lower(v: float) -> float:
        return float(stats.norm.cdf(-crit * math.sqrt(v / df) - nc) * stats.chi2.pdf(v, df))

    return float(integrate.quad(upper, 0, math.inf, limit=200)[0] + integrate.quad(lower, 0, math.inf, limit=200)[0])


def minimum_detectable_effect(sigma: float, seeds: int, target: float = 0.8, alpha: float = 0.05) -> float:
    """The smallest effect the design detects with probability ``target`` (two-sided t-test, ``seeds`` seeds)."""
    if seeds < 2 or not sigma > 0:
        return math.nan
    root = optimize.brentq(lambda d: power(d, sigma, seeds, alpha) - target, 1e-12 * sigma, 100 * sigma)
    return float(cast(float, root))


def seeds_needed(delta: float, sigma: float, target: float = 0.8, alpha: float = 0.05, limit: int = 10_000) -> int:
    """The fewest seeds (>= 2) whose t-test detects ``delta`` with probability ``target``; -1 past ``limit``."""
    if not sigma > 0 or delta == 0 or math.isnan(delta):
        return -1
    high = 2
    while power(delta, sigma, high, alpha) < target:  # power grows with seeds: double, then bisect
        if high >= limit:
            return -1
        high = min(2 * high, limit)
    low = max(2, high // 2)
    if power(delta, sigma, low, alpha) >= target:
        return low
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if power(delta, sigma, mid, alpha) >= target else (mid, high)
    return high


def prompts_needed(
    delta: float, tau2: float, prompt_var: float, seeds: int, target: float = 0.8, alpha: float = 0.05
) -> float:
    """Prompts per seed that would let ``seeds`` seeds detect ``delta`` (the per-prompt difference variance
    ``prompt_var`` shrinks with prompts, ``tau2`` does not); inf when no prompt count suffices."""
    if seeds < 2 or delta == 0 or math.isnan(delta) or not prompt_var > 0:
        return math.nan
    allowed = minimum_detectable_effect(1.0, seeds, target, alpha)  # MDE in units of sigma_e
    sigma_max2 = (abs(delta) / allowed) ** 2
    if sigma_max2 <= tau2:
        return math.inf
    return float(math.ceil(prompt_var / (sigma_max2 - tau2)))
