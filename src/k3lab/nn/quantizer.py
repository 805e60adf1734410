"""Vector quantiser with a straight-through estimator (van den Oord et al. 2017, arXiv 1711.00937).

Optional dead-code restarts (Dhariwal et al. 2020, Jukebox, arXiv 2005.00341): codes whose usage
falls far below their fair share are re-seeded with encoder outputs of the current batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override


@dataclass
class QuantizerOutput:
    """``z_q``: quantised latent (straight-through), ``loss``: codebook + beta * commitment, ``indices``: [B, H, W]."""

    z_q: torch.Tensor
    loss: torch.Tensor
    indices: torch.Tensor


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup over the channel dimension of a [B, C, H, W] latent."""

    usage: torch.Tensor
    calls: torch.Tensor

    def __init__(
        self,
        n_embed: int,
        embed_dim: int,
        beta: float = 0.25,
        restart_dead_codes: bool = False,  # re-seed rarely used codes while training
        usage_decay: float = 0.9,  # EMA decay of each code's share of assignments
        dead_fraction: float = 0.1,  # dead: usage below this fraction of the fair share 1 / n_embed
        restart_every: int = 10,  # training forwards between restart checks
    ) -> None:
        super().__init__()
        if n_embed <= 0 or embed_dim <= 0:
            raise ValueError(f"VectorQuantizer needs n_embed > 0 and embed_dim > 0, got {n_embed}, {embed_dim}")
        self.n_embed, self.embed_dim, self.beta = n_embed, embed_dim, beta
        self.restart_dead_codes, self.usage_decay = restart_dead_codes, usage_decay
        self.dead_fraction, self.restart_every = dead_fraction, restart_every
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)
        # Not persistent: checkpoints keep the exact MoVQ key set; after a resume usage restarts at the fair share.
        self.register_buffer("usage", torch.full((n_embed,), 1.0 / n_embed), persistent=False)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long), persistent=False)
        self.restarts = 0

    @torch.no_grad()
    def _restart(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        counts = torch.bincount(indices.flatten(), minlength=self.n_embed).to(self.usage.dtype)
        self.usage.mul_(self.usage_decay).add_(counts / counts.sum(), alpha=1 - self.usage_decay)
        self.calls += 1
        if int(self.calls) % self.restart_every:
            return
        dead = self.usage < self.dead_fraction / self.n_embed
        n_dead = int(dead.sum())
        if n_dead:
            pick = torch.randint(flat.shape[0], (n_dead,), device=flat.device)
            self.embedding.weight.data[dead] = flat[pick].to(self.embedding.weight.dtype)
            self.usage[dead] = 1.0 / self.n_embed
            self.restarts += n_dead
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(self.embedding.weight.data, src=0)  # every rank keeps rank 0's codebook
            torch.distributed.broadcast(self.usage, src=0)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Indices [B, H, W] of the codebook entries nearest (L2) to each latent vector."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
        codes = self.embedding.weight
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)[None]
        return dist.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Latent [B, C, H, W] for code indices [B, H, W]."""
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()

    @override
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        indices = self.nearest(z)
        if self.restart_dead_codes and self.training and torch.is_grad_enabled():
            self._restart(z.detach().permute(0, 2, 3, 1).reshape(-1, self.embed_dim), indices)
        z_q = self.lookup(indices)
        loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z, z_q.detach())
        z_q = z + (z_q - z).detach()  # straight-through: identity gradient to the encoder
        return QuantizerOutput(z_q=z_q, loss=loss, indices=indices)
