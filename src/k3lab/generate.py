"""Text-to-image generation from parts (U-Net, text conditioning, text encoder, first stage): used by the
diffusion stage's validation and by ``python -m k3lab.sample``. No LightningModule in here."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from k3lab.diffusion import Schedule, cfg_denoiser, get_sampler, to_epsilon
from k3lab.nn.text_conditioning import TextConditioning

log = logging.getLogger(__name__)


def check_resolution(resolution: int, first_stage: nn.Module, unet: nn.Module) -> int:
    """The latent size for ``resolution``; a clear error when it is not divisible by first-stage x U-Net factors."""
    factor = int(getattr(first_stage, "downsample_factor", 1)) * int(unet.downsample_factor)
    if resolution <= 0 or resolution % factor:
        raise ValueError(
            f"resolution {resolution} is not divisible by {factor} (= first-stage factor {getattr(first_stage, 'downsample_factor', 1)} "
            f"x U-Net factor {unet.downsample_factor}); use e.g. {max(factor, round(resolution / factor) * factor)}"
        )
    return resolution // int(getattr(first_stage, "downsample_factor", 1))


def encode_prompts(text_encoder: nn.Module, conditioning: TextConditioning, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected context and mask; empty prompts become the unconditional (null) context, with a warning."""
    empty = torch.tensor([not p.strip() for p in prompts])
    if bool(empty.any()):
        log.warning("%d empty prompt(s): sampled unconditionally (null text embedding)", int(empty.sum()))
    hidden, mask = text_encoder.encode([p.strip() for p in prompts])
    device = conditioning.null_embedding.device
    context, mask = conditioning(hidden.to(device), mask.to(device))
    return conditioning.replace_with_null(context, mask, empty.to(device))


@dataclass
class Generator:
    """Everything needed to turn prompts into images (all modules in eval mode)."""

    unet: nn.Module
    conditioning: TextConditioning
    text_encoder: nn.Module
    first_stage: nn.Module
    schedule: Schedule
    prediction: str = "epsilon"
    latent_scale: float = 1.0

    def model_fn(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.unet(x, t, context, mask)
        return to_epsilon(self.prediction, out, x, self.schedule.alpha_bar(t, x)) if self.prediction != "epsilon" else out

    @torch.no_grad()
    def __call__(
        self, prompts: Sequence[str], seeds: Sequence[int], resolution: int, sampler: str = "kandinsky3", steps: int = 50,
        guidance_weight: float = 3.0, callback: Callable[[int, int, torch.Tensor], None] | None = None, **sampler_options: object,
    ) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1]; sample i starts from ``torch.Generator().manual_seed(seeds[i])`` noise."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        size = check_resolution(resolution, self.first_stage, self.unet)
        device = next(self.unet.parameters()).device
        context, mask = encode_prompts(self.text_encoder, self.conditioning, prompts)
        null_context, null_mask = self.conditioning.null(context, mask)
        shape = (self.unet.in_channels, size, size)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)
        denoise = cfg_denoiser(self.model_fn, context, mask, null_context, null_mask, guidance_weight)
        gen = torch.Generator(device=device).manual_seed(int(seeds[0]) + 1) if len(seeds) else None
        z = get_sampler(sampler)(denoise, noise, self.schedule, steps, generator=gen, callback=callback, **sampler_options)
        images = self.first_stage.decode(z / self.latent_scale)
        return ((images.float() + 1) / 2).clamp(0, 1)
