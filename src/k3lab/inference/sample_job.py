"""The work behind ``python -m k3lab.sample`` (usage: :mod:`k3lab.sample`): prompts read, images sampled in batches
and written with ``metadata.jsonl``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from k3lab.diffusion import SamplingSettings
from k3lab.io.checkpoint import atomic_write_bytes
from k3lab.io.imaging import to_uint8

log = logging.getLogger("k3lab.sample")


def read_prompts(prompts: list[str], prompt_file: str | None) -> list[dict]:
    """Prompt rows ``{"prompt_id", "prompt", ...}`` from the command line and/or a file (.txt: one per line;
    .jsonl: a "prompt" or "text" field, plus "id"/"prompt_id", "category", "spec" and "negative" carried into the
    metadata)."""
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
                extra = {k: row[k] for k in ("category", "spec", "negative") if k in row}
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


def progress(bar: Any, images: int) -> Any:
    """A sampler callback that advances ``bar`` by one step of ``images`` images."""
    return lambda i, t, x0: bar.update(images)


def sample(args: argparse.Namespace) -> int:
    """The command's work (see :func:`main`)."""
    from k3lab.inference.loading import load_generator

    rows_in = read_prompts(args.prompt, args.prompt_file)
    jobs = [(row, args.seed + k) for row in rows_in for k in range(args.num_per_prompt)]
    generator, cfg = load_generator(
        args.checkpoint,
        args.device,
        args.text_encoder,
        args.unet_preset,
        args.sequential,
        args.text_encoder_dtype,
        lora=getattr(args, "lora", None),
        lora_scale=float(getattr(args, "lora_scale", 1.0)),
    )
    generator.unet_dtype = args.unet_dtype or ("bfloat16" if str(args.device).startswith("cuda") else "float32")
    if args.compile != "off":
        generator.compile_unet(None if args.compile == "default" else args.compile)
    resolution = int(args.resolution or cfg.data.resolution)
    edit = editing_inputs(args, resolution)
    settings = SamplingSettings.of_run(cfg).updated(
        sampler=args.sampler, steps=args.steps, guidance=args.guidance, negative_prompt=args.negative
    )
    threshold = generator.x0_threshold  # the run's stage's own (older runs predate the sampling group)
    if args.x0_threshold is not None:
        threshold = None if args.x0_threshold.lower() == "none" else float(args.x0_threshold)
    settings = replace(settings, x0_threshold=threshold)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    batches = [jobs[start : start + args.batch_size] for start in range(0, len(jobs), args.batch_size)]
    negatives = [_negatives(batch, settings.negative_prompt) for batch in batches]

    def encode_batch(b: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None]:
        seeds = [s for _, s in batches[b]]
        cond = generator.encode([row["prompt"] for row, _ in batches[b]], seeds)
        negative = negatives[b]
        return cond, generator.encode(negative, seeds) if negative is not None else None

    encoded = None
    if args.free_text_encoder:  # encode everything first, then drop the encoder before the U-Net runs
        encoded = [_to(encode_batch(b), "cpu") for b in range(len(batches))]
        generator.free_text_encoder()
    bar = tqdm(total=len(jobs) * settings.steps, desc="sampling", unit="step", file=sys.stdout)
    for b, batch in enumerate(batches):
        seeds = [seed for _, seed in batch]
        cond, negative = _to(encoded[b] if encoded is not None else encode_batch(b), generator.device)
        images = generator.sample_with(
            settings,
            cond,
            seeds,
            resolution,
            callback=progress(bar, len(batch)),
            negative=negative,
            image=edit["image"].expand(len(batch), -1, -1, -1) if edit["image"] is not None else None,
            mask=edit["mask"].expand(len(batch), -1, -1, -1) if edit["mask"] is not None else None,
            strength=args.strength,
            blend=args.blend,
        )
        for (row, seed), image in zip(batch, images, strict=False):
            name = f"{row['prompt_id'].replace('/', '_')}_{seed}.png"
            Image.fromarray(to_uint8(image)).save(out / name)
            rows.append(
                {
                    "file": name,
                    **row,
                    "seed": seed,
                    "sampler": settings.sampler,
                    "steps": settings.steps,
                    "x0_threshold": settings.x0_threshold,
                    "guidance": settings.guidance,
                    "unet_dtype": generator.unet_dtype,
                    "resolution": resolution if edit["image"] is None else list(edit["image"].shape[-2:]),
                    "checkpoint": str(Path(args.checkpoint).resolve()),
                    **({"negative": neg[batch.index((row, seed))]} if (neg := negatives[b]) is not None else {}),
                    **edit["meta"],
                }
            )
        atomic_write_bytes(out / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    bar.close()
    log.info("wrote %d images and metadata.jsonl to %s", len(rows), out)
    return 0


def editing_inputs(args: argparse.Namespace, resolution: int) -> dict[str, Any]:
    """The input image and hole mask (both None for text to image) and their metadata, checked up front."""
    from k3lab.inference.editing import outpaint_canvas, parse_outpaint
    from k3lab.io.imaging import load_image, load_mask

    if args.image is None:
        for flag in ("mask", "outpaint"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag} needs --image")
        if args.strength != 1.0:
            raise ValueError("--strength needs --image (image to image)")
        return {"image": None, "mask": None, "meta": {}}
    if args.mask is None and args.outpaint is None and args.strength == 1.0:
        raise ValueError("--image needs --mask (inpainting), --outpaint or --strength < 1 (image to image)")
    size = (resolution, resolution) if args.resolution else None
    image = load_image(args.image, size)
    mask = load_mask(args.mask, (image.shape[-2], image.shape[-1])) if args.mask else None
    meta: dict[str, Any] = {"image": str(Path(args.image).resolve()), "strength": args.strength, "blend": args.blend}
    if args.mask:
        meta["mask"] = str(Path(args.mask).resolve())
    if args.outpaint:
        pad = parse_outpaint(args.outpaint)
        image, border = outpaint_canvas(image, pad)
        mask = border if mask is None else torch.maximum(border, torch.nn.functional.pad(mask, _pads(pad)))
        meta["outpaint"] = pad
    return {"image": image, "mask": mask, "meta": meta}


def _pads(pad: dict[str, int]) -> tuple[int, int, int, int]:
    return pad["left"], pad["right"], pad["top"], pad["bottom"]


def _negatives(batch: list[tuple[dict, int]], default: str | None) -> list[str] | None:
    """Each image's negative prompt (its row's, else ``--negative``), or None when no image has one."""
    values = [row.get("negative", default) for row, _ in batch]
    return None if all(v is None for v in values) else [str(v or "") for v in values]


def _to(pair: tuple, device: str | torch.device) -> tuple:
    cond, negative = pair
    move = lambda c: tuple(t.to(device) for t in c)  # noqa: E731
    return move(cond), move(negative) if negative is not None else None
