"""Image tensors <-> the uint8 arrays files and metrics use (one conversion, everywhere)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float images in [0, 1], ``[3, H, W]`` or ``[B, 3, H, W]`` -> uint8 ``[H, W, 3]`` / ``[B, H, W, 3]`` (clamped,
    rounded to the nearest level)."""
    x = images.detach().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return x.permute(*range(x.ndim - 3), -2, -1, -3).numpy()


def load_image(path: str | Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file as [1, 3, H, W] in [-1, 1] (RGB; resized to ``size`` = (H, W) with bicubic when given)."""
    rgb = _open(path, "RGB", size, Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]


def load_mask(path: str | Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A mask file as [1, 1, H, W] of 0/1: white (>= 128 after conversion to grey) marks the region to generate;
    resized to ``size`` = (H, W) by nearest-neighbour when given."""
    grey = _open(path, "L", size, Image.Resampling.NEAREST)
    return torch.from_numpy((np.asarray(grey) >= 128).astype(np.float32))[None, None]


def _open(path: str | Path, mode: str, size: tuple[int, int] | None, resample: Image.Resampling) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such image: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            out = im.convert(mode)
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    if size is not None and out.size != (size[1], size[0]):
        out = out.resize((size[1], size[0]), resample)
    return out
