"""Rebuilding a :class:`~k3lab.inference.generator.Generator` from what a diffusion run wrote: its checkpoints folder,
an exported ``unet.safetensors`` or a Lightning ``.ckpt`` (EMA weights when kept), with the run's saved config."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from k3lab.diffusion import Schedule
from k3lab.diffusion.settings import SamplingSettings
from k3lab.inference.conditioning import PriorArm, TextArm, make_arm
from k3lab.inference.generator import Generator
from k3lab.io.checkpoint import CheckpointError, check_stage, describe, load_state_dict, load_weights, select_prefix
from k3lab.io.options import plain_dict
from k3lab.nn.first_stage import LatentScale
from k3lab.nn.text_encoder import frozen_text_encoder


def load_generator(
    checkpoint: str | Path,
    device: str = "cpu",
    text_encoder_path: str | None = None,
    unet_preset: str | None = None,
    sequential: bool = False,
    text_encoder_dtype: str | None = None,
    lora: str | Path | None = None,
    lora_scale: float = 1.0,
) -> tuple[Generator, DictConfig]:
    """Rebuild from a diffusion run: its checkpoints folder, an exported ``unet.safetensors`` in it, or a Lightning
    ``.ckpt`` in it (EMA weights when kept). Returns it with the run's saved config. The arm is built by the
    stage's own builder (:func:`~k3lab.inference.conditioning.make_arm`). ``unet_preset`` (e.g. 'kandinsky3') asserts
    which U-Net preset the checkpoint must hold. ``lora`` puts a LoRA adapter (a LoRA run's checkpoints folder or its
    ``lora.safetensors``) on the U-Net at ``lora_scale``, unmerged; a LoRA run's own folder loads its base with it."""
    path = Path(checkpoint)
    if path.is_dir() and (path / "lora.json").is_file() and not (path / "unet.safetensors").is_file():
        lora, path = lora or path, Path(lora_base(path))
    if not path.exists():
        raise FileNotFoundError(
            f"no such checkpoint: {checkpoint} (give a diffusion run's checkpoints folder, its unet.safetensors or "
            "a .ckpt)"
        )
    if path.is_dir():
        path = path / "unet.safetensors"
    cfg = check_stage(path, "diffusion")
    found = (cfg.get("choices") or {}).get("model/unet")
    if unet_preset and found and found != unet_preset:
        raise CheckpointError(
            f"{path}: holds the model/unet={found} preset, not model/unet={unet_preset} ({describe(cfg)})"
        )
    unet = instantiate(cfg.model.unet)
    try:
        load_weights(unet, _part_state(path, "unet"), path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}\n(the config beside it describes the {describe(cfg)})") from e
    if lora is not None:
        apply_lora(unet, Path(lora), lora_scale)
    schedule = Schedule.named(str(cfg.stage.loss.schedule), int(cfg.stage.loss.num_timesteps))
    sampling = SamplingSettings.of_run(cfg)
    clip = instantiate(cfg.stage.clip) if OmegaConf.select(cfg, "stage.clip") is not None else None
    prior = instantiate(cfg.stage.prior) if OmegaConf.select(cfg, "stage.prior") is not None else None
    try:
        arm = make_arm(
            int(cfg.stage.encoder_dim),
            unet,
            schedule,
            diffusers_compat=bool(OmegaConf.select(cfg, "stage.conditioning.diffusers_compat", default=False)),
            clip=clip,
            prior=prior,
            image_tokens=int(OmegaConf.select(cfg, "stage.conditioning.image_tokens", default=10)),
            prior_steps=sampling.prior_steps,
            prior_guidance=sampling.prior_guidance,
        )
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    if not arm.can_sample:
        raise CheckpointError(
            f"{path}: a mapping-prior run without a trained prior (mapping.prior): it cannot sample from text"
        )
    load_weights(arm.conditioning, _part_state(path, arm.export_name), path)
    scale = LatentScale()
    load_weights(scale, _part_state(path, "latent_scale"), path)
    if not scale.measured():
        raise CheckpointError(f"{path}: its latent scale was never measured (the run stopped before its first batch)")
    encoder = instantiate(encoder_config(cfg.model.text_encoder.encoder, text_encoder_path, text_encoder_dtype))
    text_encoder = frozen_text_encoder(encoder, int(cfg.stage.encoder_dim))
    first_stage = instantiate(cfg.stage.first_stage)
    for m in (unet, arm, text_encoder, first_stage):
        m.to("cpu" if sequential else device).eval()
    generator = Generator(
        unet,
        arm,
        text_encoder,
        first_stage,
        schedule,
        str(cfg.stage.loss.prediction),
        float(scale.value),
        device,
        sequential,
        sampling.x0_threshold,
    )
    return generator, cfg


def lora_files(adapter: Path) -> tuple[Path, dict]:
    """(``lora.safetensors``, the ``lora.json`` beside it) of a LoRA run's folder or adapter file."""
    file = adapter / "lora.safetensors" if adapter.is_dir() else adapter
    meta = file.parent / "lora.json"
    if not file.is_file() or not meta.is_file():
        raise CheckpointError(f"{adapter}: no LoRA adapter here (lora.safetensors with lora.json beside it)")
    return file, json.loads(meta.read_text())


def lora_base(adapter: Path) -> str:
    """The base a LoRA adapter was trained on (``stage.init_weights`` of its run)."""
    _, meta = lora_files(adapter)
    if not meta.get("base"):
        raise CheckpointError(f"{adapter}: its lora.json names no base; give the base folder and --lora {adapter}")
    return str(meta["base"])


def apply_lora(unet: nn.Module, adapter: Path, scale: float = 1.0) -> None:
    """Put the adapter on ``unet`` unmerged, at ``scale`` (0: the base model exactly)."""
    from k3lab.nn.lora import add_lora, load_adapter, set_scale

    file, meta = lora_files(adapter)
    add_lora(unet, meta["lora"])
    try:
        load_adapter(unet, load_state_dict(file))
    except ValueError as e:
        raise CheckpointError(f"{file}: {e} (was it trained on this U-Net preset?)") from e
    set_scale(unet, scale)
    unet.requires_grad_(False)


def encoder_config(node: DictConfig, path: str | None = None, dtype: str | None = None) -> DictConfig:
    """The run's text-encoder config with the user's overrides. ``path`` swaps in a generic Hugging Face encoder from
    that folder (whatever factory the run used, e.g. the packaged MiniLM); ``dtype`` is passed to any target."""
    node = OmegaConf.create(plain_dict(node, "model.text_encoder"))
    if path:
        keep = {k: node[k] for k in ("dtype", "max_length", "family") if k in node}
        node = OmegaConf.create({"_target_": "k3lab.nn.text_encoder.TextEncoder", "path": str(path), **keep})
    if dtype:
        with open_dict(node):
            node.dtype = dtype
    return node


def _part_state(path: Path, part: str) -> dict[str, torch.Tensor]:
    """``part``'s weights from an exported ``<part>.safetensors`` beside ``path``, or from a Lightning ``.ckpt`` (the
    arm's trained module, exported as ``text_conditioning``/``image_conditioning``, is the stage's
    ``arm.conditioning``)."""
    if path.suffix == ".ckpt":
        state = load_state_dict(path)
        arm_part = part in (TextArm.export_name, PriorArm.export_name)
        # the arm's module, EMA first; then the names older versions used
        prefixes = ("conditioning_ema.module.", "arm.conditioning.", f"{part}_ema.module.", f"{part}.")
        sub = select_prefix(state, part, prefixes if arm_part else None)
        if sub is state:
            raise CheckpointError(f"{path}: has no '{part}' weights")
        return sub
    return load_state_dict(path.parent / f"{part}.safetensors")
