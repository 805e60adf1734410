"""Bias-free multi-head attention (Kandinsky 3): no positional encoding, boolean key mask, SDPA kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override


class Attention(nn.Module):
    """Queries from ``x`` [B, N, in_dim], keys/values from ``context`` [B, M, context_dim]; heads of ``head_dim``.

    ``mask`` [B, M] (True = attend) hides keys. Output width ``out_dim`` (Kandinsky 3's attention pooling
    maps 4096 -> 1536 this way).
    """

    def __init__(self, in_dim: int, out_dim: int, context_dim: int, head_dim: int = 64) -> None:
        super().__init__()
        if out_dim % head_dim:
            raise ValueError(f"attention width {out_dim} is not a multiple of head_dim={head_dim}")
        self.num_heads = out_dim // head_dim
        self.to_query = nn.Linear(in_dim, out_dim, bias=False)
        self.to_key = nn.Linear(context_dim, out_dim, bias=False)
        self.to_value = nn.Linear(context_dim, out_dim, bias=False)
        self.output_layer = nn.Linear(out_dim, out_dim, bias=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, -1).transpose(1, 2)

    @override
    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._heads(self.to_query(x)), self._heads(self.to_key(context)), self._heads(self.to_value(context))
        bias = None
        # additive, as the official masked_fill(-max): a fully masked row attends uniformly, never NaN
        if mask is not None:
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~mask.bool(), -torch.finfo(q.dtype).max
            )[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale head_dim ** -0.5
        b, _, n, _ = out.shape
        return self.output_layer(out.transpose(1, 2).reshape(b, n, -1))


class AttentionPooling(nn.Module):
    """Pools the text into the time embedding: query = mean over ALL context tokens (pads included, as in
    the official model), keys masked; the result is added to ``time_embed``."""

    def __init__(self, time_dim: int, context_dim: int, head_dim: int = 64) -> None:
        super().__init__()
        self.attention = Attention(context_dim, time_dim, context_dim, head_dim)

    @override
    def forward(
        self, time_embed: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        pooled = self.attention(context.mean(dim=1, keepdim=True), context, mask)
        return time_embed + pooled.squeeze(1)
