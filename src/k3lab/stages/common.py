"""What every stage shares, as plain functions: the optimizer factory type, the linear warm-up schedule and
gradient clipping by norm."""

from __future__ import annotations

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


def with_warmup(optimizer: Optimizer, warmup_steps: int) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` answer: ``optimizer`` with a per-step linear warm-up (:func:`warmup`)."""
    steps = int(warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup(step, steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def clip_by_norm(module: Any, optimizer: Optimizer, configured: float | None, override: float | None = None) -> None:
    """Clip ``module``'s (a LightningModule's) gradients to ``override`` (the trainer's value) else ``configured``."""
    clip = configured if override is None else override
    if clip:
        module.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")
