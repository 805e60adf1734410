"""Reading weights safely, with nothing but torch and safetensors (``k3lab.nn`` may use it): safetensors or
``torch.load(weights_only=True)``, never plain pickle."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing pieces, truncated, or not a checkpoint at all."""


def load_state_dict(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, a plain state dict, or a Lightning ``.ckpt`` (its ``state_dict``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: truncated or not a safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(
            f"{path}: cannot be read with torch.load(weights_only=True): truncated, corrupt, or a foreign "
            f"pickle that would need arbitrary code ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from e
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors (found {type(obj).__name__})")
    return dict(obj)
