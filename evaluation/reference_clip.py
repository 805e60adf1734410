"""A reference CLIP for the embedded default, where no pretrained CLIP exists: a small open_clip model
trained contrastively (Radford et al. 2021, arXiv 2103.00020) on a dataset's training split, with its
held-out retrieval accuracy reported so the CLIP score's meaning is visible.

It is the evaluation's own model (its own config name, seed and weights file): independent of any CLIP
a model under test uses.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from evaluation.clip_score import ClipModel, load_clip
from evaluation.images import ImageRecord

NAME = "k3lab-reference-clip"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def model_config(image_size: int = 64) -> dict[str, Any]:
    """A ~6M-parameter CLIP: ViT 4x128 on 8 px patches, text transformer 4x128, 32 tokens, 64-d embeddings."""
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": image_size, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
    }


def to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 RGB -> normalised float tensor, exactly what open_clip's transform does at the native size."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)


def retrieval_accuracy(clip: ClipModel, records: Sequence[ImageRecord]) -> dict[str, float]:
    """Top-1 image->text and text->image accuracy among all records (a caption shared by several images
    counts as a hit for any of them); chance = 1 / len(records)."""
    img = clip.embed_images([r.image for r in records])
    txt = clip.embed_texts([r.prompt for r in records])
    sim = img @ txt.t()
    captions = [r.prompt for r in records]
    i2t = np.mean([captions[j] == captions[i] for i, j in enumerate(sim.argmax(1).tolist())])
    t2i = np.mean([captions[j] == captions[i] for i, j in enumerate(sim.argmax(0).tolist())])
    return {
        "image_to_text_top1": float(i2t),
        "text_to_image_top1": float(t2i),
        "chance": 1.0 / len(records),
        "num": len(records),
    }


def train(
    train_records: Iterable[ImageRecord],
    val_records: Sequence[ImageRecord],
    out_dir: str | Path,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    image_size: int = 64,
) -> dict[str, Any]:
    """Train, save ``<out_dir>/k3lab-reference-clip.{json,pt}`` and ``report.json``; returns the report."""
    import open_clip

    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = list(train_records)
    if len(records) < batch_size:
        raise ValueError(f"reference CLIP: {len(records)} training images, fewer than one batch of {batch_size}")
    config_path = out_dir / f"{NAME}.json"
    config_path.write_text(json.dumps(model_config(image_size), indent=1))
    open_clip.add_model_config(config_path)
    model = open_clip.create_model(NAME, output_dict=True)
    tokenizer = open_clip.get_tokenizer(NAME)
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    model.train()
    t0 = time.perf_counter()
    for _ in tqdm(range(steps), desc="reference CLIP", mininterval=5):
        idx = rng.choice(len(records), size=batch_size, replace=False)
        images = to_tensor([records[i].image for i in idx])
        texts = tokenizer([records[i].prompt for i in idx])
        out = model(images, texts)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    weights = out_dir / f"{NAME}.pt"
    torch.save(model.state_dict(), weights)
    clip = load_clip(NAME, weights, config_path)
    report = {
        "model": NAME,
        "weights": str(weights),
        "config": str(config_path),
        "train_images": len(records),
        "steps": steps,
        "batch_size": batch_size,
        "train_seconds": time.perf_counter() - t0,
        "final_loss": float(loss),
        "heldout_retrieval": retrieval_accuracy(clip, val_records),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    return report


def load_reference(out_dir: str | Path) -> ClipModel:
    """The trained reference CLIP from its folder."""
    out_dir = Path(out_dir)
    return load_clip(NAME, out_dir / f"{NAME}.pt", out_dir / f"{NAME}.json")
