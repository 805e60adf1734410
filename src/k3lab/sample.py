"""Sample a trained diffusion run: ``python -m k3lab.sample <checkpoint> --prompt "a red circle" [--prompt-file F]``.

Editing: ``--negative "..."`` (every mode; the unconditional branch of guidance), ``--image IMG --mask MASK``
(inpainting with an inpainting run; white = the region to generate, the rest pasted back), ``--image IMG --outpaint
left=64,top=32`` (outpainting: the canvas grows by those pixels), ``--image IMG --strength 0.6`` (image to image).

Writes ``<out>/<prompt_id>_<seed>.png`` and ``<out>/metadata.jsonl`` (one line per image: file, prompt_id,
prompt, seed, sampler, steps, guidance, resolution, checkpoint; category/spec from a .jsonl prompt file), the
layout ``python -m evaluation`` reads. The checkpoint is a diffusion run's checkpoints folder, its
exported ``unet.safetensors``, or a Lightning ``.ckpt`` there.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from k3lab.diffusion import SAMPLERS
from k3lab.inference.sample_job import sample
from k3lab.io.checkpoint import CheckpointError


def main(argv: list[str] | None = None) -> int:
    """Parse the sampling arguments and sample; bad input prints one error line and returns 2."""
    p = argparse.ArgumentParser(
        prog="python -m k3lab.sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", help="diffusion run checkpoints folder, unet.safetensors, or .ckpt")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help=".txt (one per line) or .jsonl with a prompt/text field")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS), help="default: the run's sampling.sampler")
    p.add_argument("--steps", type=int, default=None, help="default: the run's sampling.steps")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="w in eps = (w+1) eps_cond - w eps_uncond (default: the run's sampling.guidance)",
    )
    p.add_argument("--resolution", type=int, default=None, help="default: the run's training resolution")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument(
        "--x0-threshold",
        default=None,
        help="dynamic-thresholding quantile, or 'none' (default: the run's sampling.x0_threshold)",
    )
    p.add_argument("--negative", default=None, help="negative prompt for every image (.jsonl rows: 'negative')")
    p.add_argument("--image", default=None, help="input image: inpainting (--mask), outpainting, image to image")
    p.add_argument("--mask", default=None, help="mask image, white (>= 128) = the region to generate (inpainting)")
    p.add_argument("--outpaint", default=None, help="grow the canvas: side=pixels pairs, e.g. left=64,bottom=32")
    p.add_argument(
        "--strength", type=float, default=1.0, help="image to image: 0 keeps the input, 1 ignores it (default 1)"
    )
    p.add_argument(
        "--blend", default="pixel", choices=["pixel", "latent", "none"], help="paste-back of the kept region"
    )
    p.add_argument(
        "--lora", default=None, help="a LoRA adapter: a LoRA run's checkpoints folder or its lora.safetensors"
    )
    p.add_argument("--lora-scale", type=float, default=1.0, help="the adapter's strength: 1 as trained, 0 the base")
    p.add_argument("--num-per-prompt", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--sequential",
        action="store_true",
        help="keep modules on the CPU and move each to --device only while it runs (24-40 GB GPUs)",
    )
    p.add_argument("--free-text-encoder", action="store_true", help="drop the text encoder after encoding all prompts")
    p.add_argument("--text-encoder", default=None, help="override the text encoder's local folder")
    p.add_argument(
        "--unet-preset",
        default=None,
        help="refuse a checkpoint that does not hold this model/unet preset (e.g. kandinsky3)",
    )
    p.add_argument(
        "--text-encoder-dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="override the encoder's dtype",
    )
    p.add_argument(
        "--unet-dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="the U-Net's autocast dtype (default: bfloat16 on a GPU, float32 on the CPU)",
    )
    p.add_argument(
        "--compile",
        default="off",
        choices=["off", "default", "reduce-overhead", "max-autotune"],
        help="regional torch.compile of the U-Net blocks (reduce-overhead adds CUDA graphs); pays off over many steps",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return sample(args)
    except (FileNotFoundError, CheckpointError, ValueError) as e:  # one line naming the problem, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
