"""The main job's cell U-Net on CPU: training-step samples/s, FLOPs per sample and achieved GFLOP/s as a fraction of
this machine's fp32 matmul rate, eager vs ``torch.compile`` (and channels_last), all in one run.

The U-Net, its input size and the context length come from the composed main-job preset (``experiment=ablation_tiny``
unless ``--experiment`` says otherwise); a step is forward + backward + AdamW on random inputs with the stage's v-loss
shapes (speed does not depend on the weights). FLOPs are counted by ``torch.utils.flop_counter`` on one eager step.

    .venv/bin/python benchmarks/cell_unet.py                   # ~2 minutes (the compile takes most of it)
    .venv/bin/python benchmarks/cell_unet.py --batch 64 --steps 20 --out cell_unet.json
    .venv/bin/python benchmarks/cell_unet.py --parallel 2 --out p.json   # one 2-thread process vs two 1-thread ones

``--parallel K`` measures what the main job's launcher does (``hydra/launcher=local_parallel`` with
``ablation.threads: auto``): the eager step's samples/s of one process using K threads, then of K one-thread processes
started together (their rates summed), and the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode

from k3lab.run.config import compose

from _report import matmul_gflops, report


def cell_unet(experiment: str, overrides: list[str]) -> tuple[torch.nn.Module, int, int, int]:
    """The preset's U-Net and its input (channels, side) and context width."""
    cfg = compose([f"experiment={experiment}", *overrides])
    unet = instantiate(cfg.model.unet)
    side = int(cfg.data.resolution)
    if cfg.ablation.get("autoencoder"):  # latent cells: the autoencoder's down-sampling factor
        side //= 2 ** (len(cfg.model.autoencoder.ch_mult) - 1)
    return unet, int(unet.in_channels), side, int(cfg.model.unet.context_dim)


def make_step(
    unet: torch.nn.Module, batch: int, channels: int, side: int, context: int, channels_last: bool
) -> Callable:
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, side, side, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    ctx = torch.randn(batch, 16, context, generator=gen)
    mask = torch.ones(batch, 16, dtype=torch.bool)
    target = torch.randn(batch, channels, side, side, generator=gen)

    def step() -> None:
        loss = torch.nn.functional.mse_loss(unet(x, t, ctx, mask), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def flops_per_sample(step: Callable, batch: int) -> float:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / batch


def samples_per_s(step: Callable, batch: int, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def parallel(args: argparse.Namespace) -> dict[str, Any]:
    """One K-thread process vs K one-thread processes at once (eager step, no compile), as the main job runs cells."""
    k = args.parallel
    base = [
        sys.executable,
        __file__,
        "--experiment",
        args.experiment,
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--no-compile",
        *args.overrides,
    ]
    gflops = matmul_gflops()
    with tempfile.TemporaryDirectory() as tmp:
        one = Path(tmp) / "one.json"
        subprocess.run([*base, "--threads", str(k), "--out", str(one)], check=True, capture_output=True)
        outs = [Path(tmp) / f"p{i}.json" for i in range(k)]
        procs = [subprocess.Popen([*base, "--threads", "1", "--out", str(o)], stdout=subprocess.DEVNULL) for o in outs]
        if any(p.wait() for p in procs):
            raise RuntimeError("a one-thread process failed")
        single = json.loads(one.read_text())["eager: samples/s"]
        rates = [json.loads(o.read_text())["eager: samples/s"] for o in outs]
    results: dict[str, Any] = {
        "experiment": args.experiment,
        "machine fp32 matmul GFLOP/s": max(gflops, matmul_gflops()),
        f"one process, {k} threads: samples/s": single,
        f"{k} processes, 1 thread each: samples/s (sum)": sum(rates),
        "parallel / one process": sum(rates) / single,
    }
    report(f"cell U-Net: one {k}-thread process vs {k} one-thread processes", results, args.out)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="ablation_tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--parallel", type=int, default=0, help="K: one K-thread process vs K one-thread processes")
    parser.add_argument("overrides", nargs="*", help="config overrides (e.g. model/unet/block=resnet)")
    args = parser.parse_args(argv)
    if args.parallel:
        return parallel(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gflops = matmul_gflops()
    unet, channels, side, context = cell_unet(args.experiment, args.overrides)
    flops = flops_per_sample(make_step(unet, args.batch, channels, side, context, False), args.batch)
    results: dict[str, Any] = {
        "experiment": args.experiment,
        "input": f"{args.batch} x {channels} x {side} x {side}",
        "parameters (M)": sum(p.numel() for p in unet.parameters()) / 1e6,
        "train FLOPs per sample (GFLOP)": flops / 1e9,
        "machine fp32 matmul GFLOP/s": gflops,
        "threads": torch.get_num_threads(),
    }
    variants = [("eager", False, False), ("eager channels_last", False, True)]
    if not args.no_compile:
        variants += [("compiled", True, False), ("compiled channels_last", True, True)]
    base = None
    for name, compiled, channels_last in variants:
        model, _, _, _ = cell_unet(args.experiment, args.overrides)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        start = time.perf_counter()
        runner = torch.compile(model) if compiled else model
        step = make_step(runner, args.batch, channels, side, context, channels_last)
        step()  # compiles here
        ready = time.perf_counter() - start
        rate = samples_per_s(step, args.batch, args.steps)
        base = base or rate
        achieved = rate * flops / 1e9
        results[f"{name}: samples/s"] = rate
        results[f"{name}: achieved GFLOP/s"] = achieved
        results[f"{name}: fraction of matmul GFLOP/s"] = achieved / gflops
        results[f"{name}: speed vs eager"] = rate / base
        if compiled:
            results[f"{name}: compile seconds"] = ready
    # the machine's rate, measured again after the runs: the best of the two (a busy moment lowers one)
    gflops = max(gflops, matmul_gflops())
    results["machine fp32 matmul GFLOP/s"] = gflops
    for name, _, _ in variants:
        results[f"{name}: fraction of matmul GFLOP/s"] = results[f"{name}: achieved GFLOP/s"] / gflops
    report("cell U-Net training step on CPU", results, args.out)
    return results


if __name__ == "__main__":
    main()
