"""``python -m k3lab.convert merge-lora <run> --out <folder>``: a LoRA run's adapter folded into its base U-Net,
written as a normal k3lab export (the base folder's files, the merged ``unet.safetensors``), which ``k3lab.sample``,
``stage.init_weights`` and ``convert to-diffusers`` read like any other."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from hydra.utils import instantiate

from k3lab.inference.loading import apply_lora, lora_base
from k3lab.io.checkpoint import check_stage, export_model, load_state_dict, load_weights
from k3lab.nn.lora import merge_lora

log = logging.getLogger(__name__)


def merge_lora_export(run: Path, out: Path, base: str | Path | None = None, scale: float = 1.0) -> Path:
    """Copy the base export into ``out`` and replace its U-Net by the base with the adapter merged at ``scale``."""
    base_dir = Path(base) if base is not None else Path(lora_base(run))
    if base_dir.is_file():
        base_dir = base_dir.parent
    unet_file = base_dir / "unet.safetensors"
    if not unet_file.is_file():
        raise FileNotFoundError(f"{base_dir}: no unet.safetensors (give the base export the adapter was trained on)")
    out = out.resolve()
    if out == base_dir.resolve():
        raise FileExistsError(f"--out {out} is the base folder: merging would overwrite the base")
    cfg = check_stage(unet_file, "diffusion")
    unet = instantiate(cfg.model.unet)
    load_weights(unet, load_state_dict(unet_file), unet_file)
    apply_lora(unet, run, scale)
    merge_lora(unet, scale)
    out.mkdir(parents=True, exist_ok=True)
    for item in base_dir.iterdir():
        if item.name == "unet.safetensors" or item.suffix == ".ckpt" or item.name.startswith("lora."):
            continue
        target = out / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target)
    export_model(unet, out / "unet.safetensors")
    log.info("merged the LoRA adapter %s (scale %s) into %s", run, scale, base_dir)
    return out
