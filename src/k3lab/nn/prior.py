"""The Kandinsky 2.2 "diffusion mapping" prior (unCLIP, Ramesh et al. 2022, arXiv 2204.06125), pure torch.

A causal transformer over [text tokens, pooled text, time, noisy image embedding, learned query]; the
prediction (x0: the clean, normalised CLIP image embedding) is read from the query token, the last one.
Text-token pads are masked with -10000 as in the released model; the causal mask is additive -10000 too.
``PriorTransformer()`` with ``kandinsky22`` sizes has exactly 1,026,225,920 parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos, sin] of t * exp(-ln(10000) i / half) (the prior's order and frequencies)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class PriorBlock(nn.Module):
    """Pre-norm self-attention (with biases) and a GELU feed-forward of width 4x."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_attn = nn.LayerNorm(dim)
        self.qkv = nn.ModuleDict({n: nn.Linear(dim, heads * head_dim) for n in ("q", "k", "v")})
        self.out = nn.Linear(heads * head_dim, dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff_in = nn.Linear(dim, 4 * dim)
        self.ff_out = nn.Linear(4 * dim, dim)

    @override
    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.norm_attn(x)
        q, k, v = (self.qkv[name](h).view(b, n, self.heads, -1).transpose(1, 2) for name in ("q", "k", "v"))
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x + self.out(attn.transpose(1, 2).reshape(b, n, -1))
        return x + self.ff_out(F.gelu(self.ff_in(self.norm_ff(x))))


class PriorTransformer(nn.Module):
    """``forward(noisy_image_emb [B, E], t [B], text_tokens [B, L, T], text_pooled [B, T], text_mask [B, L]) -> x0 [B,
    E]``.

    Image embeddings are normalised with the stored ``clip_mean`` / ``clip_std`` (``normalize``/``denormalize``).
    """

    def __init__(
        self,
        embedding_dim: int = 1280,  # CLIP image embedding width
        num_layers: int = 20,
        heads: int = 32,
        head_dim: int = 64,  # width = heads * head_dim (2048)
        num_text_tokens: int = 77,  # text tokens the positional table covers
        text_dim: int | None = None,  # text-encoder width (2.2: the CLIP text width = embedding_dim)
    ) -> None:
        super().__init__()
        width = heads * head_dim
        text_dim = text_dim or embedding_dim
        self.embedding_dim, self.text_dim, self.num_text_tokens = embedding_dim, text_dim, num_text_tokens
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.image_in = nn.Linear(embedding_dim, width)
        self.pooled_in = nn.Linear(text_dim, width)
        self.tokens_in = nn.Linear(text_dim, width)
        self.positions = nn.Parameter(torch.zeros(1, num_text_tokens + 4, width))
        self.query = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList([PriorBlock(width, heads, head_dim) for _ in range(num_layers)])
        self.norm_out = nn.LayerNorm(width)
        self.image_out = nn.Linear(width, embedding_dim)
        self.clip_mean = nn.Parameter(torch.zeros(1, embedding_dim), requires_grad=False)
        self.clip_std = nn.Parameter(torch.ones(1, embedding_dim), requires_grad=False)

    def normalize(self, emb: torch.Tensor) -> torch.Tensor:
        """CLIP embedding to the prior's normalised units (per-dimension mean and std of the training set)."""
        return (emb - self.clip_mean) / self.clip_std

    def denormalize(self, emb: torch.Tensor) -> torch.Tensor:
        """The prior's normalised units back to the CLIP's own scale."""
        return emb * self.clip_std + self.clip_mean

    @override
    def forward(
        self,
        noisy: torch.Tensor,
        t: torch.Tensor,
        text_tokens: torch.Tensor,
        text_pooled: torch.Tensor,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, length = noisy.shape[0], text_tokens.shape[1]
        if length > self.num_text_tokens:
            raise ValueError(f"{length} text tokens, but the prior's positional table covers {self.num_text_tokens}")
        if t.ndim == 0:
            t = t.expand(b)
        width = self.query.shape[-1]
        time = self.time_mlp(timestep_embedding(t, width).to(noisy.dtype))
        x = torch.cat(
            [
                self.tokens_in(text_tokens),
                self.pooled_in(text_pooled)[:, None],
                time[:, None],
                self.image_in(noisy)[:, None],
                self.query.expand(b, -1, -1),
            ],
            dim=1,
        )
        n = x.shape[1]
        positions = self.positions[:, : self.num_text_tokens + 4]
        if n < positions.shape[1]:  # fewer text tokens than the table: the extra tokens keep their own rows
            positions = torch.cat([positions[:, :length], positions[:, self.num_text_tokens :]], dim=1)
        x = x + positions.to(x.dtype)
        bias = torch.full((n, n), -10000.0, device=x.device, dtype=x.dtype).triu(1)[None].expand(b, n, n)
        if text_mask is not None:
            pad = torch.zeros(b, n, device=x.device, dtype=x.dtype)
            pad[:, :length] = (1 - text_mask.to(x.dtype)) * -10000.0
            bias = bias + pad[:, None, :]
        bias = bias[:, None]
        for block in self.blocks:
            x = block(x, bias)
        return self.image_out(self.norm_out(x)[:, -1])
