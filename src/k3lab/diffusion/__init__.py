"""Diffusion math (schedules, losses, samplers, guidance) as functions; filled by the diffusion-stage issue."""
