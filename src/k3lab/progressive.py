"""Progressive training as Kandinsky 3 did it (256 -> 384 -> 512 -> 768 -> mixed 768-1024 px): one diffusion run per
stage, each initialised from the previous stage's exported U-Net and conditioning, its latent scale carried over.

    python -m k3lab.progressive experiment=progressive_tiny            # the CPU chain on the scene world
    python -m k3lab.progressive experiment=kandinsky3_progressive "data.shards.train='/data/{00000..09999}.tar'"

The config's ``progressive.stages`` is a list of ``{name, overrides}``: ``overrides`` maps dotted config keys to the
values of that stage (``data.resolution``, ``data.aspect_buckets``, ``trainer.max_steps``, ...). Each stage is a run
folder ``<run>/<i>_<name>`` with its own MLflow run; ``chain.json`` in ``<run>`` records every finished stage, so a
chain restarted with ``hydra.run.dir=<run>`` skips them and goes on from the last one's weights.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from k3lab.run.config import CONF_DIR
from k3lab.run.progressive import run_chain

log = logging.getLogger("k3lab.progressive")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    """Compose the config and run the progressive chain, logging each stage's folder and metrics."""
    for record in run_chain(cfg):
        log.info("progressive: %s -> %s %s", record["folder"], record["checkpoint_dir"], record["metrics"])


if __name__ == "__main__":
    main()
