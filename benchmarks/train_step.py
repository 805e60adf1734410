"""The Kandinsky 3 U-Net's training step (forward + backward + AdamW + EMA), one switch at a time and combined.

Reports samples/s, training FLOPs per sample (``torch.utils.flop_counter``), achieved TFLOP/s and MFU against the
device's peak: H100 SXM bf16 989 TFLOP/s dense, A100 bf16 312, and on CPU this machine's fp32 matmul rate measured in
the same run. Switches (each alone, then all that helped together):

  bf16            autocast to bfloat16 (CUDA; on CPU too where the machine has bf16 units)
  compile         regional torch.compile: each residual/attention block compiled on its own (short compiles)
  channels_last   NHWC weights and inputs
  fused_adamw     one fused AdamW kernel instead of torch's per-tensor default
  foreach_ema     k3lab's multi-tensor EMA update (vs a Python loop of lerps)
  checkpointing   activation checkpointing per block (saves memory; costs a recomputed forward)
  flash_sdpa      SDPA restricted to the flash / memory-efficient kernels (CUDA)

    python benchmarks/train_step.py                                 # CPU: the fast preset, 16x16 latents
    python benchmarks/train_step.py --unet kandinsky3 --latent 64 --batch 8 --device cuda   # on an H100: 512 px
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode

from k3lab.nn.ema import EMA
from k3lab.nn.sharding import compile_blocks, units
from k3lab.run.config import compose

try:
    from _report import matmul_gflops, report
except ImportError:  # run as a module
    from benchmarks._report import matmul_gflops, report

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks
SWITCHES = ("bf16", "compile", "channels_last", "fused_adamw", "foreach_ema", "checkpointing", "flash_sdpa")


def peak_tflops(device: str) -> tuple[float, str]:
    """The device's peak (TFLOP/s) and where it comes from."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value, f"{name}: {value:.0f} TFLOP/s bf16 dense (datasheet)"
        return float("nan"), f"{name}: no peak in the table"
    gflops = matmul_gflops()
    return gflops / 1e3, f"CPU: {gflops:.0f} GFLOP/s fp32 matmul, measured now"


class LoopEMA(EMA):
    """The per-parameter EMA update the foreach version replaced (for the comparison only)."""

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        n = float(self.num_updates)
        decay = min(self.decay, (1.0 + n) / (10.0 + n))
        for ema_p, p in zip(self.module.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1.0 - decay)


def prepare(unet: torch.nn.Module, on: set[str]) -> torch.nn.Module:
    """The U-Net with the model-side switches applied."""
    if "channels_last" in on:
        unet = unet.to(memory_format=torch.channels_last)
    if "checkpointing" in on:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            apply_activation_checkpointing,
            checkpoint_wrapper,
        )

        blocks = {type(u) for u in units(unet)}
        apply_activation_checkpointing(unet, checkpoint_wrapper, check_fn=lambda m: type(m) in blocks)
    if "compile" in on:
        compile_blocks(unet)
    return unet


@contextlib.contextmanager
def sdpa(on: set[str], device: str) -> Iterator[None]:
    if "flash_sdpa" in on and device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            yield
    else:
        yield


def make_step(
    unet: torch.nn.Module, on: set[str], batch: int, latent: int, tokens: int, device: str
) -> Callable[[], None]:
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True if "fused_adamw" in on else None)
    ema = (EMA if "foreach_ema" in on else LoopEMA)(unet, 0.9999)
    gen = torch.Generator(device=device).manual_seed(0)
    channels = int(unet.in_channels)
    x = torch.randn(batch, channels, latent, latent, generator=gen, device=device)
    if "channels_last" in on:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,), generator=gen, device=device)
    ctx = torch.randn(batch, tokens, int(unet.context_dim), generator=gen, device=device)
    mask = torch.ones(batch, tokens, dtype=torch.bool, device=device)
    target = torch.randn_like(x)
    dtype = torch.bfloat16 if "bf16" in on else None

    def step() -> None:
        with sdpa(on, device), torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.mse_loss(unet(x, t, ctx, mask).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(unet)

    return step


def measure(step: Callable[[], None], batch: int, steps: int, device: str) -> tuple[float, float]:
    """(seconds to the first finished step, including any compile; samples/s after warm-up)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - start
    for _ in range(2):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return first, batch * steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", default="fast", help="model/unet preset (kandinsky3 = the 3.0B U-Net)")
    parser.add_argument("--block", default="biggan_deep")
    parser.add_argument("--context-dim", type=int, default=None, help="override the projected text width")
    parser.add_argument("--latent", type=int, default=16, help="latent side (64 = 512 px)")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--switches", nargs="*", default=None, help=f"subset of {SWITCHES} (default: all)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    overrides = [f"model/unet={args.unet}", f"model/unet/block={args.block}"]
    if args.context_dim:
        overrides.append(f"model.unet.context_dim={args.context_dim}")
    cfg = compose(overrides)
    torch.manual_seed(0)
    with torch.device(args.device):
        base_model = instantiate(cfg.model.unet)
    peak, peak_note = peak_tflops(args.device)
    eager = make_step(copy.deepcopy(base_model), set(), args.batch, args.latent, args.tokens, args.device)
    with FlopCounterMode(display=False) as counter:
        eager()
    flops = counter.get_total_flops() / args.batch
    results: dict[str, Any] = {
        "U-Net": f"{args.unet} / {args.block}, {sum(p.numel() for p in base_model.parameters()) / 1e6:.1f}M params",
        "input": f"{args.batch} x {int(base_model.in_channels)} x {args.latent} x {args.latent}, {args.tokens} tokens",
        "device": args.device,
        "peak": peak_note,
        "train FLOPs per sample (GFLOP)": flops / 1e9,
    }
    wanted = [s for s in (args.switches if args.switches is not None else SWITCHES) if s in SWITCHES]
    if args.device != "cuda":
        wanted = [s for s in wanted if s != "flash_sdpa"]  # CUDA kernels only
    rates: dict[str, float] = {}
    for name, on in [("baseline", set()), *((s, {s}) for s in wanted), ("all that helped", None)]:
        if on is None:  # the combination: every switch that beat the baseline (checkpointing trades speed for memory)
            on = {s for s in wanted if rates.get(s, 0.0) > rates["baseline"] and s != "checkpointing"}
            name = f"combined ({', '.join(sorted(on)) or 'none'})"
        torch.manual_seed(0)
        model = prepare(copy.deepcopy(base_model), on)
        first, rate = measure(make_step(model, on, args.batch, args.latent, args.tokens, args.device), args.batch,
                              args.steps, args.device)  # fmt: skip
        rates[name] = rate
        achieved = rate * flops / 1e12
        results[f"{name}: samples/s"] = rate
        results[f"{name}: speed vs baseline"] = rate / rates["baseline"]
        results[f"{name}: achieved TFLOP/s"] = achieved
        results[f"{name}: MFU"] = achieved / peak
        if "compile" in on:
            results[f"{name}: first step incl. compile (s)"] = first
    if args.device != "cuda":  # a busy moment lowers one measurement: keep the best of two
        again = matmul_gflops() / 1e3
        if again > peak:
            results["peak"] = f"CPU: {again * 1e3:.0f} GFLOP/s fp32 matmul, measured now (best of two)"
            for key in [k for k in results if k.endswith(": MFU")]:
                results[key] = results[key] * peak / again
    report("U-Net training step, switch by switch", results, args.out)
    return results


if __name__ == "__main__":
    main()
