"""The report's views of an ablation beyond the seed-level table: paired effects prompt by prompt, the power of the
design, effects at equal training compute, and two sweeps side by side (``python -m k3lab.report``).

Every function takes the report's run table (one row per cell and seed: ``override/<axis>`` columns, ``seed``,
metrics, ``output_dir``) and reads each cell's ``eval/per_prompt.csv`` and ``curve.csv`` from its folder."""

# pandas 3's inline annotations type column, cell and scalar reads as unions (Series | DataFrame | NDArray | scalar)
# that every float(...)/.iloc/.dropna here trips: those three rules are off in this file only.
# pyright: reportArgumentType=false, reportAttributeAccessIssue=false, reportCallIssue=false

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from k3lab.ablation import paired

OVERRIDE_PREFIX = "override/"
# metric -> (split, per-prompt column): the metrics scored image by image, whose cells pair up prompt by prompt
PAIRED_METRICS: dict[str, tuple[str, str]] = {
    "eval/seen/single_object": ("seen", "single_object"),
    "eval/seen/colors": ("seen", "colors"),
    "eval/clip_score": ("seen", "clip_score"),
}
CURVE_METRICS: dict[str, str] = {"eval/seen/single_object": "single_object", "eval/seen/colors": "colors"}


def records(frame: pd.DataFrame) -> Iterator[Any]:
    """The frame's rows as named tuples (pandas types ``itertuples`` as plain tuples: the fields read untyped)."""
    return iter(frame.itertuples())


def factor_axes(runs: pd.DataFrame) -> list[str]:
    """The override columns that vary across cells (seed aside)."""
    return [c for c in runs.columns if c.startswith(OVERRIDE_PREFIX) and int(runs[c].nunique(dropna=False)) > 1]


def contrast(values: pd.Series, levels: pd.Series, level: str, reference: str) -> float:
    """Mean of ``values`` at ``level`` minus the mean at ``reference`` (NaN when a side is empty)."""
    a, b = values[levels == level].dropna(), values[levels == reference].dropna()
    return float(a.mean() - b.mean()) if len(a) and len(b) else float("nan")


def read_per_prompt(output_dir: str) -> pd.DataFrame | None:
    """A cell's ``eval/per_prompt.csv`` (every per-image score), or None when it wrote none."""
    path = Path(str(output_dir)) / "eval" / "per_prompt.csv"
    return pd.read_csv(path) if path.is_file() else None


def read_curve(output_dir: str) -> pd.DataFrame | None:
    """A cell's ``curve.csv`` (learning-curve points), or None when it wrote none."""
    path = Path(str(output_dir)) / "curve.csv"
    return pd.read_csv(path) if path.is_file() else None


def _levels(runs: pd.DataFrame, axis: str, reference: dict[str, str] | None) -> tuple[str, list[str]]:
    levels = [str(v) for v in dict.fromkeys(runs[axis])]
    ref = (reference or {}).get(axis.removeprefix(OVERRIDE_PREFIX), levels[0])
    ref = ref if ref in levels else levels[0]
    return ref, [lv for lv in levels if lv != ref]


def paired_effects(
    runs: pd.DataFrame,
    reference: dict[str, str] | None = None,
    reader: Callable[[str], pd.DataFrame | None] = read_per_prompt,
) -> pd.DataFrame:
    """Each effect on each paired metric, prompt by prompt within seeds, combined over seeds
    (:mod:`k3lab.ablation.paired`): ``effect``, ``ci95`` (HKSJ), ``tau2``, ``prompt_var`` (per-prompt difference
    variance), ``v_paired`` / ``v_unpaired`` (mean within-seed sampling variance), ``prompts``, ``seeds``."""
    tables = {i: t for i, r in runs.iterrows() if (t := reader(r["output_dir"])) is not None}
    out = []
    for axis in factor_axes(runs):
        ref, others = _levels(runs, axis, reference)
        for level in others:
            for metric, (split, column) in PAIRED_METRICS.items():
                effects, prompt_vars = [], []
                for _, seed_runs in runs.groupby("seed"):
                    sides = {}
                    for side in (level, ref):
                        frames = [
                            tables[i].loc[tables[i]["split"] == split].set_index("prompt_id")[column]
                            for i in seed_runs.index[seed_runs[axis].astype(str) == side]
                            if i in tables and column in tables[i]
                        ]
                        sides[side] = frames
                    if not sides[level] or not sides[ref]:
                        continue
                    joined = pd.concat(sides[level] + sides[ref], axis=1, join="inner")
                    n_level = len(sides[level])
                    arr = joined.to_numpy(float).T
                    effect = paired.seed_effect(arr[:n_level], arr[n_level:])
                    if effect.prompts >= 2:
                        effects.append(effect)
                        prompt_vars.append(effect.variance * effect.prompts)
                if not effects:
                    continue
                combined = paired.random_effects([e.estimate for e in effects], [e.variance for e in effects])
                out.append(
                    {
                        "axis": axis.removeprefix(OVERRIDE_PREFIX),
                        "level": level,
                        "reference": ref,
                        "metric": metric,
                        "effect": combined.estimate,
                        "ci95": combined.half_width,
                        "tau2": combined.tau2,
                        "prompt_var": float(np.mean(prompt_vars)),
                        "v_paired": float(np.mean([e.variance for e in effects])),
                        "v_unpaired": float(np.mean([e.unpaired_variance for e in effects])),
                        "prompts": int(np.mean([e.prompts for e in effects])),
                        "seeds": combined.seeds,
                    }
                )
    return pd.DataFrame(out)


def power_table(paired_table: pd.DataFrame, seeds: int, target: float = 0.8) -> pd.DataFrame:
    """Per metric: the seed-level effect SD ``sigma_e = sqrt(tau^2 + v)`` pooled over the effects, its parts, and
    the minimum detectable effect at ``target`` power with ``seeds`` seeds (two-sided t-test, alpha 0.05)."""
    rows = []
    for metric, group in paired_table.groupby("metric", sort=False) if len(paired_table) else []:
        tau2, v = float(group["tau2"].fillna(0).mean()), float(group["v_paired"].mean())
        sigma = math.sqrt(tau2 + v)
        rows.append(
            {
                "metric": metric,
                "sigma_e": sigma,
                "tau": math.sqrt(tau2),
                "prompt_sd": math.sqrt(v),
                "prompts": int(group["prompts"].mean()),
                "seeds": seeds,
                "mde80": paired.minimum_detectable_effect(sigma, seeds, target),
                "pairing_variance_ratio": ratio(float(group["v_unpaired"].mean()), v),
                "pairing_width_ratio": math.sqrt(ratio(tau2 + v, tau2 + float(group["v_unpaired"].mean()))),
            }
        )
    return pd.DataFrame(rows)


def resolve_plan(paired_table: pd.DataFrame, power: pd.DataFrame, target: float = 0.8) -> pd.DataFrame:
    """For each effect whose paired interval includes 0: seeds (at today's prompts) and prompts per seed (at today's
    seeds) that would detect an effect of its observed size with ``target`` power."""
    sigma = dict(zip(power["metric"], power["sigma_e"], strict=False)) if len(power) else {}
    rows = []
    for r in records(paired_table) if len(paired_table) else []:
        if math.isnan(r.ci95) or abs(r.effect) > r.ci95:
            continue
        rows.append(
            {
                "axis": r.axis,
                "level": r.level,
                "metric": r.metric,
                "effect": r.effect,
                "seeds_needed": paired.seeds_needed(r.effect, sigma.get(r.metric, float("nan")), target),
                "prompts_needed": paired.prompts_needed(
                    r.effect, float(0 if math.isnan(r.tau2) else r.tau2), r.prompt_var, int(r.seeds), target
                ),
            }
        )
    return pd.DataFrame(rows)


def plan(power: pd.DataFrame, delta: float, metric: str = "eval/seen/single_object", target: float = 0.8) -> dict:
    """How many seeds (at this design's prompts per seed) detect an effect of ``delta`` on ``metric``."""
    row = power[power["metric"] == metric]
    if not len(row):
        raise ValueError(f"no paired estimate of {metric!r} in this sweep (paired metrics: {list(PAIRED_METRICS)})")
    sigma = float(row["sigma_e"].iloc[0])
    n = paired.seeds_needed(delta, sigma, target)
    return {
        "metric": metric,
        "delta": delta,
        "sigma_e": sigma,
        "target_power": target,
        "seeds_needed": n,
        "power_at_seeds": paired.power(delta, sigma, n) if n > 0 else float("nan"),
        "power_now": paired.power(delta, sigma, int(row["seeds"].iloc[0])),
        "seeds_now": int(row["seeds"].iloc[0]),
    }


def equal_compute(
    runs: pd.DataFrame,
    reference: dict[str, str] | None = None,
    reader: Callable[[str], pd.DataFrame | None] = read_curve,
) -> pd.DataFrame:
    """Each effect at equal training FLOPs beside equal steps, from the learning curves: within a seed, every cell is
    read at the FLOPs the cheapest cell of the seed spent in all (linear interpolation along its curve of
    ``step x perf/flops_per_step``), and at the last common step; ``sign_flip`` marks an effect whose sign differs.
    Where the curves carry ``train_seconds`` the same reading at equal wall seconds (the seconds the seed's quickest
    cell trained; this machine's speed, not a property of the model) gives ``equal_seconds`` and ``seconds_ratio``."""
    if "perf/flops_per_step" not in runs:
        return pd.DataFrame()
    curves = {i: c for i, r in runs.iterrows() if (c := reader(r["output_dir"])) is not None and len(c)}
    out = []
    for axis in factor_axes(runs):
        ref, others = _levels(runs, axis, reference)
        for level in others:
            for metric, column in CURVE_METRICS.items():
                at_flops, at_steps, at_seconds, seconds_ratio = [], [], [], []
                for _, seed_runs in runs.groupby("seed"):
                    usable = [i for i in seed_runs.index if i in curves]
                    if len(usable) != len(seed_runs):
                        continue
                    steps = {i: curves[i]["step"].to_numpy(float) for i in usable}
                    flops = {i: steps[i] * float(runs.at[i, "perf/flops_per_step"]) for i in usable}
                    levels = seed_runs.loc[usable, axis].astype(str)
                    at_flops.append(contrast(_read_at_common_budget(flops, curves, column), levels, level, ref))
                    at_steps.append(contrast(_read_at_common_budget(steps, curves, column), levels, level, ref))
                    if all("train_seconds" in curves[i] for i in usable):
                        secs = {i: curves[i]["train_seconds"].to_numpy(float) for i in usable}
                        at_seconds.append(contrast(_read_at_common_budget(secs, curves, column), levels, level, ref))
                        total = pd.Series({i: secs[i][-1] for i in usable})
                        seconds_ratio.append(ratio(total[levels == level].mean(), total[levels == ref].mean()))
                if not at_flops:
                    continue
                flops_mean, flops_half = interval(at_flops)
                steps_mean, steps_half = interval(at_steps)
                secs_mean, secs_half = interval(at_seconds)
                cost = runs.groupby(runs[axis].astype(str))["perf/flops_per_step"].mean()
                out.append(
                    {
                        "axis": axis.removeprefix(OVERRIDE_PREFIX),
                        "level": level,
                        "reference": ref,
                        "metric": metric,
                        "equal_steps": steps_mean,
                        "equal_steps_ci95": steps_half,
                        "equal_flops": flops_mean,
                        "equal_flops_ci95": flops_half,
                        "flops_ratio": float(np.divide(cost.get(level, np.nan), cost.get(ref, np.nan))),
                        "sign_flip": bool(np.sign(steps_mean) * np.sign(flops_mean) < 0),
                        "equal_seconds": secs_mean,
                        "equal_seconds_ci95": secs_half,
                        "seconds_ratio": float(np.mean(seconds_ratio)) if seconds_ratio else float("nan"),
                    }
                )
    return pd.DataFrame(out)


def _read_at_common_budget(xs: dict[Any, np.ndarray], curves: dict[Any, pd.DataFrame], column: str) -> pd.Series:
    """Each cell's ``column`` read off its curve (linear interpolation along ``xs[cell]``: steps, FLOPs or seconds)
    at the smallest total any of the cells reached: the budget they all spent."""
    budget = min(x[-1] for x in xs.values())
    return pd.Series({i: _interp(budget, x, curves[i][column].to_numpy(float)) for i, x in xs.items()})


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is 0 (a metric that did not vary)."""
    return a / b if b else float("nan")


def _interp(x: float, xs: np.ndarray, ys: np.ndarray) -> float:
    """``ys`` at ``x`` along ``xs`` (linear); NaN outside the curve's range."""
    if len(xs) == 0 or x < xs[0] - 1e-9 or x > xs[-1] + 1e-9:
        return float("nan")
    return float(np.interp(x, xs, ys))


def interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the two-sided t-interval); half-width NaN with fewer than two values."""
    from scipy import stats

    v = np.asarray([x for x in values if not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def resolved(effect: float, half: float) -> bool:
    """An interval that excludes 0."""
    return not math.isnan(half) and abs(effect) > half


def compare(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Two sweeps' effect tables (columns axis, level, metric, effect, ci95) side by side; ``verdict``: replicated
    (resolved in both, same sign), one only (resolved in one sweep), contradicted (resolved in both, opposite signs)
    or neither."""
    keys = ["axis", "level", "metric"]
    columns = [*keys, "effect", "ci95"]
    merged = a[columns].merge(b[columns], on=keys, how="outer", suffixes=("_a", "_b"))
    verdicts = []
    for r in records(merged):
        ra, rb = resolved(r.effect_a, r.ci95_a), resolved(r.effect_b, r.ci95_b)
        if ra and rb:
            verdicts.append("replicated" if np.sign(r.effect_a) == np.sign(r.effect_b) else "contradicted")
        else:
            verdicts.append("one only" if ra or rb else "neither")
    merged["verdict"] = verdicts
    return merged
