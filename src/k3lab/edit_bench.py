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
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torchvision
from hydra.utils import instantiate
from PIL import Image
from tqdm import tqdm

from k3lab.checkpoint import CheckpointError, atomic_write_bytes
from k3lab.diffusion import SAMPLERS
from k3lab.imaging import to_uint8

log = logging.getLogger("k3lab.edit_bench")


def edit(generator: Any, tasks: Sequence[Any], settings: dict[str, Any], batch_size: int = 32) -> list[np.ndarray]:
    """Inpaint every task (seed = settings.seed + index); RGB uint8 results."""
    results: list[np.ndarray] = []
    bar = tqdm(total=len(tasks), desc="editing", unit="img", mininterval=5, file=sys.stdout)
    for start in range(0, len(tasks), batch_size):
        chunk = tasks[start : start + batch_size]
        image = torch.from_numpy(np.stack([t.image for t in chunk])).permute(0, 3, 1, 2).float() / 127.5 - 1
        hole = torch.from_numpy(np.stack([t.hole for t in chunk])).float()[:, None]
        images = generator(
            [t.prompt for t in chunk],
            [int(settings["seed"]) + start + i for i in range(len(chunk))],
            image.shape[-1],
            settings["sampler"],
            int(settings["steps"]),
            float(settings["guidance"]),
            image=image,
            mask=hole,
            blend=settings["blend"],
        )
        results += list(to_uint8(images))
        bar.update(len(chunk))
    bar.close()
    return results


def grid(tasks: Sequence[Any], results: Sequence[np.ndarray], rows: int = 16) -> torch.Tensor:
    """[3, H, W] in [0, 1]: per task the image, the mask (white = regenerate) and the result, four tasks per row."""
    tiles = []
    for t, r in list(zip(tasks, results, strict=True))[:rows]:
        mask = np.repeat((t.hole * 255).astype(np.uint8)[..., None], 3, axis=2)
        tiles += [t.image, mask, r]
    batch = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float() / 255
    return torchvision.utils.make_grid(batch, nrow=12, padding=2, pad_value=1.0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from evaluation import editing
    from k3lab.generate import load_generator
    from k3lab.sample import sampling_defaults

    generator, cfg = load_generator(args.checkpoint, args.device)
    if not generator.inpainting:
        channels = generator.unet.in_channels
        raise ValueError(f"{args.checkpoint}: not an inpainting run (its U-Net reads {channels} channels)")
    settings = {**sampling_defaults(cfg), "seed": args.seed, "blend": args.blend}
    for key in ("sampler", "steps", "guidance"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    test = instantiate(cfg.data.source).build()["test"]
    from evaluation.images import load_shards

    tasks = editing.make_tasks(((r.image, r.spec, r.prompt) for r in load_shards(test)), args.num, args.task_seed)
    out = Path(args.out)
    editing.write_tasks(tasks, out)
    start = time.perf_counter()
    results = edit(generator, tasks, settings, args.batch_size)
    seconds = time.perf_counter() - start
    for t, r in zip(tasks, results, strict=True):
        Image.fromarray(r).save(out / f"{t.task_id}.png")
    torchvision.utils.save_image(grid(tasks, results), out / "grid.png")
    report = {
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "settings": settings,
        "num_tasks": len(tasks),
        "seconds": round(seconds, 1),
        "model": editing.score(results, tasks),
        "baselines": editing.baselines(tasks),
    }
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=1, allow_nan=True).encode())
    return report


def main(argv: list[str] | None = None) -> int:
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
