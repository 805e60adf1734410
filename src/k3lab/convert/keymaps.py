"""Key names: k3lab (= the official Kandinsky 3 names for the U-Net) <-> diffusers."""

from __future__ import annotations

import re
from typing import Callable, Iterable

# U-Net: k3lab / official -> diffusers Kandinsky3UNet
_UNET_RULES: list[tuple[str, str | Callable[[re.Match[str]], str]]] = [
    (r"^to_time_embed\.1\.", "time_embedding.linear_1."),
    (r"^to_time_embed\.3\.", "time_embedding.linear_2."),
    (r"^feature_pooling\.", "add_time_condition."),
    (r"^in_layer\.", "conv_in."),
    (r"^out_layer\.0\.", "conv_norm_out."),
    (r"^out_layer\.2\.", "conv_out."),
    (r"^down_samples\.", "down_blocks."),
    (r"^up_samples\.", "up_blocks."),
    (r"\.self_attention_block\.", ".attentions.0."),
    (r"\.resnet_attn_blocks\.(\d+)\.0\.", lambda m: f".resnets_in.{m.group(1)}."),
    (r"\.resnet_attn_blocks\.(\d+)\.1\.", lambda m: f".attentions.{int(m.group(1)) + 1}."),
    (r"\.resnet_attn_blocks\.(\d+)\.2\.", lambda m: f".resnets_out.{m.group(1)}."),
    (r"\.to_query\.", ".to_q."),
    (r"\.to_key\.", ".to_k."),
    (r"\.to_value\.", ".to_v."),
    (r"\.output_layer\.", ".to_out.0."),
]

# Text projection: k3lab TextConditioning -> diffusers (inside the U-Net), official 3.0, official 3.1
PROJECTION_DIFFUSERS = {
    "projection.0.weight": "encoder_hid_proj.projection_linear.weight",
    "projection.1.weight": "encoder_hid_proj.projection_norm.weight",
    "projection.1.bias": "encoder_hid_proj.projection_norm.bias",
}
PROJECTION_OFFICIAL_30 = {
    "projection.0.weight": "t5.0.weight",
    "projection.1.weight": "t5.1.weight",
    "projection.1.bias": "t5.1.bias",
}
PROJECTION_OFFICIAL_31 = {
    "projection.0.weight": "0.weight",
    "projection.1.weight": "1.weight",
    "projection.1.bias": "1.bias",
}


def _apply(rules: Iterable[tuple[str, str | Callable[[re.Match[str]], str]]], key: str) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def unet_to_diffusers(key: str) -> str:
    """A k3lab U-Net key under diffusers' ``Kandinsky3UNet`` name."""
    return _apply(_UNET_RULES, key)


def movq_to_diffusers(key: str, num_levels: int) -> str:
    """k3lab MoVQ (taming-style names, decoder levels counted from the top) -> diffusers VQModel."""
    decoder = key.startswith("decoder.")
    k = key
    k = re.sub(r"\.down\.(\d+)\.block\.", lambda m: f".down_blocks.{m.group(1)}.resnets.", k)
    k = re.sub(r"\.down\.(\d+)\.attn\.", lambda m: f".down_blocks.{m.group(1)}.attentions.", k)
    k = re.sub(r"\.down\.(\d+)\.downsample\.", lambda m: f".down_blocks.{m.group(1)}.downsamplers.0.", k)
    k = re.sub(r"\.up\.(\d+)\.block\.", lambda m: f".up_blocks.{num_levels - 1 - int(m.group(1))}.resnets.", k)
    k = re.sub(r"\.up\.(\d+)\.attn\.", lambda m: f".up_blocks.{num_levels - 1 - int(m.group(1))}.attentions.", k)
    k = re.sub(r"\.up\.(\d+)\.upsample\.", lambda m: f".up_blocks.{num_levels - 1 - int(m.group(1))}.upsamplers.0.", k)
    k = k.replace(".mid.block_1.", ".mid_block.resnets.0.").replace(".mid.block_2.", ".mid_block.resnets.1.")
    k = k.replace(".mid.attn_1.", ".mid_block.attentions.0.").replace(".norm_out.", ".conv_norm_out.")
    if decoder:  # spatially conditioned norms: Norm(SpatialNorm(GroupNorm, conv_y, conv_b))
        k = re.sub(r"\.(norm1|norm2|conv_norm_out)\.norm\.norm\.", r".\1.norm_layer.", k)
        k = re.sub(r"\.(norm1|norm2|conv_norm_out)\.norm\.conv_", r".\1.conv_", k)
        k = re.sub(r"\.attentions\.(\d+)\.norm\.norm\.norm\.", r".attentions.\1.spatial_norm.norm_layer.", k)
        k = re.sub(r"\.attentions\.(\d+)\.norm\.norm\.conv_", r".attentions.\1.spatial_norm.conv_", k)
    else:
        k = re.sub(r"\.(norm1|norm2|conv_norm_out)\.norm\.", r".\1.", k)
        k = re.sub(r"\.attentions\.(\d+)\.norm\.norm\.", r".attentions.\1.group_norm.", k)
    k = k.replace(".nin_shortcut.", ".conv_shortcut.")
    k = re.sub(r"\.attentions\.(\d+)\.q\.", r".attentions.\1.to_q.", k)
    k = re.sub(r"\.attentions\.(\d+)\.k\.", r".attentions.\1.to_k.", k)
    k = re.sub(r"\.attentions\.(\d+)\.v\.", r".attentions.\1.to_v.", k)
    k = re.sub(r"\.attentions\.(\d+)\.proj_out\.", r".attentions.\1.to_out.0.", k)
    return k


def is_movq_attention_projection(diffusers_key: str) -> bool:
    """diffusers stores these as Linear [C, C]; k3lab as 1x1 convs [C, C, 1, 1]."""
    return bool(re.search(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", diffusers_key))


# Prior: k3lab PriorTransformer -> diffusers PriorTransformer (kandinsky-2-2-prior)
_PRIOR_RULES: list[tuple[str, str | Callable[[re.Match[str]], str]]] = [
    (r"^positions$", "positional_embedding"),
    (r"^query$", "prd_embedding"),
    (r"^time_mlp\.0\.", "time_embedding.linear_1."),
    (r"^time_mlp\.2\.", "time_embedding.linear_2."),
    (r"^image_in\.", "proj_in."),
    (r"^pooled_in\.", "embedding_proj."),
    (r"^tokens_in\.", "encoder_hidden_states_proj."),
    (r"^image_out\.", "proj_to_clip_embeddings."),
    (r"^blocks\.", "transformer_blocks."),
    (r"\.norm_attn\.", ".norm1."),
    (r"\.qkv\.(q|k|v)\.", lambda m: f".attn1.to_{m.group(1)}."),
    (r"\.out\.", ".attn1.to_out.0."),
    (r"\.norm_ff\.", ".norm3."),
    (r"\.ff_in\.", ".ff.net.0.proj."),
    (r"\.ff_out\.", ".ff.net.2."),
]


def prior_to_diffusers(key: str) -> str:
    """A k3lab prior key under diffusers' ``PriorTransformer`` name."""
    return _apply(_PRIOR_RULES, key)
