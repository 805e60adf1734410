"""Strict, lazy renaming of state dicts between layouts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import torch
from torch import nn

from k3lab.checkpoint import CheckpointError


def remap(
    source: Mapping[str, torch.Tensor], target: nn.Module, name: Callable[[str], str], what: str,
    reshape: Callable[[str, torch.Tensor, torch.Size], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``target``'s state dict filled from ``source`` where ``source[name(k)]`` feeds target key ``k``.

    ``target`` may live on the meta device (only names and shapes are read). Every target key must be found,
    every source key used, every shape match (after ``reshape``): otherwise a CheckpointError naming them.
    """
    own = target.state_dict()
    table = {k: name(k) for k in own}
    missing = sorted(v for v in table.values() if v not in source)
    unexpected = sorted(set(source) - set(table.values()))
    out, shapes = {}, []
    for k, src in table.items():
        if src not in source:
            continue
        tensor = source[src]
        if reshape is not None:
            tensor = reshape(src, tensor, own[k].shape)
        if tensor.shape != own[k].shape:
            shapes.append(f"{src}: {tuple(tensor.shape)} vs expected {tuple(own[k].shape)}")
        out[k] = tensor
    if missing or unexpected or shapes:
        raise CheckpointError(f"{what}: missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)}), "
                              f"mis-shaped {shapes[:5]}")
    return out


def invert(state: Mapping[str, torch.Tensor], name: Callable[[str], str],
           reshape: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """k3lab state dict -> the other layout (``name`` maps a k3lab key to the other layout's key)."""
    out = {}
    for k, v in state.items():
        new = name(k)
        out[new] = reshape(new, v) if reshape is not None else v
    return out
