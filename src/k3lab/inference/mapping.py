"""The mapping prior at inference: text-encoder states -> sampled CLIP image embeddings (Kandinsky 2.2 style)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from k3lab.diffusion import Schedule, cfg_denoiser, get_sampler, to_epsilon
from k3lab.diffusion.settings import DEFAULT_SAMPLING
from k3lab.nn.prior import PriorTransformer


def text_for_prior(
    hidden: torch.Tensor, mask: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [B, <=num_tokens, D] with pads zeroed, pooled [B, D] = mean of the real tokens, mask)."""
    hidden, mask = hidden[:, :num_tokens], mask[:, :num_tokens].bool()
    tokens = hidden * mask[..., None]
    pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    return tokens, pooled, mask


def null_text(
    tokens: torch.Tensor, pooled: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prior's unconditional input: no text at all (zero tokens, every one masked, zero pooled state)."""
    return torch.zeros_like(tokens), torch.zeros_like(pooled), torch.zeros_like(mask)


@dataclass
class PriorMapping:
    """Samples normalised embeddings with the prior, returns them denormalised (the CLIP's own scale)."""

    prior: PriorTransformer
    schedule: Schedule
    steps: int = DEFAULT_SAMPLING.prior_steps
    guidance_weight: float = (
        DEFAULT_SAMPLING.prior_guidance
    )  # Kandinsky 3 form: (w+1) c - w u; 2.2's "guidance 4" is w = 3
    clip_range: float = 10.0  # x0 clipped to +-10 in normalised units, as 2.2's scheduler
    sampler: str = DEFAULT_SAMPLING.sampler

    @torch.no_grad()
    def sample(self, hidden: torch.Tensor, mask: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """CLIP image embeddings sampled by the prior from text states; sample i starts from ``seeds[i]``."""
        tokens, pooled, m = text_for_prior(hidden, mask, self.prior.num_text_tokens)
        device = tokens.device

        def model(
            x: torch.Tensor, t: torch.Tensor, tok: torch.Tensor, pool: torch.Tensor, msk: torch.Tensor
        ) -> torch.Tensor:
            x0 = self.prior(x, t, tok, pool, msk).clamp(-self.clip_range, self.clip_range)
            return to_epsilon("x0", x0, x, self.schedule.alpha_bar(t, x))

        noise = torch.stack(
            [
                torch.randn(self.prior.embedding_dim, generator=torch.Generator().manual_seed(int(s) + 7919))
                for s in seeds
            ]
        ).to(device)
        denoise = cfg_denoiser(model, (tokens, pooled, m), null_text(tokens, pooled, m), self.guidance_weight)
        gen = torch.Generator(device=device).manual_seed(int(seeds[0]) + 7919) if len(seeds) else None
        z = get_sampler(self.sampler)(denoise, noise, self.schedule, self.steps, generator=gen, x0_threshold=None)
        return self.prior.denormalize(z)


@torch.no_grad()
def evaluate_prior(
    checkpoint: str,
    splits: Sequence[str] = ("test", "heldout"),
    steps: int = DEFAULT_SAMPLING.prior_steps,
    guidance_weight: float = DEFAULT_SAMPLING.prior_guidance,
    batch_size: int = 128,
) -> dict[str, dict[str, float]]:
    """Cosine similarity of prior samples to the true CLIP image embeddings per split, next to two baselines:
    the dataset-mean embedding, and the true embedding of another image of the same split (shuffled pairs)."""
    from hydra.utils import instantiate

    from k3lab.io.checkpoint import check_stage, load_frozen

    cfg = check_stage(checkpoint, "prior")
    prior = load_frozen(checkpoint, "prior", "prior")
    if not isinstance(prior, PriorTransformer):
        raise TypeError(f"{checkpoint}: model.prior is a {type(prior).__name__}, not a PriorTransformer")
    clip, encoder = instantiate(cfg.mapping.clip), instantiate(cfg.model.text_encoder.encoder)
    mapping = PriorMapping(
        prior, Schedule.named(str(cfg.stage.schedule), int(cfg.stage.num_timesteps)), steps, guidance_weight
    )
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup()
    out: dict[str, dict[str, float]] = {}
    for split in splits:
        sampled, true = [], []
        for batch in datamodule.split_dataloader(split, batch_size):
            hidden, mask = encoder.encode(batch["caption"])
            sampled.append(mapping.sample(hidden, mask, list(range(len(batch["caption"])))))
            true.append(clip.embed_images(batch["image"]).float())
        s, t = torch.cat(sampled), torch.cat(true)
        cos = nn.functional.cosine_similarity
        shuffled = t[torch.randperm(len(t), generator=torch.Generator().manual_seed(0))]
        out[split] = {
            "cosine": cos(s, t, dim=-1).mean().item(),
            "mean_embedding_baseline": cos(prior.clip_mean.expand_as(t), t, dim=-1).mean().item(),
            "other_image_baseline": cos(shuffled, t, dim=-1).mean().item(),
            "num": len(t),
        }
    return out
