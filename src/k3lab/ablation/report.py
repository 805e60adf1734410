"""The ablation report behind ``python -m k3lab.report`` (usage: :mod:`k3lab.report`): the sweep's runs from
MLflow, effects, paired effects, power, equal compute, design, markdown and plots; the notebook
``notebooks/ablation.ipynb`` calls the same functions."""

# pandas 3's inline annotations type column, cell and scalar reads as unions (Series | DataFrame | NDArray | scalar)
# that every float(...)/.iloc/.dropna here trips: those three rules are off in this file only.
# pyright: reportArgumentType=false, reportAttributeAccessIssue=false, reportCallIssue=false

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, cast

import numpy as np
import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from typing_extensions import override

from k3lab.ablation import views
from k3lab.ablation.views import OVERRIDE_PREFIX, contrast, interval, records
from k3lab.ablation.views import factor_axes as axes

PERF_METRICS: tuple[str, ...] = ("perf/train_samples_per_s", "perf/train_flops")
# The main metrics whose seed-to-seed spread the report prints (the noise an effect must stand out from).
SPREAD_METRICS: tuple[str, ...] = ("eval/seen/single_object", "eval/seen/colors", "eval/seen/overall", "eval/fid_clip")


def default_metrics() -> tuple[str, ...]:
    """Every registered metric's headline keys (``evaluation.metrics``), then the training throughput."""
    from evaluation.metrics import REGISTRY

    return tuple(f"eval/{key}" for m in REGISTRY.values() for key in m.headline) + PERF_METRICS


def lower_is_better(metric: str) -> bool:
    """From the metric registry (FID, KID, ...); the validation loss too."""
    from evaluation.metrics import lower_is_better as registered

    return metric == "val/loss" or registered(metric)


METRICS = default_metrics()  # the built-in metrics' headline keys; analyse() re-reads the registry for added ones
REFERENCE_PREFIX = "reference/"

log = logging.getLogger(__name__)


def short(metric: str) -> str:
    """A metric's short column name (``eval/seen/colors`` -> ``seen/colors``)."""
    return metric.removeprefix("eval/").removeprefix("perf/")


def resolve_source(source: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """(tracking URI, experiment id, parent run id) from a sweep folder's ``mlflow_sweep.json`` or a run id."""
    from k3lab.tracking.sweep import read_sweep_file

    if Path(source).is_dir():
        info = read_sweep_file(source)
        if info is None:
            raise FileNotFoundError(
                f"{source}: no mlflow_sweep.json here; was this sweep run with logger=mlflow (python -m k3lab.ablation "
                "-m ... or python -m k3lab.train -m ...)?"
            )
        return {
            **info,
            "sweep_dir": str(Path(source).resolve()),
            **({"tracking_uri": tracking_uri} if tracking_uri else {}),
        }
    import os

    from mlflow.tracking import MlflowClient

    from k3lab.run.config import project_root

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root()}/logs/mlflow.db"
    from mlflow.exceptions import MlflowException

    try:
        run = MlflowClient(uri).get_run(source)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise FileNotFoundError(f"{source!r} is neither a sweep folder nor a run id in {uri}: {e.message}") from e
        raise RuntimeError(f"looking up run {source!r} in {uri} failed: {e}") from e
    return {
        "tracking_uri": uri,
        "experiment_id": run.info.experiment_id,
        "parent_run_id": source,
        "sweep_dir": run.data.tags.get("k3lab.sweep_dir", ""),
    }


def load_runs(source: str, tracking_uri: str | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One row per cell run: ``run_id``, ``status``, ``seed``, ``override/<key>`` columns and every metric."""
    from mlflow.tracking import MlflowClient

    from k3lab.tracking.sweep import children

    info = resolve_source(source, tracking_uri)
    client = MlflowClient(info["tracking_uri"])
    parent = client.get_run(info["parent_run_id"])
    params = parent.data.params
    from k3lab.tracking.sweep import sweep_reference

    recorded = {k.removeprefix(REFERENCE_PREFIX): v for k, v in params.items() if k.startswith(REFERENCE_PREFIX)}
    info["reference"] = recorded or sweep_reference(
        {k.removeprefix("sweep/"): v for k, v in params.items() if k.startswith("sweep/") and k != "sweep/overrides"}
    )
    rows = []
    for run in children(client, info["experiment_id"], info["parent_run_id"], role="cell"):
        params = run.data.params
        row: dict[str, Any] = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "status": run.info.status,
            "start_time": int(run.info.start_time or 0),
            "job": int(run.data.tags.get("k3lab.job", 0)),
            "seed": int(params.get("seed", 0)),
            "output_dir": params.get("output_dir", ""),
        }
        row |= {k: v for k, v in params.items() if k.startswith(OVERRIDE_PREFIX) and k != f"{OVERRIDE_PREFIX}seed"}
        row |= dict(run.data.metrics)
        rows.append(row)
    if not rows:
        raise ValueError(f"no cell runs under parent {info['parent_run_id']} in {info['tracking_uri']}")
    return mark_superseded(pd.DataFrame(rows).sort_values(["job", "seed", "start_time"]).reset_index(drop=True)), info


def mark_superseded(runs: pd.DataFrame) -> pd.DataFrame:
    """Add ``superseded_by``: a FINISHED run of the same cell and seed (every override and the seed equal) as a
    newer FINISHED run names that newer run; the newest wins (a re-run or resumed sweep can leave both)."""
    runs = runs.copy()
    runs["superseded_by"] = ""
    if "status" not in runs:
        return runs
    finished = runs[runs["status"] == "FINISHED"]
    key = [c for c in runs.columns if c.startswith(OVERRIDE_PREFIX)] + ["seed"]
    order = "start_time" if "start_time" in runs else "job"
    for _, group in finished.groupby(key, dropna=False, sort=False):
        if len(group) > 1:
            newest = group.sort_values(order).index[-1]
            runs.loc[[i for i in group.index if i != newest], "superseded_by"] = runs.at[newest, "run_id"]
    return runs


def usable(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs the tables use: FINISHED and not superseded by a newer run of the same cell and seed."""
    if "status" in runs:
        runs = runs.loc[runs["status"] == "FINISHED"]
    if "superseded_by" in runs:
        runs = runs.loc[runs["superseded_by"].fillna("") == ""]
    return runs


def effects(
    runs: pd.DataFrame, metrics: Sequence[str] = METRICS, reference: dict[str, str] | None = None
) -> pd.DataFrame:
    """Each axis level's effect (vs the reference level: ``reference[axis]``, else the first level) per metric: mean
    and 95% half-width over seeds.

    Within a seed, the effect is the mean over the other axes' cells of metric(level) - metric(reference);
    cells missing on either side are left out (a failed run does not bias the difference). In a fractional design no
    two cells of a seed differ in one axis alone: the effect is then the contrast, mean of the cells at the level minus
    mean of the cells at the reference (:mod:`k3lab.ablation.design`). A reference that is not among the axis's
    levels falls back to the first level, and the row's ``reference`` says which was used."""
    runs = mark_superseded(runs) if "superseded_by" not in runs else runs
    runs = usable(runs)
    out = []
    ax = axes(runs)
    for axis in ax:
        others = [a for a in ax if a != axis]
        levels = list(dict.fromkeys(runs[axis]))
        ref = (reference or {}).get(axis.removeprefix(OVERRIDE_PREFIX), levels[0])
        ref = ref if ref in levels else levels[0]
        for level in [lv for lv in levels if lv != ref]:
            for metric in [m for m in metrics if m in runs]:
                per_seed = []
                for _, group in runs.groupby("seed"):  # one row per combination of the other axes, one column per level
                    wide = (
                        group.set_index([*others, axis])[metric].unstack(axis)
                        if others
                        else group.set_index(axis)[metric].to_frame().T
                    )
                    diffs = (
                        (wide[level] - wide[ref]).dropna() if level in wide and ref in wide else pd.Series(dtype=float)
                    )
                    if len(diffs):
                        per_seed.append(float(diffs.mean()))
                    elif fractional(runs, ax):
                        value = contrast(group[metric], group[axis].astype(str), str(level), str(ref))
                        if not math.isnan(value):
                            per_seed.append(value)
                mean, half = interval(per_seed)
                out.append(
                    {
                        "axis": axis.removeprefix(OVERRIDE_PREFIX),
                        "level": level,
                        "reference": ref,
                        "metric": metric,
                        "effect": mean,
                        "ci95": half,
                        "seeds": len(per_seed),
                    }
                )
    return pd.DataFrame(out)


def fractional(runs: pd.DataFrame, ax: Sequence[str]) -> bool:
    """Whether the cells of a seed cover fewer level combinations than the axes' full product."""
    full = math.prod(runs[a].nunique() for a in ax)
    per_seed = runs.groupby("seed")[list(ax)].apply(lambda g: len(g.drop_duplicates())).max()
    return bool(per_seed < full)


def design_of(runs: pd.DataFrame, reference: dict[str, str] | None = None) -> str:
    """The design the cells form, in words: a full factorial, or the half fraction they match (with its aliases)."""
    from k3lab.ablation.design import HalfFraction

    runs = usable(runs)
    ax = axes(runs)
    if not ax:
        return "One cell (no axis varies)."
    levels = {}
    for a in ax:
        values = [str(v) for v in dict.fromkeys(runs[a])]
        ref = (reference or {}).get(a.removeprefix(OVERRIDE_PREFIX))
        levels[a.removeprefix(OVERRIDE_PREFIX)] = [ref, *[v for v in values if v != ref]] if ref in values else values
    if not fractional(runs, ax):
        sizes = " x ".join(str(len(v)) for v in levels.values())
        return f"Full factorial ({sizes}) in every seed: every main effect and interaction is estimable."
    if all(len(v) == 2 for v in levels.values()):
        combos = runs[ax].astype(str).drop_duplicates()
        for sign in (-1, 1):
            design = HalfFraction(tuple(levels), levels, sign)
            if all(design.keeps(dict(zip(levels, row, strict=True))) for row in combos.itertuples(index=False)):
                return design.describe()
    return (
        "An incomplete design: effects are contrasts of level means and may be confounded with the other axes "
        "(check which combinations ran)."
    )


def cells(runs: pd.DataFrame, metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Every cell's mean and 95% half-width over seeds, per metric."""
    ax = axes(runs)
    finished = usable(mark_superseded(runs) if "superseded_by" not in runs else runs)
    rows = []
    for key, group in finished.groupby(ax, sort=False) if ax else [((), finished)]:
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = {a.removeprefix(OVERRIDE_PREFIX): k for a, k in zip(ax, key, strict=False)}
        row["seeds"] = len(group)
        for m in [m for m in metrics if m in group]:
            row[m], row[f"{m} ci95"] = interval(group[m].tolist())
            row[f"{m} sd"] = float(np.std(group[m].tolist(), ddof=1)) if len(group) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(mean: float, half: float, digits: int | None = None) -> str:
    if math.isnan(mean):
        return "n/a"
    if digits is None and abs(mean) >= 1e5:  # counts such as training FLOPs
        return f"{mean:.3g} ± {half:.2g}" if not math.isnan(half) else f"{mean:.3g}"
    digits = digits if digits is not None else (1 if abs(mean) >= 10 else 3)
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if not math.isnan(half) else f"{mean:.{digits}f}"


def markdown(
    runs: pd.DataFrame, effect_table: pd.DataFrame, cell_table: pd.DataFrame, metrics: Sequence[str] = METRICS
) -> str:
    """The report as markdown: effects, cells, seed SDs, baselines, design, paired effects, power and compute."""
    metrics = [m for m in metrics if m in runs]
    seeds = sorted(runs["seed"].unique().tolist())
    lines = [
        f"## Ablation: {len(cell_table)} cells x {len(seeds)} seed(s) {seeds}; {len(runs)} runs "
        f"({int((runs['status'] != 'FINISHED').sum()) if 'status' in runs else 0} not finished)",
        "",
    ]
    superseded = runs[runs["superseded_by"].fillna("") != ""] if "superseded_by" in runs else runs.iloc[:0]
    if len(superseded):
        lines += [
            f"{len(superseded)} FINISHED run(s) repeat a cell and seed that a newer FINISHED run also holds; the "
            "newest "
            "run wins: " + ", ".join(f"{r.run_id} -> {r.superseded_by}" for r in records(superseded)),
            "",
        ]
    lines.append(
        "### Effects (level - reference; mean ± 95% t-interval over seeds"
        + ("; one seed: no interval)" if len(seeds) < 2 else ")")
    )
    lines.append("")
    lines.append("| axis | level vs reference | " + " | ".join(short(m) for m in metrics) + " |")
    lines.append("|---|---|" + "---|" * len(metrics))
    for keys, group in effect_table.groupby(["axis", "level"], sort=False) if len(effect_table) else []:
        axis, level = cast(tuple, keys)
        by = {r.metric: r for r in records(group)}
        ref = group["reference"].iloc[0]
        lines.append(
            f"| {axis} | {level} vs {ref} | "
            + " | ".join(_fmt(by[m].effect, by[m].ci95) if m in by else "" for m in metrics)
            + " |"
        )
    lines += ["", "### Cells (mean ± 95% t-interval over seeds)", ""]
    names = [a.removeprefix(OVERRIDE_PREFIX) for a in axes(runs)]
    lines.append("| " + " | ".join(names + ["seeds"] + [short(m) for m in metrics]) + " |")
    lines.append("|" + "---|" * (len(names) + 1 + len(metrics)))
    for r in cell_table.to_dict("records"):
        lines.append(
            "| "
            + " | ".join(
                [str(r[n]) for n in names]
                + [str(r["seeds"])]
                + [_fmt(r.get(m, float("nan")), r.get(f"{m} ci95", float("nan"))) for m in metrics]
            )
            + " |"
        )
    spread = [m for m in SPREAD_METRICS if m in metrics]
    if len(seeds) > 1 and spread:
        lines += [
            "",
            "### Seed-to-seed standard deviation per cell (how large an effect must be to be seen)",
            "",
            "| " + " | ".join(names + [short(m) for m in spread]) + " |",
            "|" + "---|" * (len(names) + len(spread)),
        ]
        for r in cell_table.to_dict("records"):
            lines.append(
                "| "
                + " | ".join(
                    [str(r[n]) for n in names] + [_fmt(r.get(f"{m} sd", float("nan")), float("nan")) for m in spread]
                )
                + " |"
            )
    tasks = [m.removeprefix("eval/seen/") for m in metrics if m.startswith("eval/seen/")]
    baselines = [
        (label, prefix)
        for label, prefix in (
            ("chance: real images scored against another prompt's scene", "eval/chance/"),
            ("real images with their own prompt (the detector's ceiling)", "eval/real/"),
        )
        if all(prefix + t in runs for t in tasks)
    ]
    if tasks and baselines:
        lines += [
            "",
            "### Baselines (seen prompts)",
            "",
            "| baseline | " + " | ".join(tasks) + " |",
            "|---|" + "---|" * len(tasks),
        ]
        uniform = uniform_chance()
        lines.append(
            "| chance: one object of a uniformly random shape (and colour) | "
            + " | ".join(f"{uniform[t]:.3f}" if t in uniform else "" for t in tasks)
            + " |"
        )
        lines += [
            f"| {label} | " + " | ".join(f"{runs[prefix + t].mean():.3f}" for t in tasks) + " |"
            for label, prefix in baselines
        ]
    return "\n".join(lines) + "\n"


def uniform_chance() -> dict[str, float]:
    """Chance of a single-object prompt for an image holding one object of a random shape and colour."""
    from evaluation.detector import PALETTE, SHAPES

    return {"single_object": 1 / len(SHAPES), "colors": 1 / (len(SHAPES) * len(PALETTE))}


def baseline_levels(runs: pd.DataFrame, metric: str) -> dict[str, float]:
    """Reference levels a metric can be read against: uniform chance, real images scored against another prompt's
    scene (chance), real images with their own prompt (the detector's ceiling); only those the metric has."""
    if not metric.startswith("eval/seen/"):
        return {}
    task = metric.removeprefix("eval/seen/")
    levels = {}
    if task in uniform_chance():
        levels["uniform chance"] = uniform_chance()[task]
    for label, prefix in (("chance (another prompt's scene)", "eval/chance/"), ("ceiling (real images)", "eval/real/")):
        if prefix + task in runs and bool(runs[prefix + task].notna().any()):
            levels[label] = float(runs[prefix + task].mean())
    return levels


def forest_figures(
    runs: pd.DataFrame, effect_table: pd.DataFrame, cell_table: pd.DataFrame, metrics: Sequence[str] = METRICS
) -> tuple[Any, Any]:
    """Two figures of forest plots, one panel per metric, three per row: every cell's mean with its 95% interval over
    seeds and the metric's reference levels (chance, ceiling) as vertical lines; each axis level's effect with its
    interval and the zero line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if m in cell_table]
    ax_names = [c for c in cell_table.columns if c != "seeds" and not str(c).startswith(("eval/", "val/", "perf/"))]
    labels = [", ".join(str(r[a]) for a in ax_names) or "all" for _, r in cell_table.iterrows()]

    def grid(n_rows: int) -> tuple[Any, Any]:
        cols = min(3, max(len(metrics), 1))
        rows = max(1, math.ceil(len(metrics) / cols))
        fig, panels = plt.subplots(rows, cols, figsize=(4.4 * cols, (0.32 * n_rows + 1.4) * rows), squeeze=False)
        for ax in panels.flat[len(metrics) :]:
            ax.axis("off")
        return fig, panels.flat

    cells_fig, panels = grid(len(cell_table))
    colours = {"uniform chance": "tab:grey", "chance (another prompt's scene)": "tab:orange",
               "ceiling (real images)": "tab:green"}  # fmt: skip
    for ax, metric in zip(panels, metrics, strict=False):
        ys = list(range(len(cell_table)))[::-1]
        ax.errorbar(cell_table[metric], ys, xerr=cell_table[f"{metric} ci95"].fillna(0), fmt="o", capsize=3)
        for label, value in baseline_levels(runs, metric).items():
            ax.axvline(value, ls="--", lw=1, color=colours[label], label=f"{label} {value:.2f}", gid="reference")
        ax.set_yticks(ys, labels, fontsize=7)
        ax.set_title(short(metric) + (" (lower better)" if lower_is_better(metric) else ""), fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="best")
    cells_fig.suptitle("cells: mean ± 95% interval over seeds", fontsize=10)
    cells_fig.tight_layout()

    effects_fig, panels = grid(max(1, len(effect_table["level"].unique()) if len(effect_table) else 1))
    for ax, metric in zip(panels, metrics, strict=False):
        rows = effect_table[effect_table["metric"] == metric] if len(effect_table) else effect_table
        ys = list(range(len(rows)))[::-1]
        ax.errorbar(rows["effect"], ys, xerr=rows["ci95"].fillna(0), fmt="o", capsize=3, color="tab:red")
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(ys, [f"{r.axis}: {r.level} vs {r.reference}" for r in records(rows)], fontsize=7)
        ax.set_title(short(metric) + (" (lower better)" if lower_is_better(metric) else ""), fontsize=9)
    effects_fig.suptitle("effects: level - reference, mean ± 95% interval over seeds", fontsize=10)
    effects_fig.tight_layout()
    return cells_fig, effects_fig


def plot(
    runs: pd.DataFrame,
    effect_table: pd.DataFrame,
    cell_table: pd.DataFrame,
    path: str | Path,
    metrics: Sequence[str] = METRICS,
) -> tuple[Path, Path]:
    """``report.png`` (cells) and ``<stem>_effects.png`` beside it (:func:`forest_figures`)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    effects_path = path.with_name(f"{path.stem}_effects{path.suffix}")
    cells_fig, effects_fig = forest_figures(runs, effect_table, cell_table, metrics)
    for fig, target in ((cells_fig, path), (effects_fig, effects_path)):
        fig.savefig(target, dpi=110)
        plt.close(fig)
    return path, effects_path


@dataclass
class Report:
    """Everything one sweep's report holds: the runs, the tables and the design."""

    runs: pd.DataFrame
    effects: pd.DataFrame
    cells: pd.DataFrame
    text: str
    info: dict[str, Any]  # tracking_uri, experiment_id, parent_run_id, sweep_dir, reference (axis -> first swept value)
    files: dict[str, Path] = field(default_factory=dict)
    paired: pd.DataFrame = field(default_factory=pd.DataFrame)  # k3lab.ablation.views.paired_effects
    power: pd.DataFrame = field(default_factory=pd.DataFrame)  # views.power_table
    equal_compute: pd.DataFrame = field(default_factory=pd.DataFrame)  # views.equal_compute

    def summary(self) -> str:
        """The console summary: where to look (MLflow, report files) and the report's tables."""
        where = [
            f"mlflow ui --backend-store-uri {self.info['tracking_uri']}   (parent run {self.info['parent_run_id']})"
        ]
        if self.info.get("sweep_dir"):
            where.append(
                f"sample grids: {self.info['sweep_dir']}/<job>/eval/eval_grid_seen_*.png; images + metadata.jsonl: "
                f"<job>/eval/{{seen,heldout}}/"
            )
        where += [f"{name}: {path}" for name, path in self.files.items()]
        return self.text + "\nWhere to look:\n" + "\n".join(f"  {w}" for w in where) + "\n"


def analyse(source: str, tracking_uri: str | None = None, metrics: Sequence[str] | None = None) -> Report:
    """The sweep's runs, effects (reference level = the first value of each swept axis), cells, paired effects, power
    and the equal-compute view; writes nothing."""
    runs, info = load_runs(source, tracking_uri)
    metrics = list(metrics or default_metrics())
    reference = info.get("reference")
    effect_table, cell_table = effects(runs, metrics, reference), cells(runs, metrics)
    finished = usable(runs)
    paired = views.paired_effects(finished, reference) if "output_dir" in finished else pd.DataFrame()
    power = views.power_table(paired, int(finished["seed"].nunique())) if len(paired) else pd.DataFrame()
    compute = views.equal_compute(finished, reference) if "output_dir" in finished else pd.DataFrame()
    text = markdown(runs, effect_table, cell_table, metrics)
    text += design_markdown(runs, effect_table, paired, power, compute, reference)
    return Report(runs, effect_table, cell_table, text, info, paired=paired, power=power, equal_compute=compute)


def design_markdown(
    runs: pd.DataFrame,
    effect_table: pd.DataFrame,
    paired: pd.DataFrame,
    power: pd.DataFrame,
    compute: pd.DataFrame,
    reference: dict[str, str] | None = None,
) -> str:
    """The design, the paired effects, the power of the design and the equal-compute view, in markdown."""
    lines = ["", "### Design", "", design_of(runs, reference)]
    if len(paired):
        seed_level = {
            (r.axis, r.level, r.metric): (r.effect, r.ci95) for r in records(effect_table)
        } if len(effect_table) else {}  # fmt: skip
        lines += [
            "",
            "### Paired effects (prompt by prompt within seeds: cells of a seed share data order, diffusion noise and "
            "sampling noise)",
            "",
            "Method: per seed, the mean over prompts of (mean score of the level's cells - mean of the reference's "
            "cells) on the same prompt and sampling seed, with its sampling variance var/n; over seeds, a "
            "DerSimonian-Laird random-effects mean with the Hartung-Knapp-Sidik-Jonkman 95% interval (t, seeds - 1 "
            "df). tau: the between-seed SD of the effect (training randomness); pairing: the within-seed variance an "
            "unpaired design (independent sampling noise per cell) would have, over the paired one.",
            "",
            "| axis | level vs reference | metric | seed-level | paired | resolved | prompts x seeds | tau | "
            "pairing (variance ratio) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in records(paired):
            mean, half = seed_level.get((r.axis, r.level, r.metric), (float("nan"), float("nan")))
            lines.append(
                f"| {r.axis} | {r.level} vs {r.reference} | {short(r.metric)} | {_fmt(mean, half)} | "
                f"{_fmt(r.effect, r.ci95)} | {'yes' if views.resolved(r.effect, r.ci95) else 'no'} | "
                f"{r.prompts} x {r.seeds} | {_fmt(math.sqrt(r.tau2) if r.tau2 >= 0 else float('nan'), float('nan'))} | "
                f"{views.ratio(r.v_unpaired, r.v_paired):.2f} |"
            )
    if len(power):
        lines += [
            "",
            "### Power of this design (two-sided t-test over seeds, alpha 0.05, power 0.8)",
            "",
            "| metric | seed-level SD of an effect | of which tau | of which prompts | prompts per seed | seeds | "
            "minimum detectable effect | interval width paired / unpaired |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in records(power):
            lines.append(
                f"| {short(r.metric)} | {r.sigma_e:.4g} | {r.tau:.4g} | {r.prompt_sd:.4g} | {r.prompts} | {r.seeds} | "
                f"{r.mde80:.4g} | {r.pairing_width_ratio:.2f} |"
            )
        plan = views.resolve_plan(paired, power)
        if len(plan):
            lines += [
                "",
                "Effects whose paired interval includes 0: what would resolve an effect of the observed size "
                "(80% power): seeds at today's prompts, or prompts per seed at today's seeds (inf: more prompts "
                "cannot, the between-seed variance alone is too large).",
                "",
                "| axis | level | metric | observed | seeds needed | prompts per seed needed |",
                "|---|---|---|---|---|---|",
            ]
            for r in records(plan):
                seeds_needed = str(r.seeds_needed) if r.seeds_needed > 0 else "> 10,000"
                lines.append(
                    f"| {r.axis} | {r.level} | {short(r.metric)} | {r.effect:+.4g} | {seeds_needed} | "
                    f"{r.prompts_needed:.0f} |"
                )
    if len(compute):
        lines += [
            "",
            "### Equal steps vs equal training FLOPs (learning curves; FLOPs from torch.utils.flop_counter)",
            "",
            "Within a seed each cell is read off its curve at the FLOPs the seed's cheapest cell spent in all (linear "
            "interpolation) and at the last common step; mean ± 95% t-interval over seeds. Equal wall seconds: the "
            "same at the training seconds the seed's quickest cell spent (this machine's speed, not the model's).",
            "",
            "| axis | level vs reference | metric | FLOPs per step ratio | equal steps | equal FLOPs | sign flips "
            "| seconds ratio | equal wall seconds |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in records(compute):
            lines.append(
                f"| {r.axis} | {r.level} vs {r.reference} | {short(r.metric)} | {r.flops_ratio:.2f} | "
                f"{_fmt(r.equal_steps, r.equal_steps_ci95)} | {_fmt(r.equal_flops, r.equal_flops_ci95)} | "
                f"{'**yes**' if r.sign_flip else 'no'} | {r.seconds_ratio:.2f} | "
                f"{_fmt(r.equal_seconds, r.equal_seconds_ci95)} |"
            )
    return "\n".join(lines) + "\n"


def build_report(
    source: str,
    tracking_uri: str | None = None,
    out_dir: str | Path | None = None,
    metrics: Sequence[str] | None = None,
) -> Report:
    """:func:`analyse`, then write report.md / report.png / runs.csv (into the sweep folder unless ``out_dir``)."""
    metrics = list(metrics or default_metrics())
    report = analyse(source, tracking_uri, metrics)
    folder = Path(out_dir or report.info.get("sweep_dir") or ".")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.md").write_text(report.text)
    report.runs.to_csv(folder / "runs.csv", index=False)
    cells_png, effects_png = plot(report.runs, report.effects, report.cells, folder / "report.png", metrics)
    report.files = {
        "table": folder / "report.md",
        "plot": cells_png,
        "effects plot": effects_png,
        "runs": folder / "runs.csv",
    }
    return report


class ReportCallback(Callback):
    """Hydra callback: at the end of an ablation multirun, build the report from the sweep's MLflow runs, log its files
    to the parent run and print it (``hydra.callbacks.ablation_report``; a sweep with no cell runs is left alone)."""

    @override
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow.tracking import MlflowClient

        from k3lab.tracking.sweep import ROLE_TAG, children, read_sweep_file, sweep_dir_of

        sweep_dir = sweep_dir_of(config)
        info = read_sweep_file(sweep_dir)
        if info is None:
            return
        client = MlflowClient(info["tracking_uri"])
        if not any(
            r.data.tags.get(ROLE_TAG) == "cell" for r in children(client, info["experiment_id"], info["parent_run_id"])
        ):
            return
        try:
            report = build_report(str(sweep_dir))
        except Exception as e:  # noqa: BLE001 - the sweep's runs stay intact; the report can be rebuilt
            log.error("could not build the ablation report: %s (rebuild: python -m k3lab.report %s)", e, sweep_dir)
            return
        for path in report.files.values():
            client.log_artifact(info["parent_run_id"], str(path))
        print(report.summary(), flush=True)


def plan_text(answer: dict[str, Any]) -> str:
    """``--plan`` in words."""
    seeds = answer["seeds_needed"]
    need = f"{seeds} seeds" if seeds > 0 else "more than 10,000 seeds"
    return (
        f"To see an effect of {answer['delta']:g} on {short(answer['metric'])} with 80% power (two-sided t-test over "
        f"seeds, alpha 0.05), this design needs {need} (seed-level SD of an effect {answer['sigma_e']:.4g}, measured "
        f"on this sweep); with its {answer['seeds_now']} seeds the power is {answer['power_now']:.2f}.\n"
    )


def compare_markdown(source_a: str, source_b: str, tracking_uri: str | None = None) -> str:
    """Two sweeps of one design side by side (``--compare``): every effect with its interval in each (paired where
    per-prompt scores exist, else seed-level) and whether it replicated; then the same at equal training FLOPs and at
    equal wall seconds where both sweeps logged learning curves (an effect can be resolved at one budget only)."""
    reports = [analyse(s, tracking_uri) for s in (source_a, source_b)]
    tables = []
    for report in reports:
        table = report.effects[["axis", "level", "metric", "effect", "ci95"]].copy()
        table["method"] = "seed-level"
        if len(report.paired):
            keyed = report.paired.set_index(["axis", "level", "metric"])
            for i, r in table.iterrows():
                key = (r["axis"], r["level"], r["metric"])
                if key in keyed.index:
                    table.loc[i, ["effect", "ci95"]] = keyed.loc[key, ["effect", "ci95"]].to_numpy()
                    table.loc[i, "method"] = "paired"
        tables.append(table)
    merged = views.compare(tables[0], tables[1])
    seeds = [sorted(r.runs["seed"].unique().tolist()) for r in reports]
    lines = [
        f"## Replication: A = {source_a} (seeds {seeds[0]}) vs B = {source_b} (seeds {seeds[1]})",
        "",
        "Each effect with its 95% interval (paired where the cells left per-prompt scores, else seed-level); "
        "replicated = resolved in both with the same sign; one only = resolved in one sweep alone (not a finding); "
        "contradicted = resolved in both with opposite signs.",
        "",
        "| axis | level | metric | A | B | verdict |",
        "|---|---|---|---|---|---|",
    ]
    lines += _compare_rows(merged)
    views_at = {
        "equal_flops": ("### At equal training FLOPs", "the FLOPs the cheapest cell of a seed spent"),
        "equal_seconds": ("### At equal wall seconds", "the training seconds the quickest cell of a seed spent"),
    }
    frames = [r.equal_compute for r in reports]
    for key, (title, budget) in views_at.items():  # read off the learning curves, where both sweeps logged them
        if not all(len(f) and f[key].notna().any() for f in frames):
            continue
        columns = {key: "effect", f"{key}_ci95": "ci95"}
        renamed = [f.rename(columns=columns)[["axis", "level", "metric", "effect", "ci95"]] for f in frames]
        lines += [
            "",
            title,
            "",
            f"Each effect read off the learning curves at {budget} (seed-level t-interval over seeds); the same "
            "verdicts.",
            "",
            "| axis | level | metric | A | B | verdict |",
            "|---|---|---|---|---|---|",
            *_compare_rows(views.compare(*renamed)),
        ]
    return "\n".join(lines) + "\n"


def _compare_rows(merged: pd.DataFrame) -> list[str]:
    """The rows of a ``--compare`` table (``views.compare``'s output)."""
    mark = {"replicated": "**replicated**", "one only": "one only (!)", "contradicted": "**contradicted**"}
    return [
        f"| {r.axis} | {r.level} | {short(r.metric)} | {_fmt(r.effect_a, r.ci95_a)} | {_fmt(r.effect_b, r.ci95_b)} "
        f"| {mark.get(r.verdict, r.verdict)} |"
        for r in records(merged)
    ]
