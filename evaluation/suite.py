"""One command, every prompt set: ``python -m evaluation suite``.

For each prompt set found (PartiPrompts by category and challenge, GenEval by task, T2I-CompBench by category, a
user's DrawBench CSV, the scene world's seen and held-out splits), the suite writes the set's prompts, has a
generator command turn them into samples (in chunks, so an interrupted run resumes where it stopped), scores every
image with the registry's per-image metrics (CLIP score, PickScore, HPSv2, the scene judge where the prompts carry
scene specs) and writes per set: ``scores.json`` (per-category means with 95% t-intervals over prompts, the per-prompt
scores, every metric's definition and weight hash, the prompt files' hash, package versions, its own content hash),
``table.md``; and for the whole run ``summary.md``, ``summary.json`` and ``suite.png``. A set whose ``scores.json`` is
there with the same settings is not redone.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evaluation import scorefile
from evaluation.images import ImageRecord, load_folder
from evaluation.preference import sha256_files
from evaluation.prompts import (
    MAX_PROMPT_CHARS,
    Prompt,
    PromptSet,
    Skips,
    load_drawbench,
    load_geneval,
    load_partiprompts,
    load_scene_world,
    load_t2i_compbench,
)

K3LAB_GENERATOR = "{python} -m k3lab.sample {run} --prompt-file {prompts} --out {out} --num-per-prompt {seeds}"
SCENE_SPLITS = {"scene-seen": "test-*.tar", "scene-heldout": "heldout-*.tar"}


@dataclass
class SuiteSet:
    """One prompt set to score: its prompts (after ``--limit``), the fields its table groups by, its source files."""

    name: str
    prompts: PromptSet
    groups: tuple[str, ...]
    sources: list[Path]
    skips: Skips = field(default_factory=Skips)
    total: int = 0  # prompts before --limit
    judge: bool = False  # prompts carry scene-world specs: the scene judge applies


def stratified(prompts: PromptSet, limit: int | None) -> PromptSet:
    """At most ``limit`` prompts, taken round-robin over categories in file order (every category represented while
    the limit allows; deterministic)."""
    if limit is None or limit >= len(prompts):
        return prompts
    by_cat: dict[str, list[Prompt]] = {}
    for p in prompts:
        by_cat.setdefault(p.category, []).append(p)
    picked: list[Prompt] = []
    queues = [list(v) for v in by_cat.values()]
    while len(picked) < limit:
        for q in queues:
            if q and len(picked) < limit:
                picked.append(q.pop(0))
    order = {p.id: i for i, p in enumerate(prompts)}
    return PromptSet(prompts.name, sorted(picked, key=lambda p: order[p.id]))


def find_sets(
    prompt_dir: Path | None,
    drawbench: Path | None = None,
    scene_world: Path | None = None,
    limit: int | None = None,
    max_chars: int = MAX_PROMPT_CHARS,
    only: Sequence[str] | None = None,
) -> tuple[list[SuiteSet], list[str]]:
    """Every prompt set present, loaded tolerantly (bad rows counted, a set that cannot be read at all is an error
    naming its file), and the names of the sets not found. Everything is read before anything is generated."""
    loaders: list[tuple[str, tuple[str, ...], list[Path], Callable[[Skips], PromptSet]]] = []
    absent: list[str] = []
    if prompt_dir is not None:
        parti = prompt_dir / "partiprompts" / "PartiPrompts.tsv"
        geneval = prompt_dir / "geneval" / "evaluation_metadata.jsonl"
        t2i = prompt_dir / "t2i-compbench"
        for name, path, groups, load in (
            ("partiprompts", parti, ("category", "challenge"), lambda s: load_partiprompts(parti, s, max_chars)),
            ("geneval", geneval, ("category",), lambda s: load_geneval(geneval, s, max_chars)),
            ("t2i-compbench", t2i, ("category",), lambda s: load_t2i_compbench(t2i, None, "val", s, max_chars)),
        ):
            if path.exists():
                sources = sorted(path.glob("*_val.txt")) if path.is_dir() else [path]
                loaders.append((name, groups, sources, load))
            else:
                absent.append(f"{name} ({path})")
    if drawbench is not None:
        if not drawbench.is_file():
            raise FileNotFoundError(f"DrawBench CSV not found: {drawbench}")
        loaders.append(("drawbench", ("category",), [drawbench], lambda s: load_drawbench(drawbench, s, max_chars)))
    if scene_world is not None:
        for name, pattern in SCENE_SPLITS.items():
            shards = sorted(scene_world.glob(pattern))
            if not shards:
                raise FileNotFoundError(f"scene world {scene_world}: no {pattern} shards for {name}")
            loaders.append((name, ("category",), shards, lambda s, shards=shards, n=name: _scene(shards, n, s)))
    sets = []
    for name, groups, sources, load in loaders:
        if only and name not in only:
            continue
        skips = Skips()
        full = load(skips)
        if not len(full):
            raise ValueError(f"prompt set {name} ({sources[0]}): no usable prompts ({skips.total()} rows skipped)")
        judge = name in SCENE_SPLITS
        sets.append(SuiteSet(name, stratified(full, limit), groups, sources, skips, len(full), judge))
    if only:
        unknown = sorted(set(only) - {s.name for s in sets})
        if unknown:
            raise ValueError(f"--only {unknown}: not among the sets found ({[s.name for s in sets]})")
    return sets, absent


def _scene(shards: Sequence[Path], name: str, skips: Skips) -> PromptSet:
    """Scene-world captions; captions without a scene spec cannot be judged and are counted as skips."""
    full = load_scene_world(shards, name)
    kept = []
    for p in full:
        if p.spec is None:
            skips.add("no scene spec", p.id)
        else:
            kept.append(p)
    return PromptSet(name, kept)


# ----------------------------------------------------------------------------- generation
def _chunk_done(folder: Path, expected: int) -> bool:
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        return False
    return sum(1 for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()) == expected


def generate(
    suite_set: SuiteSet, command: str, out_dir: Path, seeds: int, chunk: int, log: Callable[[str], None]
) -> list[Path]:
    """Run ``command`` once per chunk of prompts not yet generated; ``{prompts}``, ``{out}``, ``{seeds}`` and
    ``{python}`` are filled in (quoted). Returns the chunk folders. A failing command is an error naming the chunk."""
    from tqdm import tqdm

    folders = []
    prompts = suite_set.prompts.prompts
    bar = tqdm(total=len(prompts), desc=f"{suite_set.name}: generating", unit="prompt", file=sys.stderr, delay=1)
    for c, start in enumerate(range(0, len(prompts), chunk)):
        part = PromptSet(suite_set.name, prompts[start : start + chunk])
        folder = out_dir / "samples" / f"chunk-{c:04d}"
        folders.append(folder)
        if _chunk_done(folder, len(part) * seeds):
            bar.update(len(part))
            continue
        folder.mkdir(parents=True, exist_ok=True)
        prompt_file = part.to_jsonl(out_dir / "samples" / f"chunk-{c:04d}.jsonl")
        cmd = command.format(
            prompts=shlex.quote(str(prompt_file)),
            out=shlex.quote(str(folder)),
            seeds=seeds,
            python=shlex.quote(sys.executable),
        )
        log(f"{suite_set.name}: generating chunk {c + 1}/{math.ceil(len(prompts) / chunk)} ({len(part)} prompts)")
        log_path = out_dir / "generate.log"
        with log_path.open("a", encoding="utf-8") as log_file:
            log_file.write(f"$ {cmd}\n")
            log_file.flush()
            code = subprocess.run(cmd, shell=True, stdout=log_file, stderr=subprocess.STDOUT).returncode
        if code != 0:
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise RuntimeError(
                f"{suite_set.name}: generator failed on chunk {c} (exit {code}); {log_path} ends:\n{tail}"
            )
        if not _chunk_done(folder, len(part) * seeds):
            raise RuntimeError(f"{suite_set.name}: the generator wrote no complete {folder}/metadata.jsonl")
        bar.update(len(part))
    bar.close()
    return folders


def load_samples(folders: Sequence[Path], suite_set: SuiteSet) -> list[ImageRecord]:
    """The set's images from sample folders, with the prompt's category and spec attached; images of prompts not in
    the set are left out, a prompt with no image is an error."""
    by_id = {p.id: p for p in suite_set.prompts}
    records = [r for f in folders for r in load_folder(f) if r.prompt_id in by_id]
    missing = sorted(set(by_id) - {r.prompt_id for r in records})
    if missing:
        raise ValueError(f"{suite_set.name}: no image for {len(missing)} prompts, e.g. {missing[0]!r}")
    for r in records:
        p = by_id[r.prompt_id]
        r.category, r.spec = p.category, p.spec
    return records


# ----------------------------------------------------------------------------- scoring and tables
def t_interval(values: Sequence[float]) -> dict[str, float]:
    """Mean and 95% Student-t interval over ``values`` (NaNs dropped); the interval is NaN below 2 values."""
    from scipy import stats

    x = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "n": 1}
    half = float(stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def per_image_scores(records: Sequence[ImageRecord], metric_names: Sequence[str], inputs_kw: Mapping[str, Any]) -> dict:
    """``{metric: [score per image]}`` from the registry's metrics (the scene judge as one 0/1 per image: its own
    task's pass)."""
    from evaluation import metrics

    inputs = metrics.EvalInputs(samples={"seen": list(records)}, **inputs_kw)
    out: dict[str, list[float]] = {}
    for name in metric_names:
        metrics.get(name).compute(inputs)
        per = inputs.per_image.get("seen", {})
        if name == "compbench":
            from evaluation.compbench import TASKS

            rows = np.array([per[t] for t in TASKS if t in per], dtype=np.float64)
            with np.errstate(all="ignore"):
                out[name] = [float(np.nanmean(c)) if not np.all(np.isnan(c)) else math.nan for c in rows.T]
        else:
            out[name] = [float(v) for v in per[name]]
    return out


def per_prompt(records: Sequence[ImageRecord], scores: Mapping[str, Sequence[float]]) -> dict[str, dict[str, Any]]:
    """Each prompt's mean score per metric over its seeds, with its category and challenge."""
    out: dict[str, dict[str, Any]] = {}
    for i, r in enumerate(records):
        row = out.setdefault(
            r.prompt_id, {"category": r.category, "challenge": (r.spec or {}).get("challenge", ""), "_v": {}}
        )
        for m, values in scores.items():
            row["_v"].setdefault(m, []).append(values[i])
    for row in out.values():
        for m, values in row.pop("_v").items():
            finite = [v for v in values if not math.isnan(v)]
            row[m] = float(np.mean(finite)) if finite else math.nan
    return out


def tables(prompts: Mapping[str, Mapping[str, Any]], groups: Sequence[str], metric_names: Sequence[str]) -> dict:
    """``{group: {value: {metric: interval}}}`` plus ``overall``: means and t-intervals over prompts."""
    out: dict[str, Any] = {"overall": {m: t_interval([p[m] for p in prompts.values()]) for m in metric_names}}
    for g in groups:
        values = sorted({str(p.get(g, "")) for p in prompts.values()})
        out[g] = {
            v: {m: t_interval([p[m] for p in prompts.values() if str(p.get(g, "")) == v]) for m in metric_names}
            for v in values
        }
    return out


def _cell(iv: Mapping[str, Any]) -> str:
    if iv["mean"] is None or math.isnan(iv["mean"]):
        return "n/a"
    if iv["lo"] is None or math.isnan(iv["lo"]):
        return f"{iv['mean']:.3f}"
    return f"{iv['mean']:.3f} [{iv['lo']:.3f}, {iv['hi']:.3f}]"


def markdown(record: Mapping[str, Any]) -> str:
    """A score file's tables as Markdown (mean [95% interval over prompts], n prompts)."""
    metric_names = list(record["metrics"])
    lines = [f"# {record['set']}: {record['num_prompts']} prompts x {record['seeds']} seeds", ""]
    if record["skipped"]:
        counts = ", ".join(f"{reason}: {v['count']}" for reason, v in record["skipped"].items())
        lines += [f"Skipped rows: {counts}", ""]
    for group in ["overall", *record["groups"]]:
        rows = {"all": record["tables"]["overall"]} if group == "overall" else record["tables"][group]
        lines += [f"## {group}", "", "| " + " | ".join([group, "n", *metric_names]) + " |"]
        lines.append("|" + "---|" * (len(metric_names) + 2))
        for value, cells in rows.items():
            n = max((c["n"] for c in cells.values()), default=0)
            label = str(value).replace("|", "\\|") or "(none)"
            lines.append("| " + " | ".join([label, str(n), *(_cell(cells[m]) for m in metric_names)]) + " |")
        lines.append("")
    for key, value in record.get("set_level", {}).items():
        lines.append(f"- {key}: {value}")
    return "\n".join(lines) + "\n"


@dataclass
class Scoring:
    """What scores the images: registry metric names, their inputs, and each metric's weight file hash."""

    metric_names: list[str]
    inputs: dict[str, Any]
    weights: dict[str, str]
    fid_reference: Path | None = None
    fid_extractor: Any = None
    fid_name: str = ""

    def definitions(self) -> dict[str, dict[str, str]]:
        """Each metric's definition and weight hash (what a score file records and ``compare`` checks)."""
        from evaluation import metrics

        return {
            m: {"definition": metrics.get(m).definition, "weights_sha256": self.weights.get(m, "")}
            for m in self.metric_names
        }


def score_set(suite_set: SuiteSet, records: list[ImageRecord], scoring: Scoring, seeds: int) -> dict[str, Any]:
    """The set's score record (what ``scores.json`` holds, before its content hash)."""
    names = [m for m in scoring.metric_names if m != "compbench" or suite_set.judge]
    scores = per_image_scores(records, names, scoring.inputs)
    prompts = per_prompt(records, scores)
    record: dict[str, Any] = {
        "set": suite_set.name,
        "num_prompts": len(prompts),
        "prompts_in_set": suite_set.total,
        "seeds": seeds,
        "num_images": len(records),
        "groups": list(suite_set.groups),
        "prompt_files_sha256": sha256_files(suite_set.sources),
        "prompt_files": [str(p) for p in suite_set.sources],
        "skipped": suite_set.skips.as_dict(),
        "metrics": {m: d for m, d in scoring.definitions().items() if m in names},
        "versions": scorefile.versions(),
        "tables": tables(prompts, suite_set.groups, names),
        "per_prompt": prompts,
        "set_level": {},
    }
    if scoring.fid_reference is not None:
        from evaluation import fid

        feats = fid.record_features(records, scoring.fid_extractor)
        ref = fid.folder_features(scoring.fid_reference, scoring.fid_extractor)
        record["set_level"] = fid.distances(feats, ref) | {
            "fid_features": scoring.fid_name,
            "fid_reference": str(scoring.fid_reference),
            "fid_reference_images": len(ref),
        }
    return record


def settings_key(suite_set: SuiteSet, scoring: Scoring, seeds: int, generator: str) -> str:
    """What a set's score depends on; a stored score with another key is redone."""
    return json.dumps(
        [sorted(p.id for p in suite_set.prompts), scoring.definitions(), seeds, generator, str(scoring.fid_reference)],
        sort_keys=True,
    )


def plot(records: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """One panel per metric: each set's categories (mean and 95% interval over prompts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric_names = sorted({m for r in records for m in r["metrics"]})
    if not metric_names:
        return None
    fig, axes = plt.subplots(len(metric_names), 1, figsize=(14, 3.2 * len(metric_names)), squeeze=False)
    for ax, m in zip(axes[:, 0], metric_names, strict=True):
        labels, means, errs, colours = [], [], [], []
        for k, r in enumerate(records):
            if m not in r["metrics"]:
                continue
            for cat, cells in r["tables"]["category"].items():
                iv = cells[m]
                if iv["mean"] is None or math.isnan(iv["mean"]):
                    continue
                labels.append(f"{r['set']}:{cat}"[:34])
                means.append(iv["mean"])
                lo = iv["lo"] if iv["lo"] is not None and not math.isnan(iv["lo"]) else iv["mean"]
                errs.append(iv["mean"] - lo)
                colours.append(f"C{k % 10}")
        ax.bar(range(len(means)), means, yerr=errs, color=colours, capsize=2)
        ax.set_xticks(range(len(labels)), labels, rotation=75, fontsize=6)
        ax.set_ylabel(m)
        ax.set_title(f"{m}: per-category mean, 95% interval over prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(
    sets: Sequence[SuiteSet],
    out: Path,
    scoring: Scoring,
    generator: str | None,
    samples: Mapping[str, Path],
    seeds: int = 1,
    chunk: int = 32,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Generate (or read) and score every set, skipping sets already scored with the same settings; writes the
    per-set files and the summary. Returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    for s in sets:  # every set's prompts first: a generator run elsewhere can read them (then --samples SET=DIR)
        (out / s.name).mkdir(parents=True, exist_ok=True)
        s.prompts.to_jsonl(out / s.name / "prompts.jsonl")
    results = []
    from tqdm import tqdm

    for s in tqdm(sets, desc="suite", unit="set", file=sys.stderr, delay=1):
        set_dir = out / s.name
        set_dir.mkdir(parents=True, exist_ok=True)
        score_path = set_dir / "scores.json"
        key = settings_key(s, scoring, seeds, generator or str(samples.get(s.name)))
        if score_path.is_file():
            try:
                done = scorefile.load(score_path)
                if done.get("settings_key") == key:
                    log(f"{s.name}: already scored ({score_path})")
                    results.append(done)
                    continue
            except ValueError as e:
                log(f"{s.name}: {e}; scoring again")
        if s.name in samples:
            folders = [samples[s.name]]
        elif generator:
            folders = generate(s, generator, set_dir, seeds, chunk, log)
        else:
            raise ValueError(
                f"{s.name}: no samples folder given and no generator (give --generate, --run or --samples)"
            )
        records = load_samples(folders, s)
        log(f"{s.name}: scoring {len(records)} images")
        record = score_set(s, records, scoring, seeds) | {"settings_key": key}
        scorefile.write(record, score_path)
        (set_dir / "table.md").write_text(markdown(record), encoding="utf-8")
        results.append(scorefile.load(score_path))
    summary = {
        "sets": {
            r["set"]: {
                "overall": r["tables"]["overall"],
                "num_prompts": r["num_prompts"],
                "skipped": sum(v["count"] for v in r["skipped"].values()),
                "scores": str(out / r["set"] / "scores.json"),
                "content_sha256": r["content_sha256"],
                "prompt_files_sha256": r["prompt_files_sha256"],
                "set_level": r.get("set_level", {}),
            }
            for r in results
        },
        "metrics": {m: d for r in results for m, d in r["metrics"].items()},
        "versions": scorefile.versions(),
    }
    scorefile.write(summary, out / "summary.json")
    (out / "summary.md").write_text("\n".join(markdown(r) for r in results), encoding="utf-8")
    plot(results, out / "suite.png")
    return summary
