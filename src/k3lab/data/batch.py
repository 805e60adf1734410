"""The batch every stage receives."""

from __future__ import annotations

from collections import Counter
from typing import Any, NotRequired, TypedDict

import torch


class Batch(TypedDict):
    """One training/validation batch.

    image:    [B, 3, H, W] float in [-1, 1] at the configured resolution (None with ``data.format.decode_images=false``:
              precomputed latents train without their images).
    caption:  B captions (stripped, non-empty).
    key:      B sample keys (``<shard name>/<key>``), to trace any sample back to its shard.
    metadata: B parsed ``key.json`` dicts (``{}`` when a sample has none; scene world: the scene spec).
    skipped:  samples skipped by reason since the previous batch of the same loader worker.
    Precomputed shards (``python -m k3lab.precompute``) add:
    text_embedding: [B, L, D] frozen text-encoder outputs, zero-padded to the longest caption + 1.
    text_mask:      [B, L] bool, True for real tokens.
    latent:         [B, C, h, w] frozen first-stage latents (unscaled).
    image_embedding: [B, E] the mapping arm's frozen CLIP image embedding (``precompute.image_embeddings``).
    With ``data.aspect_buckets`` (training split) every batch is one bucket:
    bucket:         its shape, ``"<height>x<width>"`` (the images are [B, 3, height, width]).
    """

    image: torch.Tensor | None
    caption: list[str]
    key: list[str]
    metadata: list[dict[str, Any]]
    skipped: dict[str, int]
    text_embedding: NotRequired[torch.Tensor]
    text_mask: NotRequired[torch.Tensor]
    latent: NotRequired[torch.Tensor]
    image_embedding: NotRequired[torch.Tensor]
    bucket: NotRequired[str]


def batch_images(batch: Batch, stage: str) -> torch.Tensor:
    """The batch's images; a clear error when the data left them out (``data.format.decode_images=false``)."""
    images = batch["image"]
    if images is None:
        raise ValueError(
            f"the {stage} stage needs the images, but this batch has none (data.format.decode_images=false is for "
            "training the diffusion stage on precomputed latents)"
        )
    return images


def collate(samples: list[dict[str, Any]]) -> Batch:
    """Stack images, keep strings and metadata as lists, and sum the skip counts."""
    skipped: Counter[str] = Counter()
    for s in samples:
        skipped.update(s.get("skipped", {}))
    extra: dict[str, Any] = {}
    if samples and "text_embedding" in samples[0]:
        embs = [s["text_embedding"] for s in samples]
        length = min(max(e.shape[0] for e in embs) + 1, 128)  # + one masked pad, as the encoder path gives
        extra["text_embedding"] = torch.stack(
            [torch.nn.functional.pad(e, (0, 0, 0, length - e.shape[0])) for e in embs]
        )
        extra["text_mask"] = torch.stack([torch.arange(length) < e.shape[0] for e in embs])
    if samples and "bucket" in samples[0]:
        shapes = {s["bucket"] for s in samples}
        if len(shapes) > 1:
            raise ValueError(f"a batch mixes aspect buckets {sorted(shapes)}: bucketed datasets yield whole batches")
        extra["bucket"] = samples[0]["bucket"]
    if samples and "latent" in samples[0]:
        extra["latent"] = torch.stack([s["latent"] for s in samples])
    if samples and "image_embedding" in samples[0]:
        extra["image_embedding"] = torch.stack([s["image_embedding"] for s in samples])
    return Batch(  # type: ignore[typeddict-item]
        image=torch.stack([s["image"] for s in samples]) if samples and samples[0]["image"] is not None else None,
        caption=[s["caption"] for s in samples],
        key=[s["key"] for s in samples],
        metadata=[s["metadata"] for s in samples],
        skipped=dict(skipped),
        **extra,
    )
