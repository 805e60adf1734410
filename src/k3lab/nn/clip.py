"""The CLIP a Kandinsky-2.2-style mapping prior conditions on (open_clip): a pretrained model from a local file,
or, for the embedded default, a small CLIP trained on the dataset's training split by ``stage=clip``.

It is deliberately NOT the evaluation package's reference CLIP (other name, architecture, seed and weights
file): a model scored in the embedding space it was trained on would get an unfair advantage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

NAME = "k3lab-prior-clip"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class Clip(nn.Module):
    """An open_clip CLIP with k3lab's calling convention: images in [-1, 1], captions as strings; embeddings are
    the unnormalised projections (what unCLIP priors predict)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: nn.Module, context_length: int, image_size: int, name: str) -> None:
        super().__init__()
        # an open_clip CLIP or CustomTextCLIP (open_clip types neither's members as a shared interface)
        self.model: Any = model
        self.context_length, self.image_size, self.name = context_length, image_size, name
        self.embed_dim = (
            int(self.model.text_projection.shape[1])
            if hasattr(model, "text_projection")
            else int(self.model.visual.output_dim)
        )
        self.register_buffer("mean", torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_STD).view(1, 3, 1, 1), persistent=False)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings of images in [-1, 1] (resized and normalised as the CLIP expects)."""
        x = (images.float() + 1) / 2
        if x.shape[-1] != self.image_size:
            x = nn.functional.interpolate(
                x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False, antialias=True
            )
        return self.model.encode_image((x - self.mean) / self.std)

    def embed_zero_image(self) -> torch.Tensor:
        """The embedding of an all-zero image in CLIP's normalised input space: Kandinsky 2.2's negative."""
        return self.model.encode_image(torch.zeros(1, 3, self.image_size, self.image_size, device=self.mean.device))

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP text embeddings of ``texts``."""
        import open_clip

        tokens = open_clip.tokenize(list(texts), context_length=self.context_length).to(self.mean.device)
        return self.model.encode_text(tokens)

    def forward(self, images: torch.Tensor, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """L2-normalised image and text features and the logit scale (for the contrastive loss)."""
        img = nn.functional.normalize(self.embed_images(images), dim=-1)
        txt = nn.functional.normalize(self.embed_texts(texts), dim=-1)
        return img, txt, self.model.logit_scale.exp()


def small_clip(
    embed_dim: int = 96,
    image_size: int = 64,
    vision_layers: int = 3,
    vision_width: int = 96,
    patch_size: int = 8,
    text_layers: int = 3,
    text_width: int = 96,
    context_length: int = 32,
    seed: int = 1,
) -> Clip:
    """The embedded default's conditioning CLIP (untrained until ``stage=clip`` trains it): a ViT and a text
    transformer of 3 layers x 96, 96-d embeddings; other sizes and seed than the evaluation's reference CLIP."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    with torch.random.fork_rng(devices=[]):  # seeded, without moving the caller's global random stream
        torch.manual_seed(seed)
        model = open_clip.CLIP(
            embed_dim=embed_dim,
            vision_cfg=CLIPVisionCfg(
                image_size=image_size, layers=vision_layers, width=vision_width, head_width=32, patch_size=patch_size
            ),
            text_cfg=CLIPTextCfg(
                context_length=context_length, vocab_size=49408, width=text_width, heads=4, layers=text_layers
            ),
        )
    return Clip(model, context_length, image_size, NAME)


def pretrained_clip(name: str, weights: str, image_size: int = 224) -> Clip:
    """An open_clip architecture with weights from a local file (nothing is downloaded)."""
    import open_clip

    if not Path(weights).is_file():
        raise FileNotFoundError(
            f"CLIP weights file not found: looked for {weights} (model.clip.weights; download it once, e.g. "
            f"open_clip's {name} checkpoint)"
        )
    model = open_clip.create_model(name, pretrained=weights)
    return Clip(model, int(getattr(model, "context_length", 77)), image_size, name)
