"""Strict, lazy renaming of state dicts between layouts."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Callable

import torch
from torch import nn

from k3lab.io.checkpoint import CheckpointError
from k3lab.io.safetensors_io import LazyState, dtype_of, shape_of


def remap(
    source: Mapping[str, torch.Tensor],
    target: nn.Module,
    name: Callable[[str], str],
    what: str,
    reshape: Callable[[str, torch.Tensor, torch.Size], torch.Tensor] | None = None,
) -> Mapping[str, torch.Tensor]:
    """``target``'s state dict filled from ``source`` where ``source[name(k)]`` feeds target key ``k``.

    ``target`` may live on the meta device (only names and shapes are read). Every target key must be found,
    every source key used, every shape match (after ``reshape``): otherwise a CheckpointError naming them. A lazy
    ``source`` (:class:`~k3lab.io.safetensors_io.LazySafetensors`) is checked from its headers and gives a lazy result:
    nothing is read until a tensor is used, one at a time.
    """
    own = target.state_dict()
    table = {k: name(k) for k in own}
    missing = sorted(v for v in table.values() if v not in source)
    unexpected = sorted(set(source) - set(table.values()))
    lazy = isinstance(source, LazyState)
    out: dict[str, torch.Tensor] = {}
    entries: dict[str, tuple[torch.Size, torch.dtype, Callable[[], torch.Tensor]]] = {}
    shapes = []
    for k, src in table.items():
        if src not in source:
            continue
        if lazy:
            tensor = torch.empty(shape_of(source, src), dtype=dtype_of(source, src), device="meta")
        else:
            tensor = source[src]
        if reshape is not None:
            tensor = reshape(src, tensor, own[k].shape)
        if tensor.shape != own[k].shape:
            shapes.append(f"{src}: {tuple(tensor.shape)} vs expected {tuple(own[k].shape)}")
        if lazy:
            entries[k] = (tensor.shape, tensor.dtype, partial(_load, source, src, reshape, own[k].shape))
        else:
            out[k] = tensor
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{what}: missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)}), "
            f"mis-shaped {shapes[:5]}"
        )
    return LazyState(entries) if lazy else out


def _load(
    source: Mapping[str, torch.Tensor],
    key: str,
    reshape: Callable[[str, torch.Tensor, torch.Size], torch.Tensor] | None,
    shape: torch.Size,
) -> torch.Tensor:
    tensor = source[key]
    return reshape(key, tensor, shape) if reshape is not None else tensor


def subset(source: Mapping[str, torch.Tensor], keys: set[str], keep: bool = True) -> Mapping[str, torch.Tensor]:
    """The tensors of ``source`` whose names are (``keep``) or are not in ``keys``; lazy stays lazy."""
    chosen = [k for k in source if (k in keys) == keep]
    if isinstance(source, LazyState):
        return LazyState(
            {k: (shape_of(source, k), dtype_of(source, k), partial(source.__getitem__, k)) for k in chosen}
        )
    return {k: source[k] for k in chosen}


def invert(
    state: Mapping[str, torch.Tensor],
    name: Callable[[str], str],
    reshape: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor] | LazyState:
    """k3lab state dict -> the other layout (``name`` maps a k3lab key to the other layout's key); lazy stays lazy."""
    if isinstance(state, LazyState):
        entries = {}
        for k in state:
            probe = torch.empty(shape_of(state, k), dtype=dtype_of(state, k), device="meta")
            new = name(k)
            probe = reshape(new, probe) if reshape is not None else probe
            load = partial(_invert_one, state, k, new, reshape)
            entries[new] = (probe.shape, probe.dtype, load)
        return LazyState(entries)
    out = {}
    for k, v in state.items():
        new = name(k)
        out[new] = reshape(new, v) if reshape is not None else v
    return out


def _invert_one(
    state: Mapping[str, torch.Tensor], key: str, new: str, reshape: Callable[[str, torch.Tensor], torch.Tensor] | None
) -> torch.Tensor:
    return reshape(new, state[key]) if reshape is not None else state[key]
