"""CLIP score (Hessel et al. 2021, arXiv 2104.08718) in its per-image form: the mean over images of
100 * max(cos(image, text), 0), with an open_clip model loaded from local files only. torchmetrics' ``CLIPScore``
(1.9) clamps the mean instead, 100 * max(mean cos, 0): the two differ whenever a cosine is negative.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, cast

import numpy as np
import torch


@dataclass
class ClipModel:
    """An open_clip model with its image transform and tokenizer; ``name`` says which weights it is."""

    model: Any  # an open_clip model (CLIP or CustomTextCLIP: no shared typed interface)
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    name: str

    @torch.no_grad()
    def embed_images(self, images: Sequence[np.ndarray], batch_size: int = 64) -> torch.Tensor:
        """Unit-norm CLIP embeddings of RGB uint8 images, in batches."""
        from PIL import Image

        out = []
        for i in range(0, len(images), batch_size):
            x = torch.stack([self.preprocess(Image.fromarray(img)) for img in images[i : i + batch_size]])
            out.append(torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Unit-norm CLIP embeddings of texts, in batches."""
        out = [
            torch.nn.functional.normalize(
                self.model.encode_text(self.tokenizer(list(texts[i : i + batch_size]))).float(), dim=-1
            )
            for i in range(0, len(texts), batch_size)
        ]
        return torch.cat(out)


def load_clip(model_name: str, weights: str | Path, config: str | Path | None = None) -> ClipModel:
    """An open_clip model from a local weights file; ``config`` registers a custom model JSON first.

    Raises FileNotFoundError naming the path when the weights (or config) are missing: nothing is downloaded.
    """
    import open_clip

    weights = Path(weights)
    if config is not None:
        config = Path(config)
        if not config.is_file():
            raise FileNotFoundError(f"open_clip model config not found: {config}")
        open_clip.add_model_config(config)  # registers the JSON's model under its file stem
        model_name = config.stem
    if not weights.is_file():
        raise FileNotFoundError(
            f"CLIP weights for {model_name!r} not found at {weights} (open_clip state dict; nothing is downloaded)"
        )
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(weights))
    tokenizer = open_clip.get_tokenizer(model_name)
    return ClipModel(
        model.eval(),
        cast(Callable[[Any], torch.Tensor], preprocess),
        cast(Callable[[Sequence[str]], torch.Tensor], tokenizer),
        f"open_clip:{model_name}:{weights.name}",
    )


def clip_score(clip: ClipModel, images: Sequence[np.ndarray], prompts: Sequence[str]) -> dict[str, Any]:
    """Mean and per-image CLIP score of image-prompt pairs: ``100 * max(cos, 0)`` per image, then the mean."""
    if len(images) != len(prompts):
        raise ValueError(f"clip_score: {len(images)} images but {len(prompts)} prompts")
    cos = (clip.embed_images(images) * clip.embed_texts(prompts)).sum(-1)
    scores = (100.0 * cos.clamp(min=0)).tolist()
    return {
        "clip_score": float(np.mean(scores)) if scores else float("nan"),
        "per_image": scores,
        "model": clip.name,
        "num_images": len(scores),
    }
