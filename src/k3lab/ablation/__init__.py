"""Ablation sweeps: shared parts trained once per sweep (or cache), one diffusion cell per job, evaluation."""
