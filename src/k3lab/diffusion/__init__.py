"""Diffusion as functions: schedules, the training loss, samplers (one signature) and guidance."""

from k3lab.diffusion.guidance import cfg_denoiser, guide
from k3lab.diffusion.loss import diffusion_loss, to_epsilon
from k3lab.diffusion.samplers import SAMPLERS, get_sampler, sample_ddim, sample_dpmpp_2m, sample_kandinsky3
from k3lab.diffusion.schedule import Schedule
from k3lab.diffusion.settings import DEFAULT_SAMPLING, SamplingSettings

__all__ = [
    "SamplingSettings",
    "DEFAULT_SAMPLING",
    "Schedule",
    "diffusion_loss",
    "to_epsilon",
    "SAMPLERS",
    "get_sampler",
    "sample_kandinsky3",
    "sample_ddim",
    "sample_dpmpp_2m",
    "cfg_denoiser",
    "guide",
]
