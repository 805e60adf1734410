"""Vector quantiser with a straight-through estimator (van den Oord et al. 2017, arXiv 1711.00937)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantizerOutput:
    """``z_q``: quantised latent (straight-through), ``loss``: codebook + beta * commitment, ``indices``: [B, H, W]."""

    z_q: torch.Tensor
    loss: torch.Tensor
    indices: torch.Tensor


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup over the channel dimension of a [B, C, H, W] latent."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25) -> None:
        super().__init__()
        if n_embed <= 0 or embed_dim <= 0:
            raise ValueError(f"VectorQuantizer needs n_embed > 0 and embed_dim > 0, got {n_embed}, {embed_dim}")
        self.n_embed, self.embed_dim, self.beta = n_embed, embed_dim, beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Indices [B, H, W] of the codebook entries nearest (L2) to each latent vector."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
        codes = self.embedding.weight
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)[None]
        return dist.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Latent [B, C, H, W] for code indices [B, H, W]."""
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        indices = self.nearest(z)
        z_q = self.lookup(indices)
        loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z, z_q.detach())
        z_q = z + (z_q - z).detach()  # straight-through: identity gradient to the encoder
        return QuantizerOutput(z_q=z_q, loss=loss, indices=indices)
