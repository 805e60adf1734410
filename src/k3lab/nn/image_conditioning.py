"""Kandinsky 2.2's decoder conditioning: a CLIP image embedding becomes context tokens and a time-embedding term."""

from __future__ import annotations

import torch
from torch import nn
from typing_extensions import override


class ImageConditioning(nn.Module):
    """``forward(emb [B, E]) -> (context [B, n, C], mask [B, n], time_extra [B, T])``: Linear to ``num_tokens``
    tokens + LayerNorm (2.2's image projection), and Linear + LayerNorm added to the U-Net's time embedding
    (2.2's image time embedding). ``negative`` is the unconditional embedding (CLIP of a zero image, as 2.2)."""

    negative: torch.Tensor

    def __init__(self, clip_dim: int, context_dim: int, time_dim: int, num_tokens: int = 10) -> None:
        super().__init__()
        self.clip_dim, self.context_dim, self.num_tokens = clip_dim, context_dim, num_tokens
        self.to_tokens = nn.Linear(clip_dim, num_tokens * context_dim)
        self.token_norm = nn.LayerNorm(context_dim)
        self.to_time = nn.Linear(clip_dim, time_dim)
        self.time_norm = nn.LayerNorm(time_dim)
        self.register_buffer("negative", torch.zeros(clip_dim))

    @override
    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if emb.shape[-1] != self.clip_dim:
            raise ValueError(
                f"image embedding width {emb.shape[-1]} does not match the U-Net adapter's clip_dim={self.clip_dim}"
            )
        tokens = self.token_norm(self.to_tokens(emb).view(emb.shape[0], self.num_tokens, self.context_dim))
        mask = torch.ones(emb.shape[0], self.num_tokens, dtype=torch.bool, device=emb.device)
        return tokens, mask, self.time_norm(self.to_time(emb))

    def replace_with_negative(self, emb: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows where ``rows`` is True become the unconditional embedding (caption dropout)."""
        return torch.where(rows.to(emb.device)[:, None], self.negative.to(emb.dtype).expand_as(emb), emb)
