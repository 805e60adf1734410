"""Per-GPU memory of FSDP training of a U-Net preset, computed on the meta device (nothing allocated, no GPU needed).

    python benchmarks/fsdp_memory.py        # the 3.0B kandinsky3 U-Net, 512 px (64x64 latents)
    python benchmarks/fsdp_memory.py --unet small --latent 32 --gpus 1 2 4

For 1, 8 and 64 GPUs: this rank's shard of fp32 parameters + gradients + AdamW moments, the bf16 parameters of the two
largest FSDP units (one computing, one prefetched; ``k3lab.nn.sharding.block_classes``), and the largest batch whose
activations fit in the rest of an 80 GiB GPU with per-block activation checkpointing (activations measured by one
meta-device forward pass in bf16). Text embeddings are assumed precomputed (``python -m k3lab.precompute``): a frozen
Flan-UL2 encoder on the same GPU would add ~16 GiB of bf16 weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hydra.utils import instantiate

from k3lab.nn.sharding import GIB, memory_plan
from k3lab.run.config import compose

try:
    from _report import report
except ImportError:  # run as a module
    from benchmarks._report import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", default="kandinsky3", help="model/unet preset (conf/model/unet)")
    parser.add_argument("--block", default="biggan_deep", help="model/unet/block")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px through MoVQ's 8x)")
    parser.add_argument("--tokens", type=int, default=128, help="text tokens of context")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--gpu-gib", type=float, default=80.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cfg = compose([f"model/unet={args.unet}", f"model/unet/block={args.block}"])
    with torch.device("meta"):
        unet = instantiate(cfg.model.unet)
    params, act, rows = memory_plan(unet, args.gpus, args.latent, args.tokens, args.gpu_gib)
    results: dict[str, object] = {
        "U-Net": f"{args.unet} / {args.block}",
        "parameters": params,
        "latent": f"{args.latent}x{args.latent} ({args.latent * 8} px), {args.tokens} text tokens",
        "activations per sample, bf16, no checkpointing (GiB)": act.full / GIB,
        "activations per sample, per-block checkpointing (GiB)": act.checkpointed / GIB,
    }
    for r in rows:
        results[f"{r.gpus} GPU(s): shard + gathered units = static (GiB)"] = (
            f"{r.sharded_gib:.2f} + {r.gathered_gib:.2f} = {r.static_gib:.2f}"
        )
        results[f"{r.gpus} GPU(s): largest batch per {args.gpu_gib:.0f} GiB GPU"] = r.batch_per_gpu
    report("FSDP memory plan (meta device)", results, args.json)


if __name__ == "__main__":
    main()
