"""Text-encoder factories that bind a generic encoder to this project's data (the Hydra targets of
``conf/model/text_encoder``); the encoders themselves live in :mod:`k3lab.nn.text_encoder`."""

from __future__ import annotations

import logging
from pathlib import Path

from k3lab.nn.text_encoder import TextEncoder

log = logging.getLogger(__name__)


def tiny_t5(
    path: str,
    seed: int = 0,
    d_model: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    d_ff: int = 128,
    **kwargs: object,
) -> TextEncoder:
    """The embedded default's encoder: a randomly initialised T5 with an offline word-level tokenizer over
    the scene-world vocabulary, written to ``path`` on first use (seeded, so every machine gets the same
    weights) and then loaded back through :class:`TextEncoder` like any other encoder."""
    from k3lab.data.scene_captions import caption_vocabulary
    from k3lab.nn.tiny_t5 import build_tiny_t5

    if not (Path(path) / "config.json").is_file():
        build_tiny_t5(
            path,
            caption_vocabulary(),
            seed=seed,
            d_model=d_model,
            num_layers=num_layers,
            num_heads=num_heads,
            d_ff=d_ff,
        )
        log.info("built the tiny random T5 text encoder in %s", path)
    return TextEncoder(path, **kwargs)  # type: ignore[arg-type]
