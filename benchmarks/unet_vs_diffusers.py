"""k3lab's Kandinsky 3 U-Net against diffusers' Kandinsky3UNet with identical weights, same inputs, one process.

Forward and forward+backward, several repeats (median), reporting k3lab time / diffusers time (goal <= 1.0).
The default is a mid-size configuration: the full Kandinsky 3 topology (4 levels x 3 block triples, attention
on levels 1-3) at 1/6 width (64/128/256/512, 79.3M parameters) on 32x32x4 latents with 64 text tokens.

    .venv/bin/python benchmarks/unet_vs_diffusers.py                         # fp32 on CPU
    .venv/bin/python benchmarks/unet_vs_diffusers.py --device cuda --dtype bf16 --batch 8 --width 128
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from k3lab.convert.formats import load_diffusers_unet

from _report import report


def timed(fn: Callable[[], object], repeats: int, device: str) -> float:
    """Median seconds per call after two warm-up calls."""

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    from diffusers import Kandinsky3UNet

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=64, help="first level width (official: 384)")
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    w = args.width
    config = dict(
        in_channels=4,
        time_embedding_dim=4 * w,
        groups=32,
        attention_head_dim=64,
        layers_per_block=3,
        block_out_channels=(w, 2 * w, 4 * w, 8 * w),
        cross_attention_dim=4 * w,
        encoder_hid_dim=4 * w,
    )
    peer = Kandinsky3UNet(**config)
    with torch.no_grad():
        for q in peer.parameters():
            q.add_(torch.randn_like(q) * 0.02)  # no zero-initialised layers: every path computes
    folder = Path(tempfile.mkdtemp(prefix="k3lab_unet_bench_"))
    peer.save_pretrained(folder)
    ours, cond, _ = load_diffusers_unet(folder)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    peer, ours, cond = (m.to(args.device, dtype).train() for m in (peer, ours, cond))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, args.latent, args.latent, generator=g).to(args.device, dtype)
    t = torch.randint(0, 1000, (args.batch,), generator=g).to(args.device)
    hidden = torch.randn(args.batch, args.tokens, 4 * w, generator=g).to(args.device, dtype)
    mask = torch.ones(args.batch, args.tokens, dtype=torch.long, device=args.device)

    def k3(backward: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.set_grad_enabled(backward):
                out = ours(x, t, *cond(hidden, mask.bool()))
                if backward:
                    ours.zero_grad(set_to_none=True)
                    out.float().pow(2).mean().backward()

        return run

    def df(backward: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.set_grad_enabled(backward):
                out = peer(x, t, hidden, mask).sample
                if backward:
                    peer.zero_grad(set_to_none=True)
                    out.float().pow(2).mean().backward()

        return run

    with torch.no_grad():
        diff = (ours(x, t, *cond(hidden, mask.bool())) - peer(x, t, hidden, mask).sample).abs().max().item()
    res: dict[str, object] = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "params": sum(q.numel() for q in peer.parameters()),
        "batch": args.batch,
        "latent": args.latent,
        "tokens": args.tokens,
        "max_abs_diff_same_weights": diff,
    }
    for name, backward in (("forward", False), ("forward_backward", True)):
        a, b = timed(k3(backward), args.repeats, args.device), timed(df(backward), args.repeats, args.device)
        res[f"{name}_s_k3lab"], res[f"{name}_s_diffusers"], res[f"{name}_ratio_k3lab_over_diffusers"] = a, b, a / b
    report(
        f"k3lab vs diffusers Kandinsky3UNet ({res['device']}, {args.dtype}, {res['threads']} threads, torch "
        f"{torch.__version__})",
        res,
        args.out,
    )


if __name__ == "__main__":
    main()
