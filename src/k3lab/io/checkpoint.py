"""Safe checkpoint I/O: safetensors or ``torch.load(weights_only=True)``, never plain pickle.

Every exported model sits beside the resolved ``config.yaml`` of its run, so the file alone can
rebuild its module (``load_model``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from k3lab.nn.first_stage import FirstStage
from k3lab.nn.weights import CheckpointError, load_state_dict

__all__ = [
    "CheckpointError",
    "load_state_dict",
    "load_model",
    "load_weights",
    "load_frozen",
    "load_first_stage",
    "export_model",
]

CONFIG_NAME = "config.yaml"

# Modules that moved (the layout of docs/architecture.md): configs saved by older runs still rebuild (see
# load_config_beside); a target under an old module is read under its new one.
MOVED_MODULES = {
    "k3lab.checkpoint": "k3lab.io.checkpoint",
    "k3lab.safetensors_io": "k3lab.io.safetensors_io",
    "k3lab.imaging": "k3lab.io.imaging",
    "k3lab.weights": "k3lab.nn.weights",
    "k3lab.losses": "k3lab.nn.losses",
    "k3lab.distributed": "k3lab.nn.sharding",
    "k3lab.fitting": "k3lab.run.fitting",
    "k3lab.callbacks": "k3lab.run.callbacks",
    "k3lab.resume": "k3lab.run.resume",
    "k3lab.preemption": "k3lab.run.preemption",
    "k3lab.config": "k3lab.run.config",
    "k3lab.conditioning": "k3lab.inference.conditioning",
    "k3lab.editing": "k3lab.inference.editing",
    "k3lab.mapping": "k3lab.inference.mapping",
    "k3lab.generate": "k3lab.inference.generator",
    "k3lab.text_encoders": "k3lab.data.scene_text_encoder",
    "k3lab.nn.tiny_text": "k3lab.nn.tiny_t5",
    "k3lab.precompute": "k3lab.data.precompute",
    "k3lab.report": "k3lab.ablation.report",
    "k3lab.progressive": "k3lab.run.progressive",
}
# Single targets that moved (older than the module moves).
MOVED_TARGETS = {
    "k3lab.nn.first_stage.load_first_stage": "k3lab.io.checkpoint.load_first_stage",
    "k3lab.nn.text_encoder.tiny_t5": "k3lab.data.scene_text_encoder.tiny_t5",
}


# Options of the diffusion and inpainting stages that moved into option groups (k3lab.stages.options): a config saved
# by an older run is read with each flat ``stage.<old>`` key at ``stage.<new>`` (see load_config_beside).
MOVED_STAGE_KEYS = {
    "warmup_steps": "optim.warmup_steps",
    "lr_decay_steps": "optim.lr_decay_steps",
    "lr_final": "optim.lr_final",
    "grad_clip": "optim.grad_clip",
    "fused_optimizer": "optim.fused",
    "schedule": "loss.schedule",
    "num_timesteps": "loss.num_timesteps",
    "prediction": "loss.prediction",
    "min_snr_gamma": "loss.min_snr_gamma",
    "noise_seed": "loss.noise_seed",
    "caption_dropout": "conditioning.dropout",
    "diffusers_compat": "conditioning.diffusers_compat",
    "image_tokens": "conditioning.image_tokens",
    "val_prompts": "validation.prompts",
    "val_seed": "validation.seed",
    "resolution": "validation.resolution",
    "image_dir": "validation.image_dir",
    "sampler": "validation.sampling.sampler",
    "sample_steps": "validation.sampling.steps",
    "guidance_weight": "validation.sampling.guidance",
    "x0_threshold": "validation.sampling.x0_threshold",
    "prior_steps": "validation.sampling.prior_steps",
    "prior_guidance": "validation.sampling.prior_guidance",
}
# Options of the shard data module that moved into its ``format`` group (k3lab.data.options.SampleFormat).
MOVED_DATA_KEYS = {
    key: f"format.{key}"
    for key in ("caption_key", "metadata_key", "min_image_size", "require_caption", "feature_keys", "decode_images")
} | {"image_key": "format.image_keys"}
# (config node, the class names whose flat keys moved, the moves)
GROUPED_NODES = (
    ("stage", ("DiffusionStage", "InpaintingStage"), MOVED_STAGE_KEYS),
    ("data", ("ShardDataModule",), MOVED_DATA_KEYS),
)


def update_moved_keys(cfg: DictConfig) -> DictConfig:
    """A saved run config with the flat options of older runs (the diffusion stage's, the data module's) moved into
    their option groups, in place; configs already grouped, and other stages, are left as they are."""
    for name, classes, moves in GROUPED_NODES:
        node = cfg.get(name)
        if not isinstance(node, DictConfig) or str(node.get("_target_", "")).rsplit(".", 1)[-1] not in classes:
            continue
        raw = OmegaConf.to_container(node, resolve=False)
        assert isinstance(raw, dict)
        with open_dict(node):
            for old, new in moves.items():
                if old in raw:
                    if OmegaConf.select(node, new, default=None) is None:
                        OmegaConf.update(node, new, raw[old], force_add=True)
                    del node[old]
    return cfg


def moved_target(target: str) -> str:
    """Where a ``_target_`` written by an older version of k3lab lives now (itself when it never moved)."""
    if target in MOVED_TARGETS:
        return MOVED_TARGETS[target]
    module, _, name = target.rpartition(".")
    return f"{MOVED_MODULES[module]}.{name}" if module in MOVED_MODULES else target


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and ``os.replace``, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


STAGE_NAMES = {
    "AutoencoderStage": "autoencoder",
    "DiffusionStage": "diffusion",
    "InpaintingStage": "diffusion",  # a diffusion run whose U-Net also reads a mask and a masked image
    "PriorStage": "prior",
    "ClipStage": "clip",
}


def save_config(cfg: DictConfig, directory: str | Path, choices: Mapping[str, str] | None = None) -> Path:
    """Write the resolved config as ``config.yaml`` in ``directory``, with the config-group choices
    (``model/unet: tiny``...) under ``choices`` so a checkpoint can say which presets built it."""
    path = Path(directory) / CONFIG_NAME
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if choices:
        resolved["choices"] = {k: str(v) for k, v in choices.items() if v is not None and not k.startswith("hydra")}  # type: ignore[index]
    atomic_write_bytes(path, OmegaConf.to_yaml(OmegaConf.create(resolved)).encode())
    return path


def stage_of(cfg: DictConfig) -> str:
    """'autoencoder' | 'diffusion' | 'prior' from a saved config's ``stage._target_``."""
    target = str(OmegaConf.select(cfg, "stage._target_") or "")
    return STAGE_NAMES.get(target.rsplit(".", 1)[-1], target or "unknown")


def describe(cfg: DictConfig) -> str:
    """'diffusion stage (model/unet=tiny, model/unet/block=resnet, ...)' for error messages."""
    choices = cfg.get("choices") or {}
    models = ", ".join(f"{k}={v}" for k, v in sorted(choices.items()) if str(k).startswith("model/"))
    return f"{stage_of(cfg)} stage" + (f" ({models})" if models else "")


def check_stage(path: str | Path, expected: str) -> DictConfig:
    """The config beside ``path``; raises naming both stages when it was written by another stage."""
    cfg = load_config_beside(path)
    found = stage_of(cfg)
    if found != expected:
        raise CheckpointError(
            f"{path}: is a checkpoint of the {describe(cfg)}, but the {expected} stage's checkpoint is needed here"
        )
    return cfg


def export_model(module: nn.Module, path: str | Path) -> Path:
    """Save ``module``'s state dict as safetensors (atomically, streamed: no second copy of the weights in memory)."""
    from k3lab.io.safetensors_io import write_safetensors

    return write_safetensors(path, module.state_dict())


def load_config_beside(path: str | Path) -> DictConfig:
    """The ``config.yaml`` saved in the same folder as a checkpoint."""
    cfg_path = Path(path).parent / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_NAME} beside it ({cfg_path}), so its model cannot be rebuilt")
    cfg = OmegaConf.load(cfg_path)
    assert isinstance(cfg, DictConfig)
    _update_moved_targets(cfg)
    return update_moved_keys(cfg)


def _update_moved_targets(node: object) -> None:
    if isinstance(node, DictConfig):
        target = node.get("_target_") if "_target_" in node else None
        if isinstance(target, str) and moved_target(target) != target:
            node["_target_"] = moved_target(target)
        for key in node:
            _update_moved_targets(node._get_node(key))
    elif OmegaConf.is_list(node):
        for item in node:  # type: ignore[union-attr]
            _update_moved_targets(item)


def select_prefix(
    state: dict[str, torch.Tensor], part: str, prefixes: tuple[str, ...] | None = None
) -> dict[str, torch.Tensor]:
    """Pick one module's weights from a stage checkpoint: EMA first, then the live weights (or the first of
    ``prefixes`` that matches)."""
    for prefix in prefixes or (f"{part}_ema.module.", f"{part}."):
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            return sub
    return state


def load_weights(module: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> nn.Module:
    """Strict load that names every missing, unexpected or mis-shaped key."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{source}: does not match {type(module).__name__}: missing "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, mis-shaped {shapes[:5]}"
        )
    module.load_state_dict(state, strict=True)
    return module


def load_model(path: str | Path, part: str) -> nn.Module:
    """Rebuild ``model.<part>`` from the config beside ``path`` and load its weights (EMA when present)."""
    from hydra.utils import instantiate

    cfg = load_config_beside(path)
    node = OmegaConf.select(cfg, f"model.{part}")
    if node is None:
        raise CheckpointError(f"{path}: its {CONFIG_NAME} has no model.{part}")
    module = instantiate(node)
    return load_weights(module, select_prefix(load_state_dict(path), part), path)


def check_resume(ckpt_path: str | Path, stage_target: str, choices: Mapping[str, str]) -> None:
    """Before resuming: the checkpoint must come from the same stage and the same model presets (names both)."""
    beside = Path(ckpt_path).parent / CONFIG_NAME
    if not beside.is_file():
        return  # a checkpoint moved on its own: Lightning's strict load still names mismatched keys
    saved = OmegaConf.load(beside)
    if not isinstance(saved, DictConfig):
        raise CheckpointError(f"{beside}: not a run config (a YAML list, not a mapping)")
    want = STAGE_NAMES.get(stage_target.rsplit(".", 1)[-1], stage_target)
    if stage_of(saved) != want:
        raise CheckpointError(
            f"ckpt_path={ckpt_path}: is a checkpoint of the {describe(saved)}, but this run trains the {want} stage"
        )
    old = saved.get("choices") or {}
    differ = {
        k: (old[k], choices[k])
        for k in old
        if k.startswith("model/") and k in choices and str(old[k]) != str(choices[k])
    }
    if differ:
        names = ", ".join(f"{k}: checkpoint {a} vs this run {b}" for k, (a, b) in sorted(differ.items()))
        raise CheckpointError(f"ckpt_path={ckpt_path}: built with other presets ({names})")


def load_frozen(checkpoint: str | Path | None, stage: str, part: str) -> nn.Module | None:
    """A trained part of another stage's run (e.g. the prior, the conditioning CLIP): checked to come from
    ``stage``, rebuilt from the config beside it, frozen and in eval mode. ``checkpoint=None`` gives None."""
    if checkpoint is None:
        return None
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"{part} weights file not found: looked for {checkpoint} (train it with stage={stage})")
    check_stage(checkpoint, stage)
    return load_model(checkpoint, part).eval().requires_grad_(False)


def load_first_stage(checkpoint: str | None, channels: int = 3) -> FirstStage:
    """``checkpoint=None``: Identity (pixel space); else the autoencoder stage's exported weights
    (``autoencoder.safetensors``, or its Lightning ``.ckpt``) with the ``config.yaml`` beside them, frozen."""
    from k3lab.nn.first_stage import FrozenMoVQ, IdentityFirstStage
    from k3lab.nn.movq import MoVQ

    if checkpoint is None:
        return IdentityFirstStage(channels)
    check_stage(checkpoint, "autoencoder")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(
            f"first stage checkpoint not found: {checkpoint} (train one with experiment=autoencoder_tiny)"
        )
    movq = load_model(checkpoint, "autoencoder")
    if not isinstance(movq, MoVQ):
        raise CheckpointError(f"{checkpoint}: model.autoencoder is a {type(movq).__name__}, not a MoVQ")
    return FrozenMoVQ(movq)
