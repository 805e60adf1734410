"""The evaluation suite on a trained k3lab scene-world cell: every prompt set, ``--limit`` prompts each, timed with
this machine's fp32 matmul GFLOP/s.

    python benchmarks/eval_suite.py --root .            # after `make quickstart` (or any ablation job) in this folder
    python benchmarks/eval_suite.py --run <cell>/checkpoints --scene-world <shards> --reference-clip <dir>

``--root`` finds what a finished ablation job left: its first cell's ``checkpoints`` (``logs/*/{runs,multiruns}``),
the scene world's shards (``data/scene_world/*``) and the reference CLIP (``logs/shared/reference_clip-*``). The
suite itself is ``python -m evaluation suite`` with ``--run`` (``k3lab.sample`` generates), the reference CLIP's
CLIP score and the scene judge; its tables, plot and score files go to ``--out``; this script prints (and with
``--json`` writes) the wall time, the GFLOP/s and each set's overall means.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from k3lab.ablation.timing import matmul_gflops


def first(pattern: str, root: Path, what: str) -> Path:
    """The first path (sorted) under ``root`` matching ``pattern``; an error naming what is missing."""
    found = sorted(root.glob(pattern))
    if not found:
        raise SystemExit(f"{root}: no {what} ({pattern}); run the main job first or give the paths")
    return found[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="a folder an ablation job ran in (paths.root_dir)")
    parser.add_argument("--run", type=Path, default=None, help="a cell's checkpoints folder")
    parser.add_argument("--scene-world", type=Path, default=None, help="the scene world's shard folder")
    parser.add_argument("--reference-clip", type=Path, default=None, help="folder with k3lab-reference-clip.pt/.json")
    parser.add_argument("--prompt-sets", type=Path, default=Path("..") / "shared" / "prompt-sets")
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("logs") / "eval_suite")
    parser.add_argument("--sample-args", default="--batch-size 32")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.root is not None:
        logs = args.root / "logs"
        cell = (
            next(
                (
                    p.parent
                    for p in sorted(logs.glob("*/*/*/*/checkpoints/unet.safetensors"))
                    if "shared" not in p.parts
                ),
                None,
            )
            or first("*/*/*/checkpoints/unet.safetensors", logs, "trained cell").parent
        )
        args.run = args.run or cell
        args.scene_world = args.scene_world or first("data/scene_world/*", args.root, "scene world")
        args.reference_clip = args.reference_clip or first("shared/reference_clip-*", logs, "reference CLIP")
    if not (args.run and args.scene_world and args.reference_clip):
        raise SystemExit("give --root, or --run, --scene-world and --reference-clip")
    gflops = matmul_gflops()
    clip = args.reference_clip
    command = [
        sys.executable, "-m", "evaluation", "suite", "--out-dir", str(args.out), "--run", str(args.run),
        "--sample-args", args.sample_args, "--scene-world", str(args.scene_world), "--prompt-sets",
        str(args.prompt_sets), "--limit", str(args.limit), "--clip-model", "k3lab-reference-clip",
        "--clip-weights", str(clip / "k3lab-reference-clip.pt"),
        "--clip-config", str(clip / "k3lab-reference-clip.json"),
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"suite failed ({result.returncode}):\n{result.stderr[-3000:]}")
    summary = json.loads(result.stdout)
    out = {
        "wall_seconds": round(seconds, 1),
        "gflops": round(gflops, 1),
        "limit": args.limit,
        "run": str(args.run),
        "sets": {
            name: {
                "prompts": s["num_prompts"],
                "skipped": s["skipped"],
                **{m: round(v["mean"], 4) for m, v in s["overall"].items() if v["mean"] is not None},
            }
            for name, s in summary["sets"].items()
        },
        "absent": summary["absent"],
        "out_dir": str(args.out),
    }
    text = json.dumps(out, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
