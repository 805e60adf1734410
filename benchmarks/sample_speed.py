"""Seconds per image, prompt to pixels: k3lab's sampler against diffusers' ``Kandinsky3Pipeline`` on the same random
weights, in one process (text encoding, every denoising step with classifier-free guidance, MoVQ decoding).

A random diffusers pipeline with the Kandinsky 3 U-Net topology (4 levels x 3 block triples, attention on levels 2-4)
at a reduced width, a random MoVQ and a tiny T5 is written with ``save_pretrained``, converted by
``python -m k3lab.convert diffusers`` and both are timed at the same resolution, steps and guidance (w = 3):
the official sampler (diffusers: its DDPM scheduler; k3lab: ``diffusers_ddpm``, the same updates, and
``kandinsky3``) and DPM-Solver++ (diffusers: ``DPMSolverMultistepScheduler``; k3lab: ``dpmpp_2m``).

    .venv/bin/python benchmarks/sample_speed.py                                  # CPU: width 32, 512 px
    .venv/bin/python benchmarks/sample_speed.py --device cuda --width 384 --resolution 1024 --dtype bf16 --compile
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from _report import matmul_gflops, report


def build_pipeline(root: Path, width: int, text_dim: int) -> Path:
    """A random Kandinsky3Pipeline at ``width`` (official: 384) written to ``root/pipeline``."""
    import diffusers
    from transformers import AutoTokenizer, T5EncoderModel

    from k3lab.convert.formats import diffusers_movq_config
    from k3lab.data.scene_captions import caption_vocabulary
    from k3lab.nn.tiny_t5 import build_tiny_t5

    t5 = build_tiny_t5(root / "t5", caption_vocabulary(), d_model=text_dim, d_ff=2 * text_dim)
    torch.manual_seed(0)
    unet = diffusers.Kandinsky3UNet(
        in_channels=4,
        time_embedding_dim=4 * width,
        groups=math.gcd(32, width // 2),  # official 32 (the bottleneck halves the width)
        attention_head_dim=min(64, width),  # official 64
        layers_per_block=3,
        block_out_channels=(width, 2 * width, 4 * width, 8 * width),
        cross_attention_dim=4 * width,
        encoder_hid_dim=text_dim,
    )
    movq = diffusers.VQModel(
        **{
            k: v
            for k, v in diffusers_movq_config(
                dict(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, z_channels=4, embed_dim=4, n_embed=256)
            ).items()
            if not k.startswith("_")
        }
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # no zero-initialised layers: every path computes
        for module in (unet, movq):
            for q in module.parameters():
                q.add_(torch.randn(q.shape, generator=g) * 0.02)
    scheduler = diffusers.DDPMScheduler(
        beta_schedule="squaredcos_cap_v2", clip_sample=True, steps_offset=1, timestep_spacing="leading"
    )
    pipe = diffusers.Kandinsky3Pipeline(
        tokenizer=AutoTokenizer.from_pretrained(t5),
        text_encoder=T5EncoderModel.from_pretrained(t5),
        unet=unet.eval(),
        scheduler=scheduler,
        movq=movq.eval(),
    )
    pipe.save_pretrained(root / "pipeline")
    return root / "pipeline"


def seconds(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Best of ``repeats`` timed calls (warm both sides up first: see ``main``)."""

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    import diffusers

    from k3lab.convert.__main__ import main as convert
    from k3lab.inference.loading import load_generator

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=32, help="first level width (official: 384)")
    p.add_argument("--resolution", type=int, default=512, help="image side in pixels (official: 1024)")
    p.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    p.add_argument("--text-dim", type=int, default=64, help="text encoder width (official Flan-UL2: 4096)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="both: U-Net and MoVQ under autocast")
    p.add_argument("--compile", action="store_true", help="k3lab: regional torch.compile of the U-Net blocks")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="k3lab_sample_speed_"))
    pipeline = build_pipeline(root, args.width, args.text_dim)
    if convert(["diffusers", str(pipeline), "--out", str(root / "k3")]) != 0:
        raise SystemExit("the conversion of the random pipeline failed (see above)")
    gen, _ = load_generator(root / "k3", args.device, text_encoder_dtype="float32")
    gen.unet_dtype = "bfloat16" if args.dtype == "bf16" else "float32"
    gen.x0_threshold = 0.99  # the official sampler's thresholding (diffusers' DDPM: clip_sample)
    if args.compile:
        gen.compile_unet()
    pipe = diffusers.Kandinsky3Pipeline.from_pretrained(pipeline).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    dpm = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    ddpm = pipe.scheduler
    prompt = "a red circle to the left of a blue square"
    enabled = args.dtype == "bf16"

    def ours(sampler: str, steps: int) -> Callable[[], object]:
        def run() -> object:
            cond = gen.encode([prompt], [0])
            return gen.sample(cond, [0], args.resolution, sampler, steps, 3.0)

        return run

    def theirs(scheduler: object, steps: int) -> Callable[[], object]:
        def run() -> object:
            pipe.scheduler = scheduler
            with torch.no_grad(), torch.autocast(torch.device(args.device).type, torch.bfloat16, enabled=enabled):
                return pipe(
                    prompt,
                    num_inference_steps=steps,
                    guidance_scale=3.0,
                    height=args.resolution,
                    width=args.resolution,
                    generator=torch.Generator().manual_seed(0),
                    output_type="pt",
                ).images

        return run

    res: dict[str, object] = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "matmul_gflops_fp32": matmul_gflops(),
        "unet_params": sum(q.numel() for q in gen.unet.parameters()),
        "resolution": args.resolution,
        "latent": args.resolution // 8,
        "k3lab_compiled": args.compile,
    }
    warm = time.perf_counter()  # one short call each: allocations, any compile, lazy imports
    ours("diffusers_ddpm", 2)()
    res["k3lab warm-up, 2 steps incl. any compile (s)"] = time.perf_counter() - warm
    theirs(ddpm, 2)()
    for steps in args.steps:
        for label, sampler, scheduler in (("official", "diffusers_ddpm", ddpm), ("dpm++", "dpmpp_2m", dpm)):
            a = seconds(ours(sampler, steps), args.device, args.repeats)
            b = seconds(theirs(scheduler, steps), args.device, args.repeats)
            res[f"{label} {steps} steps: k3lab s/image"] = a
            res[f"{label} {steps} steps: diffusers s/image"] = b
            res[f"{label} {steps} steps: ratio k3lab / diffusers"] = a / b
        res[f"kandinsky3 sampler {steps} steps: k3lab s/image"] = seconds(
            ours("kandinsky3", steps), args.device, args.repeats
        )
    if len(args.steps) >= 2:  # the denoising loop alone: the fixed costs (text, MoVQ decoding) cancel
        lo, hi = min(args.steps), max(args.steps)
        for label in ("official", "dpm++"):
            per = {
                side: (res[f"{label} {hi} steps: {side} s/image"] - res[f"{label} {lo} steps: {side} s/image"])  # type: ignore[operator]
                / (hi - lo)
                for side in ("k3lab", "diffusers")
            }
            res[f"{label}: s per step ({hi} - {lo} steps), k3lab"] = per["k3lab"]
            res[f"{label}: s per step ({hi} - {lo} steps), diffusers"] = per["diffusers"]
    res["matmul_gflops_fp32_after"] = matmul_gflops()
    report(
        f"seconds per {args.resolution} px image, k3lab vs diffusers Kandinsky3Pipeline (width {args.width}, "
        f"{res['device']}, {args.dtype}, torch {torch.__version__})",
        res,
        args.out,
    )


if __name__ == "__main__":
    main()
