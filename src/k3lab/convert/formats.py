"""Reading and writing the official Kandinsky 3 and the diffusers layouts (lazily: safetensors / mmap, meta init)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from k3lab.convert.keymaps import (
    PROJECTION_DIFFUSERS,
    PROJECTION_OFFICIAL_30,
    PROJECTION_OFFICIAL_31,
    is_movq_attention_projection,
    movq_to_diffusers,
    unet_to_diffusers,
)
from k3lab.convert.remap import invert, remap, subset
from k3lab.io.checkpoint import CheckpointError
from k3lab.io.safetensors_io import LazySafetensors, LazyState
from k3lab.nn.movq import MoVQ
from k3lab.nn.text_conditioning import TextConditioning
from k3lab.nn.unet import KandinskyUNet
from k3lab.nn.unet_blocks import BigGANDeepBlock

WEIGHTS = "diffusion_pytorch_model.safetensors"
M = TypeVar("M", bound=nn.Module)

OFFICIAL_UNET: dict[str, Any] = dict(
    in_channels=4,
    out_channels=4,
    model_channels=384,
    init_channels=192,
    time_embed_dim=1536,
    context_dim=4096,
    groups=32,
    head_dim=64,
    expansion_ratio=4,
    dim_mult=(1, 2, 4, 8),
    num_blocks=(3, 3, 3, 3),
    add_cross_attention=(False, True, True, True),
    add_self_attention=(False, True, True, True),
)


# ----------------------------------------------------------------------------- configs
def unet_kwargs_from_diffusers(config: dict[str, Any]) -> dict[str, Any]:
    """KandinskyUNet arguments equal to a diffusers ``Kandinsky3UNet`` config (its fixed choices made explicit), or an
    error naming each setting diffusers' own model cannot run with (k3lab would have to guess what it means)."""
    boc = list(config.get("block_out_channels", (384, 768, 1536, 3072)))
    lpb = config.get("layers_per_block", 3)
    problems = []
    if any(b % boc[0] for b in boc):
        problems.append(f"block_out_channels={boc}: not multiples of the first width")
    if len(boc) > 4:
        problems.append(f"block_out_channels has {len(boc)} levels (diffusers' Kandinsky3UNet runs with at most 4)")
    elif len(boc) < 4:
        problems.append(
            f"block_out_channels has {len(boc)} levels (with fewer than 4, diffusers pairs the down levels with the "
            "first attention flags and the up levels with the last, an asymmetric U-Net k3lab does not model)"
        )
    if not isinstance(lpb, int) or lpb < 2:
        problems.append(
            f"layers_per_block={lpb} (diffusers' Kandinsky3UNet only runs with one integer >= 2: its up blocks drop "
            "the last width change with 1)"
        )
    if problems:
        raise CheckpointError("diffusers U-Net config k3lab cannot reproduce: " + "; ".join(problems))
    n = len(boc)
    return dict(
        in_channels=config.get("in_channels", 4),
        out_channels=config.get("in_channels", 4),
        model_channels=boc[0],
        init_channels=boc[0] // 2,
        time_embed_dim=config.get("time_embedding_dim", 1536),
        context_dim=config.get("cross_attention_dim", 4096),
        groups=config.get("groups", 32),
        head_dim=config.get("attention_head_dim", 64),
        expansion_ratio=4,
        dim_mult=tuple(b // boc[0] for b in boc),
        num_blocks=(lpb,) * n,
        add_cross_attention=(False, True, True, True),
        add_self_attention=(False, True, True, True),
    )


def diffusers_unet_config(unet: KandinskyUNet, kwargs: dict[str, Any], encoder_dim: int) -> dict[str, Any]:
    """The diffusers config for a k3lab U-Net; an error naming the setting diffusers cannot express."""
    problems = []
    if not any(isinstance(m, BigGANDeepBlock) for m in unet.modules()):
        problems.append("block must be biggan_deep (diffusers has no plain ResBlock variant)")
    n = len(kwargs["dim_mult"])
    for key, want in (
        ("expansion_ratio", 4),
        ("add_cross_attention", (False, True, True, True)),
        ("add_self_attention", (False, True, True, True)),
    ):
        have = tuple(kwargs[key]) if isinstance(want, tuple) else kwargs[key]
        if have != want:
            problems.append(f"{key}={kwargs[key]} (diffusers fixes {want})")
    if (kwargs.get("init_channels") or kwargs["model_channels"]) != kwargs["model_channels"] // 2:
        problems.append(f"init_channels={kwargs.get('init_channels')} (diffusers fixes model_channels // 2)")
    if kwargs["in_channels"] != kwargs["out_channels"]:
        problems.append("in_channels != out_channels")
    if len(set(kwargs["num_blocks"])) != 1 or min(kwargs["num_blocks"]) < 2:
        problems.append(f"num_blocks={kwargs['num_blocks']} (diffusers: one layers_per_block, at least 2)")
    if n != 4:
        problems.append(f"{n} levels (diffusers' Kandinsky3UNet is symmetric with exactly 4)")
    if problems:
        raise CheckpointError("this U-Net cannot be written in the diffusers layout: " + "; ".join(problems))
    return {
        "_class_name": "Kandinsky3UNet",
        "in_channels": kwargs["in_channels"],
        "time_embedding_dim": kwargs["time_embed_dim"],
        "groups": kwargs["groups"],
        "attention_head_dim": kwargs["head_dim"],
        "layers_per_block": kwargs["num_blocks"][0],
        "block_out_channels": [kwargs["model_channels"] * m for m in kwargs["dim_mult"]],
        "cross_attention_dim": kwargs["context_dim"],
        "encoder_hid_dim": encoder_dim,
    }


MOVQ_DOWN_TYPES = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}  # block type -> has attention
MOVQ_UP_TYPES = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}
DIFFUSERS_SPATIAL_NORM_GROUPS = 32  # diffusers' SpatialNorm: every decoder norm of a norm_type='spatial' VQModel


def movq_kwargs_from_diffusers(config: dict[str, Any]) -> dict[str, Any]:
    """MoVQ arguments that decode and encode exactly as a diffusers ``VQModel`` with this config, or an error naming
    each setting k3lab does not reproduce. Settings that only steer diffusers' own pipeline
    (``scaling_factor``, ``force_upcast``, ``sample_size``) change neither the weights nor the continuous decode and
    are accepted."""
    problems = []
    if config.get("norm_type", "group") != "spatial":
        problems.append(
            f"norm_type={config.get('norm_type', 'group')!r} (Kandinsky 3's MoVQ needs norm_type='spatial')"
        )
    if config.get("act_fn", "silu") not in ("silu", "swish"):
        problems.append(f"act_fn={config.get('act_fn')!r} (k3lab's MoVQ uses SiLU)")
    if config.get("lookup_from_codebook", False):
        problems.append(
            "lookup_from_codebook=True (diffusers then decodes code indices, not the continuous latents Kandinsky 3 "
            "decodes)"
        )
    if not config.get("mid_block_add_attention", True):
        problems.append("mid_block_add_attention=False (k3lab's MoVQ always has mid-block attention)")
    boc = list(config.get("block_out_channels", (64,)))
    if any(b % boc[0] for b in boc):
        problems.append(f"block_out_channels={boc} (each width must be a multiple of the first)")
    down = list(config.get("down_block_types", ("DownEncoderBlock2D",)))
    up = list(config.get("up_block_types", ("UpDecoderBlock2D",)))
    unknown = [t for t in down if t not in MOVQ_DOWN_TYPES] + [t for t in up if t not in MOVQ_UP_TYPES]
    if unknown:
        problems.append(f"block types {unknown} (k3lab knows {sorted(MOVQ_DOWN_TYPES)} and {sorted(MOVQ_UP_TYPES)})")
    elif len(down) != len(boc) or len(up) != len(boc):
        problems.append(f"{len(down)} down / {len(up)} up block types for {len(boc)} block_out_channels")
    elif [MOVQ_UP_TYPES[t] for t in reversed(up)] != [MOVQ_DOWN_TYPES[t] for t in down]:
        problems.append(
            f"up_block_types={up} do not mirror down_block_types={down} (k3lab's MoVQ has attention at the same levels "
            "in both)"
        )
    latent = config.get("latent_channels", 3)
    embed = config.get("vq_embed_dim") or latent
    if embed != latent:
        problems.append(
            f"vq_embed_dim={embed} != latent_channels={latent} (diffusers' spatial norms are built for latent_channels "
            "inputs and are fed vq_embed_dim ones: such a VQModel cannot decode)"
        )
    groups = config.get("norm_num_groups", 32)
    for name, g in (("norm_num_groups", groups), ("the decoder's spatial-norm groups", DIFFUSERS_SPATIAL_NORM_GROUPS)):
        if any(b % g for b in boc):
            problems.append(f"block_out_channels={boc} not divisible by {name}={g}")
    if problems:
        raise CheckpointError("diffusers VQModel config that k3lab cannot reproduce exactly: " + "; ".join(problems))
    return dict(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        ch=boc[0],
        ch_mult=tuple(b // boc[0] for b in boc),
        num_res_blocks=config.get("layers_per_block", 1),
        z_channels=latent,
        attn_levels=tuple(i for i, t in enumerate(down) if MOVQ_DOWN_TYPES[t]),
        embed_dim=embed,
        n_embed=config.get("num_vq_embeddings", 256),
        num_groups=groups,
        decoder_num_groups=DIFFUSERS_SPATIAL_NORM_GROUPS,
    )


def diffusers_movq_config(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The diffusers ``VQModel`` config of a k3lab MoVQ; an error naming the setting diffusers cannot express."""
    n = len(kwargs["ch_mult"])
    attn = set(kwargs.get("attn_levels") or (n - 1,))
    groups = kwargs.get("num_groups", 32)
    decoder_groups = kwargs.get("decoder_num_groups") or groups
    if decoder_groups != DIFFUSERS_SPATIAL_NORM_GROUPS:
        raise CheckpointError(
            f"MoVQ decoder norms with {decoder_groups} groups (num_groups={groups}, decoder_num_groups="
            f"{kwargs.get('decoder_num_groups')}): diffusers' SpatialNorm fixes {DIFFUSERS_SPATIAL_NORM_GROUPS}"
        )
    if kwargs["z_channels"] != kwargs["embed_dim"]:
        raise CheckpointError(
            f"MoVQ z_channels={kwargs['z_channels']} != embed_dim={kwargs['embed_dim']}: diffusers' VQModel cannot "
            "decode that"
        )
    return {
        "_class_name": "VQModel",
        "in_channels": kwargs.get("in_channels", 3),
        "out_channels": kwargs.get("out_channels", 3),
        "block_out_channels": [kwargs["ch"] * m for m in kwargs["ch_mult"]],
        "layers_per_block": kwargs["num_res_blocks"],
        "down_block_types": ["AttnDownEncoderBlock2D" if i in attn else "DownEncoderBlock2D" for i in range(n)],
        "up_block_types": ["AttnUpDecoderBlock2D" if (n - 1 - i) in attn else "UpDecoderBlock2D" for i in range(n)],
        "latent_channels": kwargs["z_channels"],
        "vq_embed_dim": kwargs["embed_dim"],
        "num_vq_embeddings": kwargs["n_embed"],
        "norm_num_groups": groups,
        "norm_type": "spatial",
        "mid_block_add_attention": True,
        "act_fn": "silu",
        "sample_size": 32,
        "scaling_factor": 1.0,
        "force_upcast": False,
        "lookup_from_codebook": False,
    }


# ----------------------------------------------------------------------------- files
def read_safetensors_folder(folder: Path, variant: str | None = None) -> LazySafetensors:
    """``diffusion_pytorch_model[.variant].safetensors`` or its sharded index, opened lazily: names, shapes and dtypes
    from the headers, each tensor read only when used (a conversion never holds the whole model)."""
    stem = WEIGHTS if variant is None else WEIGHTS.replace(".safetensors", f".{variant}.safetensors")
    single, index = folder / stem, folder / f"{stem}.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files: list[str | Path] = [
            folder / shard for shard in sorted(set(json.loads(index.read_text())["weight_map"].values()))
        ]
    else:
        raise FileNotFoundError(f"{folder}: no {stem} (or its .index.json)")
    try:
        return LazySafetensors(files)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file gets one clear error
        raise CheckpointError(f"{folder}: cannot read {stem} as safetensors ({type(e).__name__}: {e})") from e


def _meta_module(cls: type[M], **kwargs: Any) -> M:
    with torch.device("meta"):
        return cls(**kwargs)


def _movq_reshape(src: str, tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return tensor.reshape(shape) if is_movq_attention_projection(src) and tensor.ndim == 2 else tensor


# ----------------------------------------------------------------------------- import
def read_diffusers_unet(
    folder: Path, variant: str | None = None
) -> tuple[Mapping[str, torch.Tensor], TextConditioning, dict[str, Any]]:
    """A diffusers ``unet/`` folder -> (the k3lab U-Net's state, lazy: checked from the headers, read tensor by tensor
    when used; the text conditioning with a zero null embedding; the U-Net kwargs)."""
    config = json.loads((folder / "config.json").read_text())
    kwargs = unet_kwargs_from_diffusers(config)
    source = read_safetensors_folder(folder, variant)
    projection = set(PROJECTION_DIFFUSERS.values())
    proj_src = {k: source[v] for k, v in PROJECTION_DIFFUSERS.items() if v in source}
    unet = _meta_module(KandinskyUNet, **kwargs)
    state = remap(
        subset(source, projection, keep=False), unet, unet_to_diffusers, f"{folder} (diffusers Kandinsky3UNet)"
    )
    cond = TextConditioning(config.get("encoder_hid_dim", 4096), kwargs["context_dim"], diffusers_compat=True)
    proj_src["null_embedding"] = (
        torch.zeros(kwargs["context_dim"], dtype=next(iter(proj_src.values())).dtype) if proj_src else torch.zeros(0)
    )
    cond.load_state_dict(remap(proj_src, cond, lambda k: k, f"{folder} (encoder_hid_proj)"))
    return state, cond.float(), kwargs


def load_diffusers_unet(
    folder: Path, variant: str | None = None
) -> tuple[KandinskyUNet, TextConditioning, dict[str, Any]]:
    """A diffusers ``unet/`` folder -> (k3lab U-Net in float32, text conditioning with a zero null embedding, U-Net
    kwargs)."""
    state, cond, kwargs = read_diffusers_unet(folder, variant)
    unet = _meta_module(KandinskyUNet, **kwargs)
    unet.load_state_dict(dict(state), assign=True)
    return unet.float(), cond, kwargs


def load_diffusers_movq(folder: Path, variant: str | None = None) -> tuple[MoVQ, dict[str, Any]]:
    """A k3lab MoVQ and its config from a diffusers ``movq/`` folder (optionally a weight variant)."""
    config = json.loads((folder / "config.json").read_text())
    kwargs = movq_kwargs_from_diffusers(config)
    movq = MoVQ(**kwargs)  # 0.27B at most: built for real (the quantiser's usage buffers need values)
    n = len(kwargs["ch_mult"])
    movq.load_state_dict(
        remap(
            read_safetensors_folder(folder, variant),
            movq,
            lambda k: movq_to_diffusers(k, n),
            f"{folder} (diffusers VQModel)",
            _movq_reshape,
        )
    )
    return movq.float(), kwargs


def load_official(
    path: Path, projection: Path | None = None, unet_kwargs: dict[str, Any] | None = None
) -> tuple[KandinskyUNet, TextConditioning, dict[str, Any]]:
    """Official ``kandinsky3.pt``: 3.0 (unet, null_embedding, projections) or 3.1 (unet, null_embedding) +
    ``projection.pt``.
    ``unet_kwargs`` (default: the released configuration) describes the U-Net the file holds. In float32."""
    state, cond, kwargs = read_official(path, projection, unet_kwargs)
    unet = _meta_module(KandinskyUNet, **kwargs)
    unet.load_state_dict(dict(state), assign=True)
    return unet.float(), cond, kwargs


def read_official(
    path: Path, projection: Path | None = None, unet_kwargs: dict[str, Any] | None = None
) -> tuple[Mapping[str, torch.Tensor], TextConditioning, dict[str, Any]]:
    """:func:`load_official`'s parts without building the U-Net: its state as memory-mapped tensors in the file's own
    dtype (pages are read as a writer walks them; nothing is copied or cast up front)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise CheckpointError(
            f"{path}: cannot be read as an official Kandinsky 3 checkpoint with weights_only=True ({type(e).__name__}: "
            f"{e})"
        ) from e
    if not isinstance(ckpt, dict) or "unet" not in ckpt or "null_embedding" not in ckpt:
        raise CheckpointError(
            f"{path}: not an official kandinsky3.pt (expected keys unet, null_embedding; found "
            f"{sorted(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__})"
        )
    if "projections" in ckpt:
        proj_src, names = dict(ckpt["projections"]), PROJECTION_OFFICIAL_30
    elif projection is not None:
        proj_src, names = (
            dict(torch.load(projection, map_location="cpu", weights_only=True, mmap=True)),
            PROJECTION_OFFICIAL_31,
        )
    else:
        raise CheckpointError(
            f"{path}: a 3.1 checkpoint (no 'projections'): give its flan_ul2_encoder/projection.pt too"
        )
    unet_src = ckpt["unet"]
    kwargs = dict(unet_kwargs or OFFICIAL_UNET)
    if "in_layer.weight" in unet_src:
        kwargs["in_channels"] = int(unet_src["in_layer.weight"].shape[1])
    state = remap(unet_src, _meta_module(KandinskyUNet, **kwargs), lambda k: k, f"{path} (official U-Net)")
    weight = proj_src.get(names["projection.0.weight"])
    encoder_dim = int(weight.shape[1]) if weight is not None else 4096
    cond = TextConditioning(encoder_dim, kwargs["context_dim"])
    src = {v: proj_src[v] for v in names.values() if v in proj_src} | {
        "null_embedding": ckpt["null_embedding"].reshape(-1)
    }
    unknown = sorted(set(proj_src) - set(names.values()))
    if unknown:
        raise CheckpointError(f"{path}: unexpected projection keys {unknown}")
    cond.load_state_dict(remap(src, cond, lambda k: names.get(k, k), f"{path} (projection)"))
    return state, cond.float(), kwargs


# ----------------------------------------------------------------------------- export
def unet_state_to_diffusers(
    unet: nn.Module | Mapping[str, torch.Tensor], conditioning: TextConditioning
) -> dict[str, torch.Tensor] | LazyState:
    """The diffusers ``Kandinsky3UNet`` state (projection included) of a k3lab U-Net or its state; a lazy state stays
    lazy."""
    state = unet.state_dict() if isinstance(unet, nn.Module) else unet
    out = invert(state, unet_to_diffusers)
    for k, v in conditioning.state_dict().items():
        if k in PROJECTION_DIFFUSERS:
            out[PROJECTION_DIFFUSERS[k]] = v
    return out


def movq_state_to_diffusers(movq: MoVQ) -> dict[str, torch.Tensor] | LazyState:
    """The MoVQ's state dict under diffusers' ``VQModel`` key names."""
    n = len(movq.config["ch_mult"])
    return invert(
        movq.state_dict(),
        lambda k: movq_to_diffusers(k, n),
        lambda k, v: v.reshape(v.shape[:2]) if is_movq_attention_projection(k) and v.ndim == 4 else v,
    )


def load_diffusers_prior(folder: Path, variant: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A diffusers ``prior/`` folder (PriorTransformer, e.g. kandinsky-2-2-prior) -> k3lab PriorTransformer."""
    from k3lab.convert.keymaps import prior_to_diffusers
    from k3lab.nn.prior import PriorTransformer

    config = json.loads((folder / "config.json").read_text())
    unsupported = {
        k: config.get(k)
        for k in ("norm_in_type", "embedding_proj_norm_type", "time_embed_dim", "embedding_proj_dim", "clip_embed_dim")
        if config.get(k) is not None
    }
    if config.get("added_emb_type", "prd") != "prd" or config.get("additional_embeddings", 4) != 4 or unsupported:
        raise CheckpointError(
            f"{folder}: a PriorTransformer variant k3lab does not model ({unsupported or config.get('added_emb_type')})"
        )
    kwargs = dict(
        embedding_dim=config.get("embedding_dim", 768),
        num_layers=config.get("num_layers", 20),
        heads=config.get("num_attention_heads", 32),
        head_dim=config.get("attention_head_dim", 64),
        num_text_tokens=config.get("num_embeddings", 77),
    )
    prior = _meta_module(PriorTransformer, **kwargs)
    prior.load_state_dict(
        remap(
            read_safetensors_folder(folder, variant),
            prior,
            prior_to_diffusers,
            f"{folder} (diffusers PriorTransformer)",
        ),
        assign=True,
    )
    return prior.float(), kwargs
