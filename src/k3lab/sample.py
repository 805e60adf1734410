"""Sample a trained diffusion run: ``python -m k3lab.sample <checkpoint> --prompt "a red circle" [--prompt-file F]``.

Writes ``<out>/<prompt_id>_<seed>.png`` and ``<out>/metadata.jsonl`` (one line per image: file, prompt_id,
prompt, seed, sampler, steps, guidance, resolution, checkpoint; category/spec from a .jsonl prompt file), the
layout ``python -m evaluation`` reads. The checkpoint is a diffusion run's checkpoints folder, its
exported ``unet.safetensors``, or a Lightning ``.ckpt`` there.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from k3lab.checkpoint import CheckpointError, atomic_write_bytes
from k3lab.diffusion import SAMPLERS
from k3lab.imaging import to_uint8

log = logging.getLogger("k3lab.sample")


def read_prompts(prompts: list[str], prompt_file: str | None) -> list[dict]:
    """Prompt rows ``{"prompt_id", "prompt", ...}`` from the command line and/or a file (.txt: one per line;
    .jsonl: a "prompt" or "text" field, plus "id"/"prompt_id", "category" and "spec" carried into the metadata)."""
    out = [{"prompt_id": f"cli{i:04d}", "prompt": q} for i, q in enumerate(prompts)]
    if prompt_file:
        path = Path(prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                row = json.loads(line)
                text = row.get("prompt", row.get("text"))
                if text is None:
                    raise ValueError(f"{path}:{i + 1}: no 'prompt' or 'text' field")
                extra = {k: row[k] for k in ("category", "spec") if k in row}
                out.append(
                    {
                        "prompt_id": str(row.get("prompt_id", row.get("id", f"line{i + 1:05d}"))),
                        "prompt": str(text),
                        **extra,
                    }
                )
            else:
                out.append({"prompt_id": f"line{i + 1:05d}", "prompt": line.strip()})
    if not out:
        raise ValueError("no prompts: give --prompt and/or --prompt-file")
    return out


def main(argv: list[str] | None = None) -> int:
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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return sample(args)
    except (FileNotFoundError, CheckpointError, ValueError) as e:  # one line naming the problem, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


def sampling_defaults(cfg: DictConfig) -> dict[str, Any]:
    """The run's sampling settings (the ``sampling`` group; older runs: the stage's validation settings)."""
    if OmegaConf.select(cfg, "sampling") is not None:
        s = cfg.sampling
        return {"sampler": str(s.sampler), "steps": int(s.steps), "guidance": float(s.guidance)}
    st = cfg.stage
    return {
        "sampler": str(st.get("sampler", "kandinsky3")),
        "steps": int(st.get("sample_steps", 50)),
        "guidance": float(st.get("guidance_weight", 3.0)),
    }


def progress(bar: Any, images: int) -> Any:
    """A sampler callback that advances ``bar`` by one step of ``images`` images."""
    return lambda i, t, x0: bar.update(images)


def sample(args: argparse.Namespace) -> int:
    """The command's work (see :func:`main`)."""
    from k3lab.generate import load_generator

    rows_in = read_prompts(args.prompt, args.prompt_file)
    jobs = [(row, args.seed + k) for row in rows_in for k in range(args.num_per_prompt)]
    generator, cfg = load_generator(
        args.checkpoint, args.device, args.text_encoder, args.unet_preset, args.sequential, args.text_encoder_dtype
    )
    resolution = int(args.resolution or cfg.data.resolution)
    for key, value in sampling_defaults(cfg).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.x0_threshold is not None:
        generator.x0_threshold = None if args.x0_threshold.lower() == "none" else float(args.x0_threshold)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    batches = [jobs[start : start + args.batch_size] for start in range(0, len(jobs), args.batch_size)]
    encoded = None
    if args.free_text_encoder:  # encode everything first, then drop the encoder before the U-Net runs
        encoded = [
            tuple(t.cpu() for t in generator.encode([row["prompt"] for row, _ in batch], [s for _, s in batch]))
            for batch in batches
        ]
        generator.free_text_encoder()
    bar = tqdm(total=len(jobs) * args.steps, desc="sampling", unit="step", file=sys.stdout)
    for b, batch in enumerate(batches):
        seeds = [seed for _, seed in batch]
        cond = encoded[b] if encoded is not None else generator.encode([row["prompt"] for row, _ in batch], seeds)
        images = generator.sample(
            tuple(c.to(generator.device) for c in cond),
            seeds,
            resolution,
            args.sampler,
            args.steps,
            args.guidance,
            callback=progress(bar, len(batch)),
        )
        for (row, seed), image in zip(batch, images, strict=False):
            name = f"{row['prompt_id'].replace('/', '_')}_{seed}.png"
            Image.fromarray(to_uint8(image)).save(out / name)
            rows.append(
                {
                    "file": name,
                    **row,
                    "seed": seed,
                    "sampler": args.sampler,
                    "steps": args.steps,
                    "x0_threshold": generator.x0_threshold,
                    "guidance": args.guidance,
                    "resolution": resolution,
                    "checkpoint": str(Path(args.checkpoint).resolve()),
                }
            )
        atomic_write_bytes(out / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    bar.close()
    log.info("wrote %d images and metadata.jsonl to %s", len(rows), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
