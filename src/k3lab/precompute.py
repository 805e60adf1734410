"""Encode a dataset's captions (and optionally first-stage latents) once into webdataset shards.

    python -m k3lab.precompute experiment=text2image_tiny stage.first_stage.checkpoint=<autoencoder.safetensors> \
        precompute.latents=true

Each output sample keeps the original members (image, caption, metadata) and adds ``text.npy`` (the frozen
encoder's hidden states for the real tokens, [L, D] float32) and ``latent.npy`` ([C, h, w], unscaled). Train
on them with ``data=precomputed stage.text_encoder=null`` (the command is printed at the end): the frozen
encoders then never run in a training step. Bad samples are skipped and counted as in training.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from k3lab.data.precompute import precompute
from k3lab.run.config import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    """Compose the config and write the precomputed shards."""
    precompute(cfg)


if __name__ == "__main__":
    main()
