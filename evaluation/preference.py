"""Preference scorers from local weights: PickScore (Kirstain et al. 2023) and HPSv2 (Wu et al. 2023).

Both are CLIP ViT-H/14 fine-tunes; each is loaded in the layout its authors publish, from local files only:

- **PickScore** (``yuvalkirstain/PickScore_v1``): a transformers ``CLIPModel`` folder (``config.json`` + weights) and
  the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (``preprocessor_config.json`` + tokenizer files; the
  model folder itself when they sit there). Score = ``logit_scale.exp() * cos(image, prompt)``, the embeddings from
  the processor's 224-px resize-and-centre-crop and 77-token padded text (the authors' inference snippet).
- **HPSv2** (``xswu/HPSv2``: ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``): a file holding
  ``{"state_dict": <open_clip ViT-H-14 state dict>}``. Score = ``cos(image, prompt)`` (no temperature), the image
  resized so its longer side is the model's input size and padded with black to a square (``ResizeMaxSize``, the
  ``light_augmentation`` validation transform of the authors' ``hpsv2.score``), OpenAI mean/std, open_clip's tokenizer.

ImageReward is not offered: its package builds BLIP from ``bert-base-uncased`` fetched from the Hugging Face hub, which
cannot be done from one local file. Every scorer records the SHA-256 of its weight files (``weights_sha256``), which
score files carry and ``python -m evaluation compare`` checks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.reference_clip import OPENAI_MEAN, OPENAI_STD

PICKSCORE_DEFINITION = (
    "PickScore (Kirstain et al. 2023): logit_scale.exp() * cos(image, prompt) with the PickScore_v1 CLIP ViT-H/14 "
    "(transformers CLIPModel); image through the CLIP processor (shortest side to the input size, bicubic, centre "
    "crop, OpenAI mean/std), prompt padded/truncated to 77 tokens. Per image; higher is better."
)
HPSV2_DEFINITION = (
    "HPSv2 (Wu et al. 2023): cos(image, prompt) with the HPSv2 open_clip ViT-H/14 (checkpoint['state_dict']); image "
    "resized so its longer side is the input size (bicubic) and padded with black to a square, OpenAI mean/std, "
    "open_clip tokenizer. Per image; higher is better."
)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: Sequence[Path]) -> str:
    """One SHA-256 over several files (name and content hash of each, in name order)."""
    digest = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        digest.update(f"{p.name}:{sha256_file(p)}\n".encode())
    return digest.hexdigest()


@dataclass
class PreferenceScorer:
    """A loaded preference model: ``score(images, prompts)`` gives one float per image-prompt pair."""

    name: str
    definition: str
    weights_sha256: str
    embed: Callable[[Sequence[np.ndarray], Sequence[str]], tuple[torch.Tensor, torch.Tensor]]
    scale: float = 1.0
    batch_size: int = 16

    @torch.no_grad()
    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
        """``scale * cos(image_i, prompt_i)`` per pair, the embeddings unit-normalised."""
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: {len(images)} images but {len(prompts)} prompts")
        out: list[float] = []
        for i in range(0, len(images), self.batch_size):
            img, txt = self.embed(images[i : i + self.batch_size], prompts[i : i + self.batch_size])
            cos = (F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(-1)
            out += (self.scale * cos).tolist()
        return out


def _require_dir(path: Path, what: str, files: Sequence[str]) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: folder not found: {path} (nothing is downloaded)")
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{what}: {path} lacks {missing}")


def load_pickscore(model_dir: str | Path, processor_dir: str | Path | None = None) -> PreferenceScorer:
    """PickScore from a local ``CLIPModel`` folder and a local CLIP processor folder (default: the model folder)."""
    from transformers import AutoProcessor, CLIPModel

    model_dir = Path(model_dir)
    processor_dir = Path(processor_dir) if processor_dir else model_dir
    _require_dir(model_dir, "PickScore model", ["config.json"])
    weights = sorted([*model_dir.glob("*.safetensors"), *model_dir.glob("pytorch_model*.bin")])
    if not weights:
        raise FileNotFoundError(f"PickScore model: {model_dir} has no *.safetensors or pytorch_model*.bin")
    _require_dir(processor_dir, "PickScore processor", [])
    if not any((processor_dir / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        raise FileNotFoundError(f"PickScore processor: {processor_dir} has no preprocessor_config.json")
    model = CLIPModel.from_pretrained(model_dir, local_files_only=True).eval()
    processor: Any = AutoProcessor.from_pretrained(processor_dir, local_files_only=True)

    def embed(images: Sequence[np.ndarray], prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        pixels = processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")
        text = processor(text=list(prompts), padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], **pixels)
        return out.image_embeds, out.text_embeds

    return PreferenceScorer(
        "pickscore", PICKSCORE_DEFINITION, sha256_files(weights), embed, scale=float(model.logit_scale.detach().exp())
    )


def resize_max_pad(image: torch.Tensor, size: int) -> torch.Tensor:
    """HPSv2's validation resize: the longer side to ``size`` (bicubic, antialiased), then black padding centred
    to ``size x size``. ``image``: float [3, H, W] in 0..1."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    height, width = image.shape[1:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        new = [round(height * scale), round(width * scale)]
        image = TF.resize(image, new, InterpolationMode.BICUBIC, antialias=True)
        pad_h, pad_w = size - new[0], size - new[1]
        image = TF.pad(image, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return image


def load_hpsv2(
    checkpoint: str | Path, model_name: str = "ViT-H-14", config: str | Path | None = None
) -> PreferenceScorer:
    """HPSv2 from a local ``HPS_v2*_compressed.pt`` (``{"state_dict": ...}``), loaded with ``weights_only=True``;
    ``config`` registers a custom open_clip model JSON first (tests use tiny ones)."""
    import open_clip

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"HPSv2 checkpoint not found: {checkpoint} (nothing is downloaded)")
    if config is not None:
        if not Path(config).is_file():
            raise FileNotFoundError(f"open_clip model config not found: {config}")
        open_clip.add_model_config(Path(config))
        model_name = Path(config).stem
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ValueError(f"{checkpoint}: not an HPSv2 checkpoint (expected a dict with 'state_dict')")
    model: Any = open_clip.create_model(model_name, pretrained=None)
    model.load_state_dict(state["state_dict"])
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(3, 1, 1)

    def embed(images: Sequence[np.ndarray], prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.stack(
            [
                (resize_max_pad(torch.from_numpy(np.ascontiguousarray(i)).permute(2, 0, 1).float() / 255, size) - mean)
                / std
                for i in images
            ]
        )
        return model.encode_image(pixels), model.encode_text(tokenizer(list(prompts)))

    return PreferenceScorer("hpsv2", HPSV2_DEFINITION, sha256_file(checkpoint), embed)
