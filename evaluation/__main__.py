"""``python -m evaluation <command>``: metrics, fid, clip-score, compbench, train-reference-clip, sbs-export,
sbs-ingest, editing-tasks, editing-score, suite, compare, agreement, noise.

Every command prints its result as JSON (and writes it with ``--out``), so callers can log it to MLflow.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from evaluation.images import load_folder


def _shards(spec: str) -> list[str]:
    from braceexpand import braceexpand

    return [u for part in spec.split("::") for u in braceexpand(part)]


def _emit(result: Any, out: Path | None) -> None:
    text = json.dumps(result, indent=1, default=str)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(text)


def cmd_compbench(args: argparse.Namespace) -> Any:
    """Score a samples folder with the scene world's compositional judge."""
    from evaluation import compbench
    from evaluation.images import load_folder

    records = load_folder(args.images, expected=args.expected)
    missing = [r.prompt_id for r in records if r.spec is None]
    if missing:
        raise ValueError(
            f"{args.images}: {len(missing)} images have no scene spec in metadata.jsonl, e.g. {missing[0]!r}"
        )
    return compbench.score(
        ((r.image, r.spec) for r in tqdm(records, desc="compbench", mininterval=2) if r.spec is not None),
        group_key=args.group_key,
    )


def _extractor(args: argparse.Namespace) -> tuple[Any, str]:
    from evaluation import fid

    if args.extractor == "inception":
        return fid.inception_extractor(args.inception), "inception-2015-12-05"
    from evaluation.clip_score import load_clip

    clip = load_clip(args.clip_model, args.clip_weights, args.clip_config)
    size = clip.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    from evaluation.reference_clip import OPENAI_MEAN, OPENAI_STD

    return fid.open_clip_extractor(
        clip.model,
        size,
        getattr(clip.model.visual, "image_mean", None) or OPENAI_MEAN,
        getattr(clip.model.visual, "image_std", None) or OPENAI_STD,
    ), clip.name


def cmd_fid(args: argparse.Namespace) -> Any:
    """FID/KID of a samples folder against a reference folder (clean-fid features, local weights)."""
    from evaluation import fid

    extractor, name = _extractor(args)
    a, b = fid.folder_features(args.images, extractor), fid.folder_features(args.reference, extractor)
    return {
        **fid.distances(a, b),
        "extractor": name,
        "implementation": fid.implementation(),
        "num_generated": len(a),
        "num_reference": len(b),
    }


def cmd_clip_score(args: argparse.Namespace) -> Any:
    """CLIP score of a samples folder with a local open_clip model."""
    from evaluation.clip_score import clip_score, load_clip
    from evaluation.images import load_folder

    records = load_folder(args.images, expected=args.expected)
    return clip_score(
        load_clip(args.clip_model, args.clip_weights, args.clip_config),
        [r.image for r in records],
        [r.prompt for r in records],
    )


def cmd_train_reference_clip(args: argparse.Namespace) -> Any:
    """Train the small reference CLIP the offline CLIP score and FID use."""
    from evaluation import reference_clip
    from evaluation.images import load_shards

    train = list(load_shards(_shards(args.train)))
    val = list(load_shards(_shards(args.val), limit=args.val_count))
    return reference_clip.train(train, val, args.out_dir, steps=args.steps, batch_size=args.batch_size, seed=args.seed)


def cmd_sbs_export(args: argparse.Namespace) -> Any:
    """Write a blinded side-by-side package (page and manifest) from two samples folders."""
    from evaluation import sbs
    from evaluation.images import load_folder

    # load_folder checks every file is present and readable; records keep their paths
    a = {(r.prompt_id, r.seed): r for r in load_folder(args.images_a)}
    b = {(r.prompt_id, r.seed): r for r in load_folder(args.images_b)}
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError(f"{args.images_a} and {args.images_b} share no (prompt_id, seed)")
    pairs = [
        sbs.Pair(a[k].prompt_id, a[k].prompt, a[k].category, a[k].seed, path_a, path_b)
        for k in common
        if (path_a := a[k].path) is not None and (path_b := b[k].path) is not None  # (folder records have paths)
    ]
    paths = sbs.export(
        pairs,
        args.out_dir,
        args.model_a,
        args.model_b,
        seed=args.seed,
        repeat_fraction=args.repeat_fraction,
        key_path=args.key,
    )
    return {k: str(v) for k, v in paths.items()} | {"num_pairs": len(pairs), "only_in_one": len(set(a) ^ set(b))}


def cmd_sbs_ingest(args: argparse.Namespace) -> Any:
    """Read raters' side-by-side answers back and compute the win rates and agreement."""
    from evaluation import sbs

    report = sbs.ingest(args.annotations, args.key, bootstrap_samples=args.bootstrap)
    if args.report_dir:
        report["files"] = {k: str(v) for k, v in sbs.write_report(report, args.report_dir).items()}
    return report


def scene_triples(shards: Sequence[str], limit: int | None = None) -> Any:
    """(image, spec, caption) of scene-world shards (the editing benchmark's input)."""
    from evaluation.images import load_shards

    return ((r.image, r.spec, r.prompt) for r in load_shards(shards, limit=limit))


def cmd_editing_tasks(args: argparse.Namespace) -> Any:
    """Write the editing benchmark's tasks (image, hole, prompt) to a folder."""
    from evaluation import editing

    tasks = editing.make_tasks(scene_triples(_shards(args.shards)), args.num, args.seed)
    if len(tasks) < args.num:
        print(f"warning: only {len(tasks)} editable scenes in {args.shards}", file=sys.stderr)
    editing.write_tasks(tasks, args.out_dir)
    return {"tasks": len(tasks), "out_dir": str(args.out_dir), "baselines": editing.baselines(tasks)}


def cmd_editing_score(args: argparse.Namespace) -> Any:
    """Score edited images against their editing tasks."""
    from evaluation import editing

    tasks = editing.load_tasks(args.tasks)
    return {
        "model": editing.score(editing.load_results(args.results, tasks), tasks),
        "baselines": editing.baselines(tasks),
    }


def _scoring(args: argparse.Namespace, judge: bool = True) -> Any:
    """The per-image metrics the options name: CLIP score (``--clip-weights``), PickScore (``--pickscore``), HPSv2
    (``--hpsv2``), the scene judge; FID against ``--fid-reference`` with the CLIP (or Inception) features."""
    from evaluation.preference import sha256_file
    from evaluation.suite import Scoring

    names: list[str] = []
    inputs: dict[str, Any] = {"settings": {}}
    weights: dict[str, str] = {}
    clip = None
    if args.clip_weights:
        from evaluation.clip_score import load_clip

        clip = load_clip(args.clip_model, args.clip_weights, args.clip_config)
        names.append("clip_score")
        inputs["reference_clip"] = clip
        weights["clip_score"] = sha256_file(args.clip_weights)
    preference = {
        "pickscore": {"pickscore": args.pickscore, "pickscore_processor": args.pickscore_processor},
        "hpsv2": {"hpsv2": args.hpsv2, "hpsv2_model": args.hpsv2_model, "hpsv2_config": args.hpsv2_config},
    }
    for kind, settings in preference.items():
        if settings[kind]:
            from evaluation.metrics import preference_scorer

            inputs["settings"] |= {k: v for k, v in settings.items() if v is not None}
            names.append(kind)
            weights[kind] = preference_scorer(kind, inputs["settings"]).weights_sha256
    if judge:
        names.append("compbench")
    if not names:
        raise ValueError("no metric to compute: give --clip-weights, --pickscore and/or --hpsv2")
    scoring = Scoring(names, inputs, weights)
    if getattr(args, "fid_reference", None):
        args.extractor = "clip" if clip is not None else "inception"
        scoring.fid_reference = args.fid_reference
        scoring.fid_extractor, scoring.fid_name = _extractor(args)
    return scoring


def cmd_suite(args: argparse.Namespace) -> Any:
    """Score a model on every prompt set found (see ``evaluation.suite``)."""
    from evaluation import suite

    sets, absent = suite.find_sets(
        args.prompt_sets, args.drawbench, args.scene_world, args.limit, args.max_prompt_chars, args.only or None
    )
    for name in absent:
        print(f"suite: prompt set not found, left out: {name}", file=sys.stderr)
    samples = dict(_pair(x, "--samples") for x in args.samples)
    generator = args.generate
    if generator is None and args.run is not None:
        generator = suite.K3LAB_GENERATOR.replace("{run}", shlex.quote(str(args.run))) + " " + args.sample_args
    scoring = _scoring(args, judge=any(s.judge for s in sets))
    summary = suite.run(
        sets,
        args.out_dir,
        scoring,
        generator,
        {k: Path(v) for k, v in samples.items()},
        args.seeds,
        args.chunk,
        log=lambda m: print(m, file=sys.stderr),
    )
    return summary | {"absent": absent, "out_dir": str(args.out_dir)}


def _pair(text: str, option: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise ValueError(f"{option} {text!r}: expected NAME=PATH")
    return name, value


def cmd_compare(args: argparse.Namespace) -> Any:
    """Compare two score files of one prompt set, prompt by prompt (refused when they measure different things)."""
    from evaluation.compare import compare

    return compare(args.a, args.b, args.bootstrap)


def _keyed_scores(folder: Path, scoring: Any) -> dict[str, dict[tuple[str, int], float]]:
    from evaluation.suite import per_image_scores

    records = load_folder(folder)
    scores = per_image_scores(records, scoring.metric_names, scoring.inputs)
    return {m: {(r.prompt_id, r.seed): v for r, v in zip(records, values, strict=True)} for m, values in scores.items()}


def cmd_agreement(args: argparse.Namespace) -> Any:
    """How often each single-image metric prefers the side the human majority preferred (after ``sbs-ingest``)."""
    from evaluation import agreement

    report = json.loads(Path(args.sbs_results).read_text(encoding="utf-8"))
    if "pairs" not in report:
        raise ValueError(f"{args.sbs_results}: no per-pair votes ('pairs'): re-run sbs-ingest with this version")
    scoring = _scoring(args, judge=args.judge)
    a, b = _keyed_scores(args.samples_a, scoring), _keyed_scores(args.samples_b, scoring)
    out: dict[str, Any] = {"model_a": report.get("model_a"), "model_b": report.get("model_b"), "questions": {}}
    for question, pairs in report["pairs"].items():
        human = agreement.human_majority(pairs)
        out["questions"][question] = {
            "human_pairs": len(pairs),
            "with_majority": len(human),
            "metrics": {m: agreement.metric_agreement(human, a[m], b[m], args.bootstrap) for m in scoring.metric_names},
        }
    out["noise_floor"] = {
        side: {m: agreement.noise_floor(scores[m]) for m in scoring.metric_names}
        for side, scores in (("a", a), ("b", b))
    }
    out["metrics"] = scoring.definitions()
    return out


def cmd_noise(args: argparse.Namespace) -> Any:
    """Each metric's noise floor on one samples folder; FID_inf against ``--fid-reference``."""
    from evaluation import agreement, fid

    scoring = _scoring(args, judge=args.judge)
    scores = _keyed_scores(args.images, scoring)
    out: dict[str, Any] = {m: agreement.noise_floor(v) for m, v in scores.items()}
    if scoring.fid_reference is not None:
        feats = fid.folder_features(args.images, scoring.fid_extractor)
        ref = fid.folder_features(scoring.fid_reference, scoring.fid_extractor)
        out[f"fid_infinity_{scoring.fid_name}"] = agreement.fid_infinity(feats, ref, args.sizes or None)
    return out


def cmd_metrics(args: argparse.Namespace) -> Any:
    """List the metric registry: name, direction and what each metric needs."""
    from evaluation.metrics import describe

    return describe()


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m evaluation`` parser with one subcommand per ``cmd_*`` function."""
    p = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
        return sp

    def expected(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--expected", type=int, default=None, help="prompts x seeds: a different image count is an error"
        )

    def clip_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name (or the stem of --clip-config)")
        sp.add_argument("--clip-weights", type=Path, required=False, help="local open_clip weights file")
        sp.add_argument("--clip-config", type=Path, default=None, help="JSON model config for custom models")

    from evaluation.metrics import REGISTRY

    sp = common(sub.add_parser("metrics", help="the metric registry: names, directions, inputs and exact definitions"))
    sp.set_defaults(func=cmd_metrics)
    sp = common(
        sub.add_parser(
            "compbench",
            help="compositional accuracy of scene-world images",
            description=REGISTRY["compbench"].definition,
        )
    )
    sp.add_argument("images", type=Path, help="folder with metadata.jsonl (each line with the scene 'spec')")
    sp.add_argument("--group-key", default="split", help="spec field for the breakdown (seen vs heldout)")
    expected(sp)
    sp.set_defaults(func=cmd_compbench)
    sp = common(
        sub.add_parser("fid", help="FID and KID between two image folders", description=REGISTRY["fid_clip"].definition)
    )
    sp.add_argument("images", type=Path)
    sp.add_argument("reference", type=Path)
    sp.add_argument("--extractor", choices=["inception", "clip"], default="inception")
    sp.add_argument("--inception", type=Path, default=Path("weights") / "inception-2015-12-05.pt")
    clip_args(sp)
    sp.set_defaults(func=cmd_fid)
    sp = common(
        sub.add_parser(
            "clip-score",
            help="CLIP score of a folder's images against their prompts",
            description=REGISTRY["clip_score"].definition,
        )
    )
    sp.add_argument("images", type=Path)
    clip_args(sp)
    expected(sp)
    sp.set_defaults(func=cmd_clip_score)
    sp = common(sub.add_parser("train-reference-clip", help="train the reference CLIP on scene-world shards"))
    sp.add_argument("--train", required=True, help="shards, brace pattern allowed")
    sp.add_argument("--val", required=True, help="held-out shards for the retrieval accuracy")
    sp.add_argument("--val-count", type=int, default=500)
    sp.add_argument("--out-dir", type=Path, required=True)
    sp.add_argument("--steps", type=int, default=1500)
    sp.add_argument("--batch-size", type=int, default=128)
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=cmd_train_reference_clip)
    sp = common(sub.add_parser("sbs-export", help="blinded side-by-side annotation package"))
    sp.add_argument("images_a", type=Path)
    sp.add_argument("images_b", type=Path)
    sp.add_argument("--model-a", required=True)
    sp.add_argument("--model-b", required=True)
    sp.add_argument("--out-dir", type=Path, required=True)
    sp.add_argument("--key", type=Path, default=None, help="where the hidden key goes (default: beside out-dir)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--repeat-fraction", type=float, default=0.1)
    sp.set_defaults(func=cmd_sbs_export)
    sp = common(sub.add_parser("sbs-ingest", help="aggregate side-by-side annotations"))
    sp.add_argument("annotations", type=Path, help="CSV or JSON: item_id, annotator_id, question, choice")
    sp.add_argument("--key", type=Path, required=True)
    sp.add_argument("--report-dir", type=Path, default=None)
    sp.add_argument("--bootstrap", type=int, default=2000)
    sp.set_defaults(func=cmd_sbs_ingest)
    sp = common(sub.add_parser("editing-tasks", help="editing benchmark tasks from scene-world shards"))
    sp.add_argument("shards", help="test-split shards, brace pattern allowed (:: joins several)")
    sp.add_argument("--out-dir", type=Path, required=True, help="writes tasks.jsonl, <id>_image.png, <id>_mask.png")
    sp.add_argument("--num", type=int, default=128)
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=cmd_editing_tasks)
    sp = common(sub.add_parser("editing-score", help="score edited images (<id>.png) against editing tasks"))
    sp.add_argument("tasks", type=Path, help="the editing-tasks folder")
    sp.add_argument("results", type=Path, help="folder with one <task_id>.png per task")
    sp.set_defaults(func=cmd_editing_score)

    def scorer_args(sp: argparse.ArgumentParser, fid: bool = True) -> None:
        clip_args(sp)
        sp.add_argument("--pickscore", type=Path, default=None, help="local PickScore_v1 CLIPModel folder")
        sp.add_argument("--pickscore-processor", type=Path, default=None, help="its CLIP processor folder")
        sp.add_argument("--hpsv2", type=Path, default=None, help="local HPS_v2*_compressed.pt")
        sp.add_argument("--hpsv2-model", default="ViT-H-14", help="open_clip architecture of the HPSv2 checkpoint")
        sp.add_argument("--hpsv2-config", type=Path, default=None, help="custom open_clip model JSON (tests)")
        if fid:
            sp.add_argument("--fid-reference", type=Path, default=None, help="folder of reference images for FID")
            sp.add_argument("--inception", type=Path, default=Path("weights") / "inception-2015-12-05.pt")

    sp = common(sub.add_parser("suite", help="score a model on every prompt set (tables, plot, hashes)"))
    sp.add_argument("--out-dir", type=Path, required=True)
    sp.add_argument("--generate", default=None, help="command with {prompts} (a .jsonl) and {out} (a folder)")
    sp.add_argument("--run", type=Path, default=None, help="a k3lab run's checkpoints: k3lab.sample generates")
    sp.add_argument("--sample-args", default="", help="extra k3lab.sample options with --run")
    sp.add_argument("--samples", action="append", default=[], help="SET=FOLDER made earlier (repeatable)")
    sp.add_argument("--prompt-sets", type=Path, default=Path("..") / "shared" / "prompt-sets")
    sp.add_argument("--drawbench", type=Path, default=None, help="a DrawBench CSV (Prompts, Category)")
    sp.add_argument("--scene-world", type=Path, default=None, help="scene-world shard folder (test-*, heldout-*)")
    sp.add_argument("--only", action="append", default=[], help="score only this set (repeatable)")
    sp.add_argument("--limit", type=int, default=None, help="at most N prompts per set (round-robin by category)")
    sp.add_argument("--seeds", type=int, default=1, help="images per prompt")
    sp.add_argument("--chunk", type=int, default=32, help="prompts per generator call (the unit of resuming)")
    sp.add_argument("--max-prompt-chars", type=int, default=2000, help="longer prompts are counted and skipped")
    scorer_args(sp)
    sp.set_defaults(func=cmd_suite)
    sp = common(sub.add_parser("compare", help="compare two score files of one prompt set, prompt by prompt"))
    sp.add_argument("a", type=Path)
    sp.add_argument("b", type=Path)
    sp.add_argument("--bootstrap", type=int, default=2000)
    sp.set_defaults(func=cmd_compare)
    sp = common(sub.add_parser("agreement", help="each metric's agreement with the side-by-side human majority"))
    sp.add_argument("sbs_results", type=Path, help="sbs-ingest's JSON (--out)")
    sp.add_argument("samples_a", type=Path)
    sp.add_argument("samples_b", type=Path)
    sp.add_argument("--judge", action="store_true", help="also the scene judge (scene-world samples)")
    sp.add_argument("--bootstrap", type=int, default=2000)
    scorer_args(sp, fid=False)
    sp.set_defaults(func=cmd_agreement)
    sp = common(sub.add_parser("noise", help="seed-to-seed and prompt SD per metric; FID_inf with --fid-reference"))
    sp.add_argument("images", type=Path)
    sp.add_argument("--judge", action="store_true", help="also the scene judge (scene-world samples)")
    sp.add_argument("--sizes", type=int, nargs="*", default=None, help="sample sizes for FID_inf")
    scorer_args(sp)
    sp.set_defaults(func=cmd_noise)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; a bad input prints one error line and returns 2."""
    args = build_parser().parse_args(argv)
    try:
        _emit(args.func(args), getattr(args, "out", None))
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
