"""Evaluate a trained text-to-image model on the scene world with the evaluation package.

Seen prompts come from the test split (colour-shape pairs seen in training), held-out prompts from the
held-out split (pairs never seen). Metrics (all prefixed ``eval/``):
- ``seen/<task>``, ``heldout/<task>`` and ``*/overall``: compositional accuracy (``evaluation.compbench``);
- ``chance/<task>``: the same benchmark on real test images paired with another prompt's scene, i.e. what an
  image that ignores its prompt scores; ``real/<task>``: real images with their own prompt (the detector's ceiling);
- ``fid_clip`` / ``kid_clip``: FID/KID of the seen samples against real test images in the reference CLIP's
  feature space; ``clip_score`` (and ``clip_score_real`` for real images): the reference CLIP's score.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torchvision
from tqdm import tqdm

from k3lab.diffusion import SamplingSettings
from k3lab.io.imaging import to_uint8

log = logging.getLogger(__name__)


def sample_records(
    generator: Any, prompts: Sequence[Any], resolution: int, settings: dict[str, Any], desc: str
) -> list[Any]:
    """One image per prompt (seed = settings.seed + index), as evaluation ``ImageRecord``s."""
    from evaluation.images import ImageRecord

    batch, seed0 = int(settings["batch_size"]), int(settings["seed"])
    records = []
    bar = tqdm(total=len(prompts), desc=desc, unit="img", mininterval=5, file=sys.stdout)
    sampling = SamplingSettings.from_config(settings["sampling"])  # the cell's sampling group, passed whole
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        seeds = [seed0 + start + i for i in range(len(chunk))]
        images = generator.generate(sampling, [p.text for p in chunk], seeds, resolution)
        arrays = to_uint8(images)
        records += [
            ImageRecord(a, p.id, p.text, s, p.category, p.spec) for a, p, s in zip(arrays, chunk, seeds, strict=False)
        ]
        bar.update(len(chunk))
    bar.close()
    return records


def captioned(image: np.ndarray, text: str, scale: int = 2, lines: int = 4) -> np.ndarray:
    """An RGB uint8 image enlarged ``scale`` x (nearest) with its prompt written below it (wrapped, up to ``lines``
    lines; longer prompts end with '...')."""
    import textwrap

    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    big = Image.fromarray(image).resize((w * scale, h * scale), Image.Resampling.NEAREST)
    wrapped = textwrap.wrap(text, width=max(8, (w * scale - 4) // 6))
    if len(wrapped) > lines:
        wrapped = wrapped[: lines - 1] + [wrapped[lines - 1][: max(0, (w * scale - 4) // 6 - 3)] + "..."]
    canvas = Image.new("RGB", (w * scale, h * scale + 11 * lines + 4), "white")
    canvas.paste(big, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(wrapped):
        draw.text((2, h * scale + 2 + 11 * i), line, fill=(0, 0, 0))
    return np.asarray(canvas)


def grid(records: Sequence[Any], count: int = 32) -> torch.Tensor:
    """The first ``count`` images, each with its prompt below it, as one [3, H, W] grid in [0, 1] (8 per row)."""
    tiles = np.stack([captioned(r.image, r.prompt) for r in records[:count]])
    images = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    return torchvision.utils.make_grid(images, nrow=8, padding=2, pad_value=0.6)


def seen_prompts(prompts: Sequence[Any], num_seen: int, num_single: int = 0) -> list[Any]:
    """The first ``num_seen`` test prompts (every kind), then further single-object prompts until ``num_single`` of
    them are in (single-object and colour accuracy are read on those; more prompts, a smaller binomial error)."""
    chosen = list(prompts[:num_seen])
    singles = sum(1 for p in chosen if (p.spec or {}).get("kind") == "single")
    for p in prompts[num_seen:]:
        if singles >= num_single:
            break
        if (p.spec or {}).get("kind") == "single":
            chosen.append(p)
            singles += 1
    if singles < num_single:
        raise ValueError(
            f"ablation.evaluation.num_seen_single={num_single}: the test split holds only {singles} single-object "
            "scenes; raise data.source.num_test (or the single kind's share, data.source.kind_weights)"
        )
    return chosen


def needs_reference_clip(settings: dict[str, Any]) -> bool:
    """Whether the metrics named in ``settings["metrics"]`` use the reference CLIP (FID features, CLIP score)."""
    from evaluation import metrics as registry

    names = list(settings.get("metrics") or ("compbench", "fid_clip", "clip_score"))
    return bool({n for name in names for n in registry.get(name).needs} & {"reference_clip", "fid_reference"})


def evaluate(
    generator: Any,
    splits: dict[str, list[str]],
    resolution: int,
    settings: dict[str, Any],
    reference_clip_dir: str | Path | None,
    out_dir: str | Path,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Sample the seen and held-out prompts into ``out_dir/{seen,heldout}`` (PNG + metadata.jsonl) and score them with
    the registered metrics ``settings["metrics"]`` (``evaluation.metrics``); returns the metrics and one grid per
    split."""
    from evaluation import fid
    from evaluation import metrics as registry
    from evaluation.images import load_shards, write_folder
    from evaluation.prompts import load_scene_world
    from evaluation.reference_clip import load_reference

    names = list(settings.get("metrics") or ("compbench", "fid_clip", "clip_score"))
    needs = {n for name in names for n in registry.get(name).needs}  # unknown names fail here, before any sampling
    out_dir = Path(out_dir)
    n_seen, n_heldout = int(settings["num_seen"]), int(settings["num_heldout"])
    prompts = {
        "seen": seen_prompts(
            load_scene_world(splits["test"]).prompts, n_seen, int(settings.get("num_seen_single") or 0)
        ),
        "heldout": load_scene_world(splits["heldout"]).prompts[:n_heldout] if n_heldout else [],
    }
    records: dict[str, list[Any]] = {}
    for name, split_prompts in prompts.items():
        if split_prompts:
            records[name] = sample_records(generator, split_prompts, resolution, settings, f"sampling {name}")
            write_folder(records[name], out_dir / name)
    real = list(load_shards(splits["test"], limit=max(n_seen, int(settings["fid_reference"]))))
    clip = None
    if needs & {"reference_clip", "fid_reference"}:
        if reference_clip_dir is None:
            raise ValueError(f"metrics {sorted(names)} need the reference CLIP folder (reference_clip_dir)")
        clip = load_reference(reference_clip_dir)

    def fid_reference(extractor: Any) -> np.ndarray:
        assert clip is not None and reference_clip_dir is not None  # (needs has fid_reference)
        return fid.reference_features(
            Path(reference_clip_dir) / "fid",
            "scene-world",
            "test",
            resolution,
            clip.name,
            lambda: real[: int(settings["fid_reference"])],
            extractor,
        )

    inputs = registry.EvalInputs(records, real, clip, fid_reference if clip is not None else None, settings)
    metrics = registry.compute(names, inputs)
    write_per_prompt(records, inputs.per_image, out_dir / PER_PROMPT)
    return metrics, {name: grid(r) for name, r in records.items()}


PER_PROMPT = "per_prompt.csv"  # one row per evaluation sample: the paired analysis reads it (k3lab.ablation.paired)


def write_per_prompt(
    records: dict[str, list[Any]], per_image: dict[str, dict[str, list[float]]], path: str | Path
) -> Path:
    """``split, index, prompt_id, kind, seed`` and every per-image score the metrics left (compbench tasks as 0/1,
    empty where a task does not apply; the CLIP score) for each sample: cells of one seed share prompts and sampling
    seeds, so their rows pair up by (split, prompt_id)."""
    import csv
    import math

    names = sorted({name for scores in per_image.values() for name in scores})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "index", "prompt_id", "kind", "seed", *names])
        for split, recs in records.items():
            scores = per_image.get(split, {})
            for i, r in enumerate(recs):
                values = [scores[n][i] if n in scores and i < len(scores[n]) else float("nan") for n in names]
                writer.writerow(
                    [split, i, r.prompt_id, (r.spec or {}).get("kind", ""), r.seed]
                    + ["" if math.isnan(v) else f"{v:.6g}" for v in values]
                )
    return path
