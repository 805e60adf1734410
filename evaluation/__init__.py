"""k3lab's evaluation package: metrics for images from any model. It never imports k3lab.

Modules: ``prompts`` (prompt sets and loaders), ``images`` (folders, shards, generators), ``detector`` and
``compbench`` (the scene world's compositional benchmark), ``fid`` (FID/KID through clean-fid),
``clip_score`` and ``reference_clip`` (CLIP score, the evaluation's own CLIP), ``preference`` (PickScore and HPSv2
from local weights), ``metrics`` (the registry), ``sbs`` and ``stats`` (human side-by-side export, ingestion and
statistics), ``agreement`` (metrics against human verdicts, noise floors, FID-infinity), ``suite`` (every prompt set
in one command), ``scorefile`` and ``compare`` (hashed score files, compared prompt by prompt). Command line:
``python -m evaluation --help``.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
