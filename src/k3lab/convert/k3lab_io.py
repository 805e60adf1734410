"""Writing converted weights as a k3lab checkpoint folder, and a k3lab run as a diffusers pipeline folder."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf, open_dict

from k3lab.convert.formats import (
    OFFICIAL_UNET,
    diffusers_movq_config,
    diffusers_unet_config,
    movq_state_to_diffusers,
    unet_state_to_diffusers,
)
from k3lab.convert.remap import remap
from k3lab.io.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    check_stage,
    export_model,
    load_state_dict,
    load_weights,
    save_config,
)
from k3lab.io.options import plain_dict
from k3lab.io.safetensors_io import LazySafetensors, write_safetensors
from k3lab.nn.first_stage import LatentScale
from k3lab.nn.movq import MoVQ
from k3lab.nn.text_conditioning import TextConditioning
from k3lab.nn.unet import KandinskyUNet
from k3lab.run.config import compose

log = logging.getLogger(__name__)


def _text_encoder_dim(path: str) -> int | None:
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    c = json.loads(config.read_text())
    return int(c.get("d_model") or c.get("hidden_size"))


def write_movq(out: Path, movq: MoVQ, kwargs: dict[str, Any]) -> Path:
    """``out/autoencoder.safetensors`` + a config.yaml of the autoencoder stage, as the autoencoder stage writes
    them."""
    cfg = compose(["model/autoencoder=movq_270m", "stage=autoencoder"], output_dir=out)
    with open_dict(cfg):
        for k, v in kwargs.items():
            cfg.model.autoencoder[k] = list(v) if isinstance(v, tuple) else v
    save_config(cfg, out, {"model/autoencoder": "converted"})
    return export_model(movq, out / "autoencoder.safetensors")


def write_k3lab(
    out: Path,
    unet: KandinskyUNet | Mapping[str, torch.Tensor],
    kwargs: dict[str, Any],
    conditioning: TextConditioning,
    movq_checkpoint: Path | None,
    text_encoder: str | None,
    source: str,
    inpainting: bool = False,
) -> Path:
    """A folder ``python -m k3lab.sample`` and ``stage.init_weights`` read: config.yaml (experiment=kandinsky3 with the
    converted sizes), unet / text_conditioning / latent_scale safetensors. ``unet`` may be a lazy state
    (:func:`~k3lab.convert.formats.read_diffusers_unet`): it is streamed to disk in float32, one tensor at a time."""
    out.mkdir(parents=True, exist_ok=True)
    # an inpainting U-Net (9 input channels) is sampled by the inpainting stage with the official pipeline's 0.95
    # thresholding quantile
    extra = ["stage=inpainting", "sampling.x0_threshold=0.95"] if inpainting else []
    cfg = compose(["experiment=kandinsky3", *extra], output_dir=out)
    with open_dict(cfg):
        for k, v in kwargs.items():
            cfg.model.unet[k] = list(v) if isinstance(v, tuple) else v
        cfg.stage.encoder_dim = conditioning.encoder_dim
        cfg.model.text_encoder.dim = conditioning.encoder_dim
        cfg.stage.conditioning.diffusers_compat = conditioning.diffusers_compat
        cfg.stage.first_stage.checkpoint = str(movq_checkpoint) if movq_checkpoint else None
        if text_encoder:
            cfg.model.text_encoder.encoder.path = str(Path(text_encoder).resolve())
            dim = _text_encoder_dim(text_encoder)
            if dim is not None and dim != conditioning.encoder_dim:
                raise CheckpointError(
                    f"text encoder {text_encoder} outputs {dim}-d states but the converted projection expects "
                    f"{conditioning.encoder_dim}"
                )
        cfg.converted_from = source
    official = all(
        tuple(v) == tuple(OFFICIAL_UNET[k]) if isinstance(v, (tuple, list)) else v == OFFICIAL_UNET[k]
        for k, v in kwargs.items()
    )
    save_config(
        cfg,
        out,
        {
            "model/unet": "kandinsky3" if official else "converted",
            "model/unet/block": "biggan_deep",
            "model/text_encoder": "flan_ul2",
        },
    )
    write_safetensors(
        out / "unet.safetensors", unet.state_dict() if isinstance(unet, torch.nn.Module) else unet, dtype=torch.float32
    )
    export_model(conditioning, out / "text_conditioning.safetensors")
    export_model(LatentScale(1.0), out / "latent_scale.safetensors")
    if movq_checkpoint is None:
        log.warning("no MoVQ given: set stage.first_stage.checkpoint in %s/config.yaml before sampling", out)
    return out


def _save_diffusers(folder: Path, config: dict[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / "config.json", json.dumps(config, indent=2).encode())
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", state)


SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "thresholding": False,
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "variance_type": "fixed_small",
}


def to_diffusers(checkpoint: Path, out: Path, text_encoder: str | None = None) -> Path:
    """A k3lab diffusion run (checkpoints folder or converted folder) -> a diffusers Kandinsky3Pipeline folder.
    diffusers has no null embedding: its pipeline uses all-zero unconditional text (see TextConditioning)."""
    from hydra.utils import instantiate

    path = checkpoint / "unet.safetensors" if checkpoint.is_dir() else checkpoint
    cfg = check_stage(path, "diffusion")
    kwargs = {
        k: v
        for k, v in plain_dict(cfg.model.unet, "model.unet").items()
        if not k.startswith("_") and k not in ("block", "gradient_checkpointing")
    }
    with torch.device("meta"):
        unet = instantiate(cfg.model.unet)
    config = diffusers_unet_config(unet, kwargs, int(cfg.stage.encoder_dim))
    unet_file = path.parent / "unet.safetensors"
    if not unet_file.is_file():
        raise FileNotFoundError(f"checkpoint not found: {unet_file}")
    try:  # strict key/shape check from the header; tensors are streamed to the output one at a time
        unet_state = remap(LazySafetensors([unet_file]), unet, lambda k: k, str(unet_file))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{unet_file}: truncated or not a safetensors file ({e})") from e
    cond = TextConditioning(int(cfg.stage.encoder_dim), int(kwargs["context_dim"]))
    load_weights(
        cond,
        load_state_dict(path.parent / "text_conditioning.safetensors"),
        path.parent / "text_conditioning.safetensors",
    )
    _save_diffusers(out / "unet", config, unet_state_to_diffusers(unet_state, cond))
    index = {
        "_class_name": "Kandinsky3Pipeline",
        "unet": ["diffusers", "Kandinsky3UNet"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    first = OmegaConf.select(cfg, "stage.first_stage.checkpoint")
    if first:
        from k3lab.io.checkpoint import load_model

        movq = load_model(first, "autoencoder")
        if not isinstance(movq, MoVQ):
            raise CheckpointError(f"{first}: model.autoencoder is a {type(movq).__name__}, not a MoVQ")
        movq_kwargs = dict(movq.config)
        _save_diffusers(out / "movq", diffusers_movq_config(movq_kwargs), movq_state_to_diffusers(movq))
        index["movq"] = ["diffusers", "VQModel"]
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "scheduler" / "scheduler_config.json", json.dumps(SCHEDULER, indent=2).encode())
    encoder = text_encoder or OmegaConf.select(cfg, "model.text_encoder.encoder.path")
    kind = (
        json.loads((Path(encoder) / "config.json").read_text()).get("model_type")
        if encoder and (Path(encoder) / "config.json").is_file()
        else None
    )
    if encoder and kind is not None and kind not in ("t5", "mt5", "umt5"):
        log.warning(
            "not exporting text_encoder/: diffusers' Kandinsky3Pipeline loads a T5 encoder and %s is a %r model "
            "(pass --text-encoder a T5 folder to include one)",
            encoder,
            kind,
        )
        encoder = None
    if encoder and Path(encoder).is_dir():
        from transformers import AutoTokenizer, T5EncoderModel

        T5EncoderModel.from_pretrained(encoder).save_pretrained(out / "text_encoder")
        tokenizer = AutoTokenizer.from_pretrained(encoder)
        tokenizer.save_pretrained(out / "tokenizer")
        index["text_encoder"] = ["transformers", "T5EncoderModel"]
        index["tokenizer"] = ["transformers", type(tokenizer).__name__]
    atomic_write_bytes(out / "model_index.json", json.dumps(index, indent=2).encode())
    return out


def copy_text_encoder(src: Path, out: Path) -> Path:
    """Copy a pipeline's text_encoder/ + tokenizer/ into one folder that TextEncoder loads."""
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("text_encoder", "tokenizer"):
        for f in (src / sub).iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
    return out
