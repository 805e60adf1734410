"""What every stage shares, as plain functions: the optimizer factory type, the linear warm-up schedule and
gradient clipping by norm."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

# A Hydra ``_partial_: true`` optimizer: called with the parameters to optimise.
OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]


def warmup(step: int, warmup_steps: int) -> float:
    """The learning-rate factor at optimizer ``step``: ``(step + 1) / warmup_steps`` up to 1; 1 from the start when
    ``warmup_steps`` <= 0."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def cosine_decay(step: int, warmup_steps: int, decay_steps: int | None, final: float = 0.0) -> float:
    """The warm-up factor, then (when ``decay_steps`` is set) a half cosine from 1 at the warm-up's end to ``final`` at
    optimizer step ``decay_steps`` (held there after it)."""
    factor = warmup(step, warmup_steps)
    if not decay_steps or step < warmup_steps:
        return factor
    span = max(1, int(decay_steps) - max(0, warmup_steps))
    progress = min(1.0, (step - max(0, warmup_steps)) / span)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


def with_warmup(
    optimizer: Optimizer, warmup_steps: int, decay_steps: int | None = None, final: float = 0.0
) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` answer: ``optimizer`` with a per-step linear warm-up (:func:`warmup`) and,
    when ``decay_steps`` is set, a cosine decay to ``final`` x the learning rate at that step (:func:`cosine_decay`)."""
    steps = int(warmup_steps)
    if not 0.0 <= float(final) <= 1.0:
        raise ValueError(
            f"stage.optim.lr_final={final}: the fraction of the learning rate the decay ends at must be in [0, 1]"
        )
    if decay_steps is not None and int(decay_steps) <= steps:
        logging.getLogger(__name__).warning(
            "lr_decay_steps=%s does not exceed warmup_steps=%d (a run shorter than its warm-up): no decay",
            decay_steps,
            steps,
        )
        decay_steps = None
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_decay(step, steps, decay_steps, final))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def clip_by_norm(module: Any, optimizer: Optimizer, configured: float | None, override: float | None = None) -> None:
    """Clip ``module``'s (a LightningModule's) gradients to ``override`` (the trainer's value) else ``configured``."""
    clip = configured if override is None else override
    if clip:
        module.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")
