"""Image tensors <-> the uint8 arrays files and metrics use (one conversion, everywhere)."""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float images in [0, 1], ``[3, H, W]`` or ``[B, 3, H, W]`` -> uint8 ``[H, W, 3]`` / ``[B, H, W, 3]`` (clamped,
    rounded to the nearest level)."""
    x = images.detach().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return x.permute(*range(x.ndim - 3), -2, -1, -3).numpy()
