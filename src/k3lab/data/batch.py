"""The batch every stage receives."""

from __future__ import annotations

from collections import Counter
from typing import Any, TypedDict

import torch


class Batch(TypedDict):
    """One training/validation batch.

    image:    [B, 3, H, W] float in [-1, 1] at the configured resolution.
    caption:  B captions (stripped, non-empty).
    key:      B sample keys (``<shard name>/<key>``), to trace any sample back to its shard.
    metadata: B parsed ``key.json`` dicts (``{}`` when a sample has none; scene world: the scene spec).
    skipped:  samples skipped by reason since the previous batch of the same loader worker.
    """

    image: torch.Tensor
    caption: list[str]
    key: list[str]
    metadata: list[dict[str, Any]]
    skipped: dict[str, int]


def collate(samples: list[dict[str, Any]]) -> Batch:
    """Stack images, keep strings and metadata as lists, and sum the skip counts."""
    skipped: Counter[str] = Counter()
    for s in samples:
        skipped.update(s.get("skipped", {}))
    return Batch(
        image=torch.stack([s["image"] for s in samples]),
        caption=[s["caption"] for s in samples],
        key=[s["key"] for s in samples],
        metadata=[s["metadata"] for s in samples],
        skipped=dict(skipped),
    )
