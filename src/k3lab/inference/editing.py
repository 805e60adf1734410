"""Editing inputs as functions: the inpainting U-Net's extra channels, paste-back, outpainting canvases and
image-to-image start points. Pure torch; the stage and :class:`~k3lab.inference.generator.Generator` call these.

Conventions (those of the official Kandinsky 3 inpainting pipeline):

- A user's mask (``hole``) is 1 where the image is to be (re)generated and 0 where it is kept.
- The U-Net sees ``keep = 1 - hole``: the masked image is the image with the hole set to 0 (in [-1, 1], i.e. mid
  grey) before the first stage encodes it, and ``keep`` is resized to the latent grid by nearest-neighbour.
- The 9-channel input is ``[x_t (4), keep (1), masked latent (4)]``, in that order.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from k3lab.nn.unet import KandinskyUNet

BLENDS = ("pixel", "latent", "none")
SIDES = ("left", "right", "top", "bottom")


def is_inpainting(unet: KandinskyUNet) -> bool:
    """True for a U-Net that reads ``[x_t, keep, masked latent]``: ``in = 2 * out + 1`` channels."""
    return int(unet.in_channels) == 2 * int(unet.out_channels) + 1


def binarize(hole: torch.Tensor) -> torch.Tensor:
    """A hole mask as 0/1 floats [B, 1, H, W] (values > 0.5 are the hole)."""
    if hole.ndim == 3:
        hole = hole[:, None]
    if hole.ndim != 4 or hole.shape[1] != 1:
        raise ValueError(f"a mask must be [B, 1, H, W] (or [B, H, W]), got {tuple(hole.shape)}")
    return (hole > 0.5).float()


def masked_image(image: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """The image [B, 3, H, W] in [-1, 1] with the hole set to 0 (what the first stage encodes)."""
    return image.masked_fill(binarize(hole).bool().expand_as(image), 0.0)


def latent_keep(hole: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``keep = 1 - hole`` resized to the latent grid ``size`` by nearest-neighbour (the official resize)."""
    return F.interpolate(1.0 - binarize(hole), size=size, mode="nearest")


def inpainting_channels(keep: torch.Tensor, masked_latent: torch.Tensor) -> torch.Tensor:
    """The extra input channels ``[keep (1), masked latent (C)]`` appended after x_t."""
    if keep.shape[-2:] != masked_latent.shape[-2:] or keep.shape[0] != masked_latent.shape[0]:
        raise ValueError(f"keep {tuple(keep.shape)} and masked latent {tuple(masked_latent.shape)} do not match")
    return torch.cat([keep.to(masked_latent.dtype), masked_latent], dim=1)


def unet_input(x: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """x_t with the inpainting channels appended (unchanged when ``extra`` is None)."""
    if extra is None:
        return x
    if extra.shape[0] != x.shape[0]:  # classifier-free guidance batches [cond; uncond] with the same image condition
        if x.shape[0] % extra.shape[0]:
            raise ValueError(f"{x.shape[0]} inputs but {extra.shape[0]} image conditions")
        extra = extra.repeat(x.shape[0] // extra.shape[0], 1, 1, 1)
    return torch.cat([x, extra.to(x.dtype)], dim=1)


def expand_input_channels(state: Mapping[str, torch.Tensor], in_channels: int) -> dict[str, torch.Tensor]:
    """A text-to-image U-Net state made loadable by a U-Net with ``in_channels`` inputs: the input convolution's
    extra input channels are zero (so the inpainting model starts as the text-to-image model)."""
    state = dict(state)
    weight = state.get("in_layer.weight")
    if weight is None:
        raise KeyError("the U-Net state has no in_layer.weight")
    have = int(weight.shape[1])
    if have > in_channels:
        raise ValueError(f"the checkpoint's U-Net reads {have} channels, more than the {in_channels} configured")
    if have < in_channels:
        pad = torch.zeros(weight.shape[0], in_channels - have, *weight.shape[2:], dtype=weight.dtype)
        state["in_layer.weight"] = torch.cat([weight, pad], dim=1)
    return state


def paste_back(original: torch.Tensor, generated: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """``generated`` inside the hole, ``original`` everywhere else (images of one range, [B, 3, H, W])."""
    h = binarize(hole).to(generated.dtype)
    return torch.where(h.bool().expand_as(generated), generated, original.to(generated.dtype))


def parse_outpaint(spec: str) -> dict[str, int]:
    """'left=64,bottom=32' -> {'left': 64, 'right': 0, 'top': 0, 'bottom': 32} (pixels added on each side)."""
    out: dict[str, int] = dict.fromkeys(SIDES, 0)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        side, _, value = part.partition("=")
        side = side.strip().lower()
        if side not in out or not value.strip().isdigit():
            raise ValueError(f"--outpaint {spec!r}: give side=pixels pairs, sides {list(SIDES)}, e.g. left=64,top=32")
        out[side] = int(value)
    if not any(out.values()):
        raise ValueError(f"--outpaint {spec!r}: adds no pixels")
    return out


def outpaint_canvas(image: torch.Tensor, pad: Mapping[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The image [B, 3, H, W] placed on a larger canvas (new pixels 0, i.e. mid grey in [-1, 1]) and the hole mask that
    marks the new border as the region to generate."""
    left, right, top, bottom = (int(pad.get(s, 0)) for s in SIDES)
    if min(left, right, top, bottom) < 0:
        raise ValueError(f"outpainting pads must be >= 0, got {dict(pad)}")
    canvas = F.pad(image, (left, right, top, bottom), value=0.0)
    hole = F.pad(torch.zeros_like(image[:, :1]), (left, right, top, bottom), value=1.0)
    return canvas, hole


def img2img_first_step(steps: int, strength: float) -> int:
    """How many of the sampler's ``steps`` image-to-image skips: strength 1 runs them all from pure noise (text to
    image), strength 0 none (the input's reconstruction); in between it starts from the noised input."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength={strength}: must be in [0, 1]")
    return steps - int(round(steps * strength))
