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

log = logging.getLogger(__name__)


def _flat(prefix: str, report: dict[str, Any], group: str) -> dict[str, float]:
    part = report.get(group, {"tasks": {}, "overall": float("nan")})
    return {**{f"{prefix}/{t}": float(v) for t, v in part["tasks"].items()}, f"{prefix}/overall": float(part["overall"])}


def sample_records(generator: Any, prompts: Sequence[Any], resolution: int, settings: dict[str, Any], desc: str) -> list[Any]:
    """One image per prompt (seed = settings.seed + index), as evaluation ``ImageRecord``s."""
    from evaluation.images import ImageRecord

    batch, seed0 = int(settings["batch_size"]), int(settings["seed"])
    records = []
    bar = tqdm(total=len(prompts), desc=desc, unit="img", mininterval=5, file=sys.stdout)
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        seeds = [seed0 + start + i for i in range(len(chunk))]
        images = generator([p.text for p in chunk], seeds, resolution, settings["sampler"], int(settings["steps"]), float(settings["guidance"]))
        arrays = images.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        records += [ImageRecord(a, p.id, p.text, s, p.category, p.spec) for a, p, s in zip(arrays, chunk, seeds)]
        bar.update(len(chunk))
    bar.close()
    return records


def grid(records: Sequence[Any], count: int = 32) -> torch.Tensor:
    """The first ``count`` images as one [3, H, W] grid in [0, 1] (8 per row)."""
    images = torch.from_numpy(np.stack([r.image for r in records[:count]])).permute(0, 3, 1, 2).float() / 255
    return torchvision.utils.make_grid(images, nrow=8, padding=1, pad_value=1.0)


def evaluate(generator: Any, splits: dict[str, list[str]], resolution: int, settings: dict[str, Any], reference_clip_dir: str | Path,
             out_dir: str | Path) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Sample the seen and held-out prompts into ``out_dir/{seen,heldout}`` (PNG + metadata.jsonl) and score them;
    returns the metrics and one sample grid per split."""
    from evaluation import compbench, fid
    from evaluation.clip_score import clip_score
    from evaluation.images import load_shards, write_folder
    from evaluation.prompts import load_scene_world
    from evaluation.reference_clip import OPENAI_MEAN, OPENAI_STD, load_reference

    out_dir = Path(out_dir)
    n_seen, n_heldout = int(settings["num_seen"]), int(settings["num_heldout"])
    seen = load_scene_world(splits["test"]).prompts[:n_seen]
    heldout = load_scene_world(splits["heldout"]).prompts[:n_heldout] if n_heldout else []
    metrics: dict[str, float] = {}
    records: dict[str, list[Any]] = {}
    for name, prompts in (("seen", seen), ("heldout", heldout)):
        if not prompts:
            continue
        records[name] = sample_records(generator, prompts, resolution, settings, f"sampling {name}")
        write_folder(records[name], out_dir / name)
        metrics |= _flat(f"eval/{name}", compbench.score((r.image, r.spec) for r in records[name]), "all")
    real = list(load_shards(splits["test"], limit=max(n_seen, int(settings["fid_reference"]))))
    rng = np.random.default_rng(0)
    shuffled = [real[i] for i in rng.permutation(len(real))]
    metrics |= _flat("eval/real", compbench.score((r.image, r.spec) for r in real[:n_seen]), "all")
    metrics |= _flat("eval/chance", compbench.score((s.image, r.spec) for s, r in zip(shuffled[:n_seen], real[:n_seen]) if s.prompt != r.prompt), "all")
    clip = load_reference(reference_clip_dir)
    metrics["eval/clip_score"] = clip_score(clip, [r.image for r in records["seen"]], [r.prompt for r in records["seen"]])["clip_score"]
    metrics["eval/clip_score_real"] = clip_score(clip, [r.image for r in real[:n_seen]], [r.prompt for r in real[:n_seen]])["clip_score"]
    size = clip.model.visual.image_size
    extractor = fid.open_clip_extractor(clip.model, size[0] if isinstance(size, (tuple, list)) else size, OPENAI_MEAN, OPENAI_STD)
    reference = fid.reference_features(Path(reference_clip_dir) / "fid", "scene-world", "test", resolution, clip.name,
                                       lambda: real[: int(settings["fid_reference"])], extractor)
    result = fid.compute(records["seen"], reference, extractor, clip.name)
    metrics["eval/fid_clip"], metrics["eval/kid_clip"] = float(result["fid"]), float(result["kid"])
    return metrics, {name: grid(r) for name, r in records.items()}
