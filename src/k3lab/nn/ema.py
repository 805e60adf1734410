"""Exponential moving average of a module's weights (with the usual warm-up of the decay)."""

from __future__ import annotations

import copy
from typing import Generic, TypeVar

import torch
from torch import nn
from typing_extensions import override

M = TypeVar("M", bound=nn.Module)


class EMA(nn.Module, Generic[M]):
    """Holds a frozen copy of ``model``; ``update`` blends it toward the live weights.

    The effective decay is ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so short runs
    are not dominated by the initial weights.
    """

    num_updates: torch.Tensor

    def __init__(self, model: M, decay: float = 0.9999) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module: M = copy.deepcopy(model).eval().requires_grad_(False)
        # frozen weights (a LoRA fine-tune's base) never change: the average shares them instead of copying them
        for name, live in model.named_parameters():
            if not live.requires_grad:
                owner, _, leaf = name.rpartition(".")
                setattr(self.module.get_submodule(owner) if owner else self.module, leaf, live)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s weights (decay warmed up as min(decay, (1 + n) / (10 + n)))."""
        self.num_updates += 1
        n = float(self.num_updates)
        decay = min(self.decay, (1.0 + n) / (10.0 + n))
        averaged, live = list(self.module.parameters()), list(model.parameters())
        if len(averaged) != len(live):
            raise ValueError(f"EMA.update: the model has {len(live)} parameters, its average {len(averaged)}")
        trained = [(a, p.detach()) for a, p in zip(averaged, live, strict=True) if p.requires_grad]
        if trained:  # one multi-tensor kernel per dtype/device group instead of a Python loop over small tensors
            torch._foreach_lerp_([a for a, _ in trained], [p for _, p in trained], 1.0 - decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)

    @override
    def train(self, mode: bool = True) -> "EMA":  # the averaged copy always stays in eval mode
        super().train(mode)
        self.module.eval()
        return self
