"""Sharded checkpoints (``trainer=fsdp``, ``state_dict_type: sharded``) -> one Lightning ``.ckpt``.

Lightning's FSDP strategy writes a checkpoint as a folder: ``torch.distributed.checkpoint`` shards of
``{"model": state_dict, "optimizer_<i>": ...}`` from every rank plus ``meta.pt`` (step, loops, callbacks) from rank
0. ``consolidate`` reads the shards on one CPU process and writes the single-file checkpoint Lightning itself would
have written with ``state_dict_type: full``, so ``python -m k3lab.sample``, ``k3lab.convert to-diffusers`` and
``ckpt_path=`` read it like any other. Everything is read with ``weights_only=True``.
"""

from __future__ import annotations

import io
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from k3lab.io.checkpoint import CheckpointError, atomic_write_bytes

log = logging.getLogger(__name__)

META_FILE = "meta.pt"  # Lightning's extra file beside the shards (lightning.fabric.utilities.load._METADATA_FILENAME)


def is_sharded(path: str | Path) -> bool:
    """A folder holding a ``torch.distributed.checkpoint`` (its ``.metadata`` file)."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def read_sharded(folder: str | Path) -> dict[str, Any]:
    """The full checkpoint of a sharded folder, in Lightning's single-file layout (``state_dict``,
    ``optimizer_states``, then ``meta.pt``'s entries)."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"no such sharded checkpoint: {folder}")
    if not is_sharded(folder):
        raise CheckpointError(
            f"{folder}: not a sharded checkpoint (no .metadata: give the folder trainer=fsdp wrote, e.g. "
            "checkpoints/last.ckpt/)"
        )
    state: dict[str, Any] = {}
    try:
        _load_state_dict(
            state, storage_reader=FileSystemReader(folder), planner=_EmptyStateDictLoadPlanner(), no_dist=True
        )
    except (CheckpointException, RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
        # (CheckpointException wraps each rank's traceback: its last line names the cause)
        cause = [line for line in str(e).strip().splitlines() if line.strip()][-1:] or [type(e).__name__]
        raise CheckpointError(
            f"{folder}: its shards cannot be read (a missing or truncated shard file?): {cause[0].strip()[:300]}"
        ) from None
    if "model" not in state:
        raise CheckpointError(f"{folder}: the shards hold no 'model' entry (found {sorted(state)[:5]})")
    ckpt: dict[str, Any] = {"state_dict": state.pop("model")}
    optimizers = sorted((k for k in state if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    if optimizers:
        ckpt["optimizer_states"] = [state.pop(k) for k in optimizers]
    meta = folder / META_FILE
    if meta.is_file():
        try:
            ckpt.update(torch.load(meta, map_location="cpu", weights_only=True))
        except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
            raise CheckpointError(
                f"{meta}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: {e})"
            ) from e
    else:
        log.warning("%s: no %s (written by rank 0): the step and loop state are missing", folder, META_FILE)
    ckpt.update(state)  # anything else the strategy saved
    return ckpt


def consolidate(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write ``folder``'s full checkpoint to ``out`` (default: ``<folder>.consolidated.ckpt`` beside it, so it sits
    in the run's checkpoints folder with its ``config.yaml``); never overwrites."""
    folder = Path(folder)
    target = (
        Path(out) if out is not None else folder.with_name(folder.name.removesuffix(".ckpt") + ".consolidated.ckpt")
    )
    if target.exists():
        raise FileExistsError(f"{target} exists: give another --out or move it first")
    ckpt = read_sharded(folder)
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    atomic_write_bytes(target, buffer.getvalue())
    tensors = sum(v.numel() for v in ckpt["state_dict"].values() if isinstance(v, torch.Tensor))
    log.info("consolidated %s (%d tensors, %.1fM values) -> %s", folder, len(ckpt["state_dict"]), tensors / 1e6, target)
    return target
