"""The mapping prior at inference: text-encoder states -> sampled CLIP image embeddings (Kandinsky 2.2 style)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from k3lab.diffusion import Schedule, cfg_denoiser, get_sampler, to_epsilon


def text_for_prior(hidden: torch.Tensor, mask: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [B, <=num_tokens, D] with pads zeroed, pooled [B, D] = mean of the real tokens, mask)."""
    hidden, mask = hidden[:, :num_tokens], mask[:, :num_tokens].bool()
    tokens = hidden * mask[..., None]
    pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    return tokens, pooled, mask


def null_text(tokens: torch.Tensor, pooled: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prior's unconditional input: no text at all (zero tokens, every one masked, zero pooled state)."""
    return torch.zeros_like(tokens), torch.zeros_like(pooled), torch.zeros_like(mask)


@dataclass
class PriorMapping:
    """Samples normalised embeddings with the prior, returns them denormalised (the CLIP's own scale)."""

    prior: nn.Module
    schedule: Schedule
    steps: int = 25
    guidance_weight: float = 3.0     # Kandinsky 3 form: (w+1) c - w u; 2.2's "guidance 4" is w = 3
    clip_range: float = 10.0         # x0 clipped to +-10 in normalised units, as 2.2's scheduler
    sampler: str = "kandinsky3"

    @torch.no_grad()
    def sample(self, hidden: torch.Tensor, mask: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        tokens, pooled, m = text_for_prior(hidden, mask, self.prior.num_text_tokens)
        device = tokens.device

        def model(x: torch.Tensor, t: torch.Tensor, tok: torch.Tensor, pool: torch.Tensor, msk: torch.Tensor) -> torch.Tensor:
            x0 = self.prior(x, t, tok, pool, msk).clamp(-self.clip_range, self.clip_range)
            return to_epsilon("x0", x0, x, self.schedule.alpha_bar(t, x))

        noise = torch.stack([torch.randn(self.prior.embedding_dim, generator=torch.Generator().manual_seed(int(s) + 7919)) for s in seeds]).to(device)
        denoise = cfg_denoiser(model, (tokens, pooled, m), null_text(tokens, pooled, m), self.guidance_weight)
        gen = torch.Generator(device=device).manual_seed(int(seeds[0]) + 7919) if len(seeds) else None
        z = get_sampler(self.sampler)(denoise, noise, self.schedule, self.steps, generator=gen, x0_threshold=None)
        return self.prior.denormalize(z)
