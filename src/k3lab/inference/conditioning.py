"""Conditioning arms: how a training batch or a prompt becomes the U-Net's condition.

An arm owns the trained conditioning module (``arm.conditioning``, what the optimizer, the EMA and the export see,
saved as ``<arm.export_name>.safetensors``) and the frozen parts it needs. The diffusion stage and the
:class:`~k3lab.inference.generator.Generator` hold one arm and never ask which it is:

- :class:`TextArm`: Kandinsky 3's arm. Text-encoder states -> projection + LayerNorm; the null embedding is the
  unconditional text.
- :class:`PriorArm`: the Kandinsky-2.2-style mapping prior. Training conditions on the frozen CLIP's embedding of the
  batch's images; sampling maps text -> prior -> a sampled image embedding; the adapter turns it into context tokens
  and a time-embedding term; the unconditional condition is the embedding of an all-zero image.

A new arm (inpainting, an image prompt) is one subclass: the four methods below and its ``export_name``.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from typing_extensions import override

from k3lab.diffusion import Schedule
from k3lab.diffusion.settings import DEFAULT_SAMPLING
from k3lab.inference.mapping import PriorMapping
from k3lab.nn.clip import Clip
from k3lab.nn.image_conditioning import ImageConditioning
from k3lab.nn.prior import PriorTransformer
from k3lab.nn.text_conditioning import TextConditioning
from k3lab.nn.text_encoder import TextEncoderModule
from k3lab.nn.unet import KandinskyUNet

log = logging.getLogger(__name__)

Cond = tuple[torch.Tensor, ...]


def text_inputs(batch: Mapping[str, Any], text_encoder: TextEncoderModule | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw encoder states [B, L, D] and mask of a batch: precomputed when it carries them, else encoded now."""
    if "text_embedding" in batch:
        return batch["text_embedding"].float(), batch["text_mask"].bool()
    if text_encoder is None:
        raise RuntimeError("the batch has no precomputed text_embedding and there is no text encoder")
    return text_encoder.encode(batch["caption"])


class ConditioningArm(nn.Module):
    """The interface every arm implements (see the module docstring)."""

    export_name: str = ""

    def __init__(self, conditioning: nn.Module) -> None:
        super().__init__()
        self.conditioning = conditioning

    def condition(
        self, batch: Mapping[str, Any], text_encoder: TextEncoderModule | None, drop: torch.Tensor | None = None
    ) -> Cond:
        """The U-Net's condition for a training/validation batch; rows where ``drop`` is true are unconditional."""
        raise NotImplementedError

    def encode(self, text_encoder: TextEncoderModule, prompts: Sequence[str], seeds: Sequence[int]) -> Cond:
        """The U-Net's condition for prompts at sampling time (seeds drive any sampling inside the arm)."""
        raise NotImplementedError

    def null(self, cond: Cond) -> Cond:
        """The unconditional condition with the shapes of ``cond`` (classifier-free guidance)."""
        raise NotImplementedError

    @property
    def can_sample(self) -> bool:
        """Whether :meth:`encode` works (the prior arm needs its trained prior)."""
        return True

    def with_conditioning(self, conditioning: nn.Module) -> ConditioningArm:
        """The same arm around another copy of the trained module (the EMA copy for sampling and export)."""
        raise NotImplementedError

    def _device(self) -> torch.device:
        return next(self.conditioning.parameters()).device


class TextArm(ConditioningArm):
    """Kandinsky 3: projected text states, the learned null embedding as unconditional text."""

    export_name = "text_conditioning"
    conditioning: TextConditioning

    @override
    def condition(
        self, batch: Mapping[str, Any], text_encoder: TextEncoderModule | None, drop: torch.Tensor | None = None
    ) -> Cond:
        hidden, mask = text_inputs(batch, text_encoder)
        device = self._device()
        context, mask = self.conditioning(hidden.to(device), mask.to(device))
        return (
            self.conditioning.replace_with_null(context, mask, drop.to(device)) if drop is not None else (context, mask)
        )

    def encode(self, text_encoder: TextEncoderModule, prompts: Sequence[str], seeds: Sequence[int]) -> Cond:
        """Empty prompts become the unconditional (null) context, with a warning."""
        empty = torch.tensor([not p.strip() for p in prompts])
        if bool(empty.any()):
            log.warning("%d empty prompt(s): sampled unconditionally (null text embedding)", int(empty.sum()))
        hidden, mask = text_encoder.encode([p.strip() for p in prompts])
        device = self._device()
        context, mask = self.conditioning(hidden.to(device), mask.to(device))
        return self.conditioning.replace_with_null(context, mask, empty.to(device))

    @override
    def null(self, cond: Cond) -> Cond:
        return self.conditioning.null(*cond)

    @override
    def with_conditioning(self, conditioning: nn.Module) -> TextArm:
        if not isinstance(conditioning, TextConditioning):
            raise TypeError(f"the text arm conditions through TextConditioning, not {type(conditioning).__name__}")
        return TextArm(conditioning)


class PriorArm(ConditioningArm):
    """The mapping-prior arm: the frozen CLIP's image embedding (training) or the prior's sample (sampling)."""

    export_name = "image_conditioning"
    conditioning: ImageConditioning

    def __init__(
        self,
        conditioning: ImageConditioning,
        clip: Clip,
        prior: PriorTransformer | None,
        schedule: Schedule,
        prior_steps: int = DEFAULT_SAMPLING.prior_steps,
        prior_guidance: float = DEFAULT_SAMPLING.prior_guidance,
    ) -> None:
        super().__init__(conditioning)
        self.clip = clip.eval().requires_grad_(False)
        self.prior = prior.eval().requires_grad_(False) if prior is not None else None
        self.schedule, self.prior_steps, self.prior_guidance = schedule, prior_steps, prior_guidance

    @override
    def condition(
        self, batch: Mapping[str, Any], text_encoder: TextEncoderModule | None, drop: torch.Tensor | None = None
    ) -> Cond:
        device = self._device()
        if "image_embedding" in batch:  # precomputed (python -m k3lab.precompute precompute.image_embeddings=true)
            emb = batch["image_embedding"].to(device).float()
        else:
            with torch.no_grad():
                emb = self.clip.embed_images(batch["image"].to(device)).float()
        if drop is not None:
            emb = self.conditioning.replace_with_negative(emb, drop.to(device))
        return self.conditioning(emb)

    @property
    @override
    def can_sample(self) -> bool:
        return self.prior is not None

    @override
    def encode(self, text_encoder: TextEncoderModule, prompts: Sequence[str], seeds: Sequence[int]) -> Cond:
        if self.prior is None:
            raise RuntimeError("sampling the mapping-prior arm needs a trained prior (mapping.prior)")
        hidden, mask = text_encoder.encode([p.strip() for p in prompts])
        device = next(self.prior.parameters()).device
        mapping = PriorMapping(self.prior, self.schedule, self.prior_steps, self.prior_guidance)
        emb = mapping.sample(hidden.to(device), mask.to(device), list(seeds)).to(self._device())
        empty = torch.tensor([not p.strip() for p in prompts], device=emb.device)
        if bool(empty.any()):  # as the text arm: an empty prompt is the unconditional embedding (zero image)
            log.warning("%d empty prompt(s): sampled unconditionally (the zero image's embedding)", int(empty.sum()))
        return self.conditioning(self.conditioning.replace_with_negative(emb, empty))

    @override
    def null(self, cond: Cond) -> Cond:
        return self.conditioning(self.conditioning.negative.expand(cond[0].shape[0], -1))

    @override
    def with_conditioning(self, conditioning: nn.Module) -> PriorArm:
        if not isinstance(conditioning, ImageConditioning):
            raise TypeError(f"the prior arm conditions through ImageConditioning, not {type(conditioning).__name__}")
        return PriorArm(conditioning, self.clip, self.prior, self.schedule, self.prior_steps, self.prior_guidance)


def make_arm(
    encoder_dim: int,
    unet: KandinskyUNet,
    schedule: Schedule,
    *,
    diffusers_compat: bool = False,
    clip: Clip | None = None,
    prior: PriorTransformer | None = None,
    image_tokens: int = 10,
    prior_steps: int = DEFAULT_SAMPLING.prior_steps,
    prior_guidance: float = DEFAULT_SAMPLING.prior_guidance,
) -> ConditioningArm:
    """The arm a diffusion run uses, from the stage's settings: the text arm, or the prior arm when a CLIP is given.
    The stage and :func:`~k3lab.inference.loading.load_generator` both build through here."""
    if clip is None:
        return TextArm(TextConditioning(encoder_dim, unet.context_dim, diffusers_compat))
    if prior is not None and int(prior.embedding_dim) != int(clip.embed_dim):
        raise ValueError(
            f"the prior predicts {prior.embedding_dim}-d image embeddings but the CLIP / U-Net adapter use "
            f"{clip.embed_dim}-d ones"
        )
    if prior is not None and int(prior.text_dim) != int(encoder_dim):
        raise ValueError(
            f"the prior reads {prior.text_dim}-d text states but the text encoder gives {encoder_dim}-d ones"
        )
    adapter = ImageConditioning(int(clip.embed_dim), unet.context_dim, unet.time_embed_dim, image_tokens)
    with torch.no_grad():
        adapter.negative.copy_(clip.embed_zero_image().reshape(-1))
    return PriorArm(adapter, clip, prior, schedule, prior_steps, prior_guidance)


def match_lengths(a: Cond, b: Cond) -> tuple[Cond, Cond]:
    """Two conditions made concatenable along the batch: token dimensions (dim 1 of context [B, L, D] and mask
    [B, L]) zero-padded (masked out) to the longer one. Used when a negative prompt replaces the null condition."""
    if len(a) != len(b):
        raise ValueError(f"conditions of {len(a)} and {len(b)} tensors")
    out_a, out_b = [], []
    for x, y in zip(a, b, strict=True):
        if x.ndim >= 2 and y.ndim == x.ndim and x.shape[1] != y.shape[1] and x.shape[2:] == y.shape[2:]:
            n = max(x.shape[1], y.shape[1])
            x, y = (torch.nn.functional.pad(t, (0, 0) * (t.ndim - 2) + (0, n - t.shape[1])) for t in (x, y))
        out_a.append(x)
        out_b.append(y)
    return tuple(out_a), tuple(out_b)
