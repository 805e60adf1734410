"""Convert Kandinsky 3 weights: ``python -m k3lab.convert {official,diffusers,to-diffusers,consolidate,merge-lora}``.

    python -m k3lab.convert official weights/kandinsky3.pt [--projection weights/flan_ul2_encoder/projection.pt] \\
        --movq weights/kandinsky-3/movq --text-encoder weights/flan-ul2 --out weights/k3-converted
    python -m k3lab.convert official weights/kandinsky3_inpainting.pt --inpainting --movq ... --out weights/k3-inpaint
    python -m k3lab.convert diffusers weights/kandinsky-3 [--variant fp16] --out weights/k3-converted
    python -m k3lab.convert to-diffusers logs/text2image_tiny/runs/<time>/checkpoints --out exported/ \\
        [--text-encoder DIR]
    python -m k3lab.convert consolidate logs/<task>/runs/<time>/checkpoints/last.ckpt   # trainer=fsdp's sharded folder
    python -m k3lab.convert merge-lora logs/<task>/runs/<time>/checkpoints --out weights/k3-mine   # LoRA into its base

The first two write a k3lab folder (config.yaml + unet / text_conditioning / latent_scale safetensors, movq/)
that ``python -m k3lab.sample`` samples and ``stage.init_weights`` fine-tunes from; the last writes a
diffusers ``Kandinsky3Pipeline`` folder. Every key is checked: a missing, unexpected or mis-shaped one is an
error that names it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from k3lab.convert.formats import load_diffusers_movq, read_diffusers_unet, read_official
from k3lab.convert.k3lab_io import to_diffusers, write_k3lab, write_movq
from k3lab.io.checkpoint import CheckpointError

log = logging.getLogger("k3lab.convert")


def _movq(path: str | None, out: Path, variant: str | None) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        movq, kwargs = load_diffusers_movq(p, variant)
        return write_movq(out / "movq", movq, kwargs)
    if p.suffix == ".safetensors":
        return p.resolve()  # already an autoencoder-stage export (config.yaml beside it)
    raise FileNotFoundError(
        f"--movq {path}: give a diffusers movq/ folder or an autoencoder.safetensors with its config.yaml"
    )


def main(argv: list[str] | None = None) -> int:
    """Run one conversion subcommand; a bad checkpoint prints one error line and returns 2."""
    p = argparse.ArgumentParser(
        prog="python -m k3lab.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    o = sub.add_parser("official", help="official kandinsky3.pt (3.0, or 3.1 with --projection) -> k3lab")
    o.add_argument("checkpoint")
    o.add_argument("--projection", help="3.1: flan_ul2_encoder/projection.pt")
    o.add_argument("--movq", help="diffusers movq/ folder or an autoencoder.safetensors")
    o.add_argument("--text-encoder", help="local Flan-UL2 folder (save_pretrained layout)")
    o.add_argument("--inpainting", action="store_true", help="the inpainting checkpoint (9-channel U-Net)")
    o.add_argument("--out", required=True)
    d = sub.add_parser("diffusers", help="diffusers pipeline folder (unet/, movq/) -> k3lab")
    d.add_argument("pipeline")
    d.add_argument("--variant", default=None, help="e.g. fp16 for diffusion_pytorch_model.fp16.safetensors")
    d.add_argument("--text-encoder", help="default: the pipeline's own text_encoder/ when present")
    d.add_argument("--out", required=True)
    e = sub.add_parser("to-diffusers", help="k3lab diffusion checkpoint folder -> diffusers Kandinsky3Pipeline folder")
    e.add_argument("checkpoint")
    e.add_argument("--text-encoder", help="local T5-family folder to include (default: the run's own)")
    e.add_argument("--out", required=True)
    c = sub.add_parser("consolidate", help="a sharded checkpoint folder (trainer=fsdp) -> one Lightning .ckpt")
    c.add_argument("checkpoint", help="the folder, e.g. <run>/checkpoints/last.ckpt/")
    c.add_argument("--out", default=None, help="default: <name>.consolidated.ckpt beside it (with the run's config)")
    m = sub.add_parser("merge-lora", help="a LoRA run (adapter + base) -> a k3lab export with the adapter merged in")
    m.add_argument("run", help="the LoRA run's checkpoints folder (lora.safetensors, lora.json) or lora.safetensors")
    m.add_argument("--base", default=None, help="the base export (default: the base named in lora.json)")
    m.add_argument("--scale", type=float, default=1.0, help="the adapter's strength merged in (default 1)")
    m.add_argument("--out", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        convert(args)
    except (
        FileNotFoundError,
        FileExistsError,
        CheckpointError,
        ValueError,
    ) as e:  # one line naming the problem, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def check_inpainting(path: str, kwargs: dict, inpainting: bool) -> None:
    """``--inpainting`` and the checkpoint's U-Net must agree (9 input channels = 2 x 4 latent + 1 mask)."""
    channels, latent = int(kwargs["in_channels"]), int(kwargs["out_channels"])
    if inpainting and channels != 2 * latent + 1:
        raise CheckpointError(
            f"{path}: --inpainting, but its U-Net reads {channels} input channels (an inpainting U-Net reads "
            f"{2 * latent + 1}: x_t, mask, masked latent)"
        )
    if not inpainting and channels != latent:
        raise CheckpointError(
            f"{path}: its U-Net reads {channels} input channels"
            + (": the inpainting checkpoint, convert it with --inpainting" if channels == 2 * latent + 1 else "")
        )


def convert(args: argparse.Namespace) -> None:
    """The command's work (see :func:`main`)."""
    if args.command == "consolidate":
        from k3lab.convert.consolidate import consolidate

        log.info("wrote %s", consolidate(args.checkpoint, args.out))
        return
    if args.command == "merge-lora":
        from k3lab.convert.lora import merge_lora_export

        log.info("wrote %s", merge_lora_export(Path(args.run), Path(args.out), args.base, args.scale))
        return
    out = Path(args.out).resolve()
    if args.command == "official":
        unet, cond, kwargs = read_official(Path(args.checkpoint), Path(args.projection) if args.projection else None)
        check_inpainting(args.checkpoint, kwargs, args.inpainting)
        write_k3lab(
            out,
            unet,
            kwargs,
            cond,
            _movq(args.movq, out, None),
            args.text_encoder,
            f"official:{args.checkpoint}",
            inpainting=args.inpainting,
        )
    elif args.command == "diffusers":
        pipe = Path(args.pipeline)
        unet, cond, kwargs = read_diffusers_unet(pipe / "unet", args.variant)
        encoder = args.text_encoder
        if encoder is None and (pipe / "text_encoder").is_dir():
            from k3lab.convert.k3lab_io import copy_text_encoder

            encoder = str(copy_text_encoder(pipe, out / "text_encoder"))
        movq = _movq(str(pipe / "movq"), out, args.variant) if (pipe / "movq").is_dir() else None
        write_k3lab(out, unet, kwargs, cond, movq, encoder, f"diffusers:{pipe}")
    else:
        to_diffusers(Path(args.checkpoint), out, args.text_encoder)
    log.info("wrote %s", out)


if __name__ == "__main__":
    raise SystemExit(main())
