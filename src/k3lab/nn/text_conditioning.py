"""Kandinsky 3's text conditioning: projection, pad zeroing, cropping, and the learned null embedding.

The official order: Linear(no bias) -> LayerNorm, THEN zero the padded positions, then crop context and
mask to ``max(mask.sum()) + 1`` tokens (one masked pad kept). The unconditional branch is the learned
``null_embedding`` at token 0 (mask 1), every other token zero and masked. ``diffusers_compat=True``
reproduces diffusers' pipeline instead: pads zeroed BEFORE the projection (so they carry the LayerNorm bias
into the pooling mean), and an unconditional branch of projected zeros (= the LayerNorm bias) with every
token masked.
"""

from __future__ import annotations

import torch
from torch import nn
from typing_extensions import override


class TextConditioning(nn.Module):
    """``forward(hidden, mask) -> (context, mask)`` plus the null context for guidance and caption dropout."""

    def __init__(self, encoder_dim: int, context_dim: int, diffusers_compat: bool = False) -> None:
        super().__init__()
        self.projection = nn.Sequential(nn.Linear(encoder_dim, context_dim, bias=False), nn.LayerNorm(context_dim))
        self.null_embedding = nn.Parameter(torch.randn(context_dim))
        self.encoder_dim, self.context_dim = encoder_dim, context_dim
        self.diffusers_compat = diffusers_compat

    @override
    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hidden.shape[-1] != self.encoder_dim:
            raise ValueError(
                f"text embedding width {hidden.shape[-1]} does not match the projection's "
                f"encoder_dim={self.encoder_dim}"
            )
        mask = mask.bool()
        if self.diffusers_compat:
            context = self.projection(hidden * mask[..., None])
        else:
            context = self.projection(hidden) * mask[..., None]
        keep = min(int(mask.sum(dim=1).max()) + 1, mask.shape[1])
        return context[:, :keep], mask[:, :keep]

    def null(self, context: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional context with the shape of ``context``."""
        null_mask = torch.zeros_like(mask, dtype=torch.bool)
        if self.diffusers_compat:
            return self.projection(
                torch.zeros(*context.shape[:2], self.encoder_dim, dtype=context.dtype, device=context.device)
            ), null_mask
        null_context = torch.zeros_like(context)
        null_context[:, 0] = self.null_embedding.to(context.dtype)
        null_mask[:, 0] = True
        return null_context, null_mask

    def replace_with_null(
        self, context: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows where ``rows`` [B] is True become unconditional (caption dropout, empty prompts)."""
        if not bool(rows.any()):
            return context, mask
        null_context, null_mask = self.null(context, mask)
        r = rows.to(context.device)
        return torch.where(r[:, None, None], null_context, context), torch.where(r[:, None], null_mask, mask.bool())
