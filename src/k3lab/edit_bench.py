"""The editing benchmark for an inpainting run: ``python -m k3lab.edit_bench <checkpoint> [--num 128] [--out DIR]``.

Builds the tasks from the run's own scene world (test split, :mod:`evaluation.editing`), inpaints each masked
object with the edited caption, and scores the results against the trivial baselines (copy, mean fill). Writes
``report.json``, the results (``<task_id>.png`` beside the task files, so ``python -m evaluation editing-score``
re-scores them) and ``grid.png`` (rows of image | mask | result | copy of the prompt's colour).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from k3lab.diffusion import SAMPLERS
from k3lab.inference.edit_benchmark import run
from k3lab.io.checkpoint import CheckpointError


def main(argv: list[str] | None = None) -> int:
    """Parse the editing benchmark's arguments and run it; bad input prints one error line and returns 2."""
    p = argparse.ArgumentParser(
        prog="python -m k3lab.edit_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", help="an inpainting run's checkpoints folder (or its unet.safetensors / .ckpt)")
    p.add_argument("--out", default="edit_bench", help="output folder")
    p.add_argument("--num", type=int, default=128, help="number of tasks")
    p.add_argument("--task-seed", type=int, default=0, help="which objects and edits are drawn")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the first task")
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--blend", default="pixel", choices=["pixel", "latent", "none"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = run(args)
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: report[k] for k in ("num_tasks", "seconds", "model", "baselines")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
