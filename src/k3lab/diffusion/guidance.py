"""Classifier-free guidance as a wrapper that turns a conditional model into a ``denoise(x, t)`` function."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from k3lab.diffusion.samplers import Denoiser
from k3lab.diffusion.settings import DEFAULT_SAMPLING

ConditionalModel = Callable[..., torch.Tensor]  # model(x, t, *condition) -> eps


def guide(cond: torch.Tensor, uncond: torch.Tensor, weight: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598) in Kandinsky 3's form:
    eps = (w + 1) eps_cond - w eps_uncond (w = 0: purely conditional; the usual scale s is w + 1)."""
    return (weight + 1.0) * cond - weight * uncond


def cfg_denoiser(
    model: ConditionalModel,
    condition: Sequence[torch.Tensor],
    null_condition: Sequence[torch.Tensor],
    weight: float = DEFAULT_SAMPLING.guidance,
) -> Denoiser:
    """``denoise(x, t)``: one batched model call on [cond; uncond] when ``weight != 0``, else the conditional only.
    ``model(x, t, *condition) -> eps``; each null tensor must have its conditional tensor's shape (e.g. the null
    text context has the conditional context's length)."""
    if weight == 0:
        return lambda x, t: model(x, t, *condition)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        both = [torch.cat([c, n]) for c, n in zip(condition, null_condition, strict=True)]
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), *both).chunk(2)
        return guide(cond, uncond, weight)

    return denoise
