"""``python -m evaluation <command>``: metrics, fid, clip-score, compbench, train-reference-clip, sbs-export,
sbs-ingest, editing-tasks, editing-score.

Every command prints its result as JSON (and writes it with ``--out``), so callers can log it to MLflow.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm


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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; a bad input prints one error line and returns 2."""
    args = build_parser().parse_args(argv)
    try:
        _emit(args.func(args), getattr(args, "out", None))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
