"""Which automatic metric can stand in for people: agreement with side-by-side verdicts, and each metric's noise floor.

``agreement``: on every pair the humans decided (more votes for one side than the other, ties left out), does the
metric prefer the same side? The rate comes with a bootstrap 95% interval that resamples prompts, beside two chance
rates: 0.5 (a metric that ignores the images) and the rate expected from the two marginals alone
(``p_h p_m + (1 - p_h)(1 - p_m)``, a metric that prefers A as often as it does but independently of people).

``noise_floor``: the seed-to-seed SD of a metric's mean (runs of the same model and prompts with other sampling
seeds) and the prompt-to-prompt SD; ``fid_infinity``: FID at several sample sizes, fitted as ``FID_N = FID_inf +
k / N`` and extrapolated to infinitely many samples (Chong and Forsyth, "Effectively Unbiased FID and Inception
Score and where to find them", CVPR 2020).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from evaluation.stats import bootstrap_interval

Key = tuple[str, int]


def human_majority(pairs: Sequence[Mapping[str, Any]]) -> dict[Key, int]:
    """``(prompt_id, seed) -> +1`` (more votes for A), ``-1`` (for B); pairs without a majority are left out."""
    out = {}
    for p in pairs:
        margin = int(p["a_wins"]) - int(p["b_wins"])
        if margin:
            out[(str(p["prompt_id"]), int(p["seed"]))] = 1 if margin > 0 else -1
    return out


def metric_agreement(
    human: Mapping[Key, int],
    scores_a: Mapping[Key, float],
    scores_b: Mapping[Key, float],
    bootstrap_samples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """How often the metric's preferred side (higher score; lower is passed negated) matches the human majority."""
    hits: dict[str, list[float]] = defaultdict(list)
    metric_a = human_a = 0
    ties = missing = 0
    for key, verdict in human.items():
        if key not in scores_a or key not in scores_b:
            missing += 1
            continue
        diff = scores_a[key] - scores_b[key]
        if math.isnan(diff) or diff == 0:
            ties += 1
            continue
        prefers = 1 if diff > 0 else -1
        hits[key[0]].append(float(prefers == verdict))
        metric_a += prefers > 0
        human_a += verdict > 0
    n = sum(len(v) for v in hits.values())
    rate = sum(map(sum, hits.values())) / n if n else math.nan
    p_m, p_h = (metric_a / n, human_a / n) if n else (math.nan, math.nan)
    return {
        "agreement": rate,
        "bootstrap95": bootstrap_interval(list(hits.values()), bootstrap_samples, seed),
        "pairs": n,
        "prompts": len(hits),
        "chance": 0.5,
        "chance_from_marginals": p_h * p_m + (1 - p_h) * (1 - p_m),
        "metric_prefers_a": p_m,
        "humans_prefer_a": p_h,
        "metric_ties": ties,
        "missing_scores": missing,
    }


def noise_floor(scores: Mapping[Key, float]) -> dict[str, Any]:
    """Seed-to-seed SD of the mean over prompts (prompts present for every seed) and prompt-to-prompt SD."""
    by_seed: dict[int, dict[str, float]] = defaultdict(dict)
    for (prompt, s), v in scores.items():
        if not math.isnan(v):
            by_seed[s][prompt] = v
    common = set.intersection(*(set(d) for d in by_seed.values())) if by_seed else set()
    means = [float(np.mean([d[p] for p in common])) for d in by_seed.values()] if common else []
    per_prompt = [float(np.mean([d[p] for d in by_seed.values()])) for p in common]
    return {
        "seeds": len(by_seed),
        "prompts": len(common),
        "seed_means": means,
        "seed_sd": float(np.std(means, ddof=1)) if len(means) > 1 else math.nan,
        "prompt_sd": float(np.std(per_prompt, ddof=1)) if len(per_prompt) > 1 else math.nan,
    }


def fid_infinity(
    feats: np.ndarray, reference: np.ndarray, sizes: Sequence[int] | None = None, seed: int = 0
) -> dict[str, Any]:
    """FID_inf: FID of random subsets of ``feats`` (``sizes``; default 8 sizes from a fifth of the set to all of
    it) against ``reference``, fitted linearly in 1/N; the intercept is FID at N = infinity."""
    from evaluation.fid import frechet_distance

    n = len(feats)
    if sizes is None:
        sizes = sorted({int(round(x)) for x in np.linspace(max(n // 5, 2), n, 8)})
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or min(sizes) < 2 or max(sizes) > n:
        raise ValueError(f"fid_infinity needs >= 2 sizes between 2 and {n} samples, got {sizes}")
    rng = np.random.default_rng(seed)
    fids = [frechet_distance(feats[rng.choice(n, size=s, replace=False)], reference) for s in sizes]
    slope, intercept = np.polyfit(1.0 / np.asarray(sizes, dtype=np.float64), np.asarray(fids), 1)
    return {"sizes": sizes, "fid": fids, "fid_infinity": float(intercept), "slope": float(slope)}
