"""The editing benchmark behind ``python -m k3lab.edit_bench`` (usage and outputs: :mod:`k3lab.edit_bench`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torchvision
from hydra.utils import instantiate
from PIL import Image
from tqdm import tqdm

from k3lab.diffusion import SamplingSettings
from k3lab.io.checkpoint import atomic_write_bytes
from k3lab.io.imaging import to_uint8

log = logging.getLogger("k3lab.edit_bench")


def edit(
    generator: Any, tasks: Sequence[Any], settings: SamplingSettings, seed: int, blend: str, batch_size: int = 32
) -> list[np.ndarray]:
    """Inpaint every task (seed = ``seed`` + index, paste-back ``blend``); RGB uint8 results."""
    results: list[np.ndarray] = []
    bar = tqdm(total=len(tasks), desc="editing", unit="img", mininterval=5, file=sys.stdout)
    for start in range(0, len(tasks), batch_size):
        chunk = tasks[start : start + batch_size]
        image = torch.from_numpy(np.stack([t.image for t in chunk])).permute(0, 3, 1, 2).float() / 127.5 - 1
        hole = torch.from_numpy(np.stack([t.hole for t in chunk])).float()[:, None]
        images = generator.generate(
            settings,
            [t.prompt for t in chunk],
            [seed + start + i for i in range(len(chunk))],
            image.shape[-1],
            image=image,
            mask=hole,
            blend=blend,
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
    """Load an inpainting run, edit the benchmark's tasks, score them and write ``report.json`` and a grid."""
    from evaluation import editing
    from k3lab.inference.loading import load_generator

    generator, cfg = load_generator(args.checkpoint, args.device)
    if not generator.inpainting:
        channels = generator.unet.in_channels
        raise ValueError(f"{args.checkpoint}: not an inpainting run (its U-Net reads {channels} channels)")
    settings = SamplingSettings.of_run(cfg).updated(sampler=args.sampler, steps=args.steps, guidance=args.guidance)
    settings = replace(settings, x0_threshold=generator.x0_threshold)  # the run's stage's own
    test = instantiate(cfg.data.source).build()["test"]
    from evaluation.images import load_shards

    def scenes() -> Iterator[tuple[np.ndarray, dict[str, Any], str]]:
        for r in load_shards(test):
            if r.spec is None:
                raise ValueError(f"{r.prompt_id}: an editing task needs the scene's spec (a scene world shard's .json)")
            yield r.image, r.spec, r.prompt

    tasks = editing.make_tasks(scenes(), args.num, args.task_seed)
    out = Path(args.out)
    editing.write_tasks(tasks, out)
    start = time.perf_counter()
    results = edit(generator, tasks, settings, args.seed, args.blend, args.batch_size)
    seconds = time.perf_counter() - start
    for t, r in zip(tasks, results, strict=True):
        Image.fromarray(r).save(out / f"{t.task_id}.png")
    torchvision.utils.save_image(grid(tasks, results), out / "grid.png")
    report = {
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "settings": {**settings.as_dict(), "seed": args.seed, "blend": args.blend},
        "num_tasks": len(tasks),
        "seconds": round(seconds, 1),
        "model": editing.score(results, tasks),
        "baselines": editing.baselines(tasks),
    }
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=1, allow_nan=True).encode())
    return report
