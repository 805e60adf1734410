"""Classifier-free guidance as a wrapper that turns a conditional model into a ``denoise(x, t)`` function."""

from __future__ import annotations

from typing import Callable

import torch

from k3lab.diffusion.samplers import Denoiser

ConditionalModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def guide(cond: torch.Tensor, uncond: torch.Tensor, weight: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598) in Kandinsky 3's form:
    eps = (w + 1) eps_cond - w eps_uncond (w = 0: purely conditional)."""
    return (weight + 1.0) * cond - weight * uncond


def cfg_denoiser(
    model: ConditionalModel, context: torch.Tensor, mask: torch.Tensor, null_context: torch.Tensor, null_mask: torch.Tensor, weight: float = 3.0,
) -> Denoiser:
    """``denoise(x, t)``: one batched model call on [cond; uncond] when ``weight != 0``, else the conditional only.
    ``model(x, t, context, mask) -> eps``; the null context must have the conditional context's length."""
    if weight == 0:
        return lambda x, t: model(x, t, context, mask)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, null_context]), torch.cat([mask, null_mask]))
        cond, uncond = out.chunk(2)
        return guide(cond, uncond, weight)

    return denoise
