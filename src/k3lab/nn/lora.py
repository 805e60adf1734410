"""LoRA adapters on the U-Net through ``peft`` (Hu et al. 2021, arXiv 2106.09685): low-rank updates ``W + (alpha / r)
B A`` on the layers whose names match ``target_modules``, the base weights frozen.

The default targets are the attention projections of every attention block (``to_query``, ``to_key``, ``to_value``,
``output_layer``); a regular expression over full names adapts the convolutions too (``.*resnet_blocks[.][0-9]+[.]
projection``: the residual blocks' 3x3 and 1x1 convolutions). The adapter is
``peft``'s: :func:`add_lora` injects it in place (the U-Net keeps its class and its forward), :func:`adapter_state`
/ :func:`load_adapter` move its weights, :func:`set_scale` scales it at sampling time (0 = the base model exactly),
:func:`merge_lora` folds it into the base weights and removes it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from typing_extensions import override

DEFAULT_TARGETS = ("to_query", "to_key", "to_value", "output_layer")
ADAPTER = "default"


@dataclass(frozen=True)
class LoraOptions:
    """``stage.lora``: rank, alpha (the update is scaled by alpha / rank), dropout and the target layers (names, or
    regular expressions over the full module names when any holds a regex character)."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    base_dtype: str | None = (
        None  # bfloat16 / float16: the frozen base stored at half size (with trainer=gpu's autocast)
    )

    def __post_init__(self) -> None:
        targets = (self.target_modules,) if isinstance(self.target_modules, str) else self.target_modules
        object.__setattr__(self, "target_modules", tuple(str(t) for t in targets))
        if int(self.rank) < 1:
            raise ValueError(f"stage.lora.rank={self.rank}: a positive integer")
        if float(self.alpha) <= 0 or not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"stage.lora: alpha={self.alpha} (> 0), dropout={self.dropout} (in [0, 1))")
        if not self.target_modules:
            raise ValueError("stage.lora.target_modules: name at least one layer (default: the attention projections)")
        if self.base_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"stage.lora.base_dtype={self.base_dtype!r}: bfloat16, float16 or null (fp32)")

    def as_dict(self) -> dict[str, Any]:
        """Plain values (saved beside an exported adapter as ``lora.json``)."""
        return {**asdict(self), "target_modules": list(self.target_modules)}


def _is_regex(pattern: str) -> bool:
    return any(c in pattern for c in ".*+?[]()|^$\\")


def target_names(model: nn.Module, options: LoraOptions) -> list[str]:
    """The full names of the Linear / Conv2d layers the options target (an error names targets that match nothing)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    hits: list[str] = []
    for pattern in options.target_modules:
        if _is_regex(pattern):
            found = [n for n in names if re.fullmatch(pattern, n)]
        else:
            found = [n for n in names if n == pattern or n.endswith("." + pattern)]
        if not found:
            raise ValueError(
                f"stage.lora.target_modules: {pattern!r} matches no Linear or Conv2d layer of the U-Net "
                f"(e.g. {names[:3]})"
            )
        hits += [n for n in found if n not in hits]
    return hits


def add_lora(model: nn.Module, options: LoraOptions | Mapping[str, Any]) -> list[str]:
    """Freeze ``model`` and inject LoRA layers (trainable, B = 0: the model is unchanged until trained) in place;
    returns the adapted layers' names."""
    from peft import LoraConfig, inject_adapter_in_model

    opts = options if isinstance(options, LoraOptions) else LoraOptions(**dict(options))
    targets = target_names(model, opts)
    model.requires_grad_(False)
    config = LoraConfig(
        r=int(opts.rank),
        lora_alpha=float(opts.alpha),  # pyright: ignore[reportArgumentType] - peft types it int, computes alpha / r
        lora_dropout=float(opts.dropout),
        target_modules=targets,
        bias="none",
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    if opts.base_dtype is not None:  # the frozen base at half size; the adapters stay fp32 (autocast runs the step)
        dtype = getattr(torch, opts.base_dtype)
        for param in model.parameters():
            if not param.requires_grad:
                param.data = param.data.to(dtype)
    return targets


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights alone, under the adapted layers' names (``<layer>.lora_A.weight``)."""
    return {
        name.replace(f".{ADAPTER}.", "."): p.detach()
        for name, p in model.named_parameters()
        if ".lora_A." in name or ".lora_B." in name
    }


def load_adapter(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load :func:`adapter_state` weights into a model with the same LoRA layers (every key, exact shapes)."""
    params = dict(model.named_parameters())
    expected = {n.replace(f".{ADAPTER}.", "."): n for n in params if ".lora_A." in n or ".lora_B." in n}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"LoRA adapter does not fit: missing {missing[:3]} ({len(missing)}), unexpected "
            f"{unexpected[:3]} ({len(unexpected)})"
        )
    with torch.no_grad():
        for key, name in expected.items():
            if params[name].shape != state[key].shape:
                raise ValueError(
                    f"LoRA adapter: {key} is {tuple(state[key].shape)}, the model's {tuple(params[name].shape)}"
                )
            params[name].copy_(state[key])


def lora_layers(model: nn.Module) -> list[tuple[str, Any]]:
    """The injected LoRA layers (peft's ``LoraLayer``) with their names."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def set_scale(model: nn.Module, scale: float) -> None:
    """Scale every adapter's update (``scale * alpha / rank``): 1 as trained, 0 the base model."""
    for _, layer in lora_layers(model):
        layer.set_scale(ADAPTER, float(scale))  # type: ignore[operator]


def merge_lora(model: nn.Module, scale: float = 1.0) -> nn.Module:
    """Fold the adapters (at ``scale``) into the base weights and put the plain layers back: the result has the
    base model's keys and class, the adapted weights."""
    set_scale(model, scale)
    for name, layer in lora_layers(model):
        layer.merge(adapter_names=[ADAPTER])  # type: ignore[operator]
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())  # type: ignore[operator]
    return model


class AdapterExport(nn.Module):
    """What a LoRA run exports: ``state_dict()`` is the adapter alone (from ``model``, not registered as a
    submodule), ``export_config()`` the options and the base they were trained on (``lora.json``)."""

    def __init__(self, model: nn.Module, options: LoraOptions, base: str | None) -> None:
        super().__init__()
        self._model = (model,)  # a tuple: not a submodule, so the base is never part of this module's state
        self.options, self.base = options, base

    @override
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return adapter_state(self._model[0])  # detached views: the export streams them to disk

    def export_config(self) -> dict[str, Any]:
        """``lora.json``: the adapter's options and its base (the folder ``stage.init_weights`` named)."""
        return {"lora": self.options.as_dict(), "base": self.base}
