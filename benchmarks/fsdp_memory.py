"""Per-GPU memory of FSDP training of an experiment's diffusion stage, computed on the meta device (nothing allocated,
no GPU needed).

    python benchmarks/fsdp_memory.py        # experiment=kandinsky3: the 3.0B U-Net, 512 px (64x64 latents), its EMA
    python benchmarks/fsdp_memory.py --unet small --latent 32 --gpus 1 2 4 --ema none

For 1, 8 and 64 GPUs: this rank's shard of fp32 parameters + gradients + AdamW moments of everything the stage trains
(the U-Net, the text projection and null embedding), the fp32 EMA copy where the experiment keeps one
(``stage.ema_decay``; ``--ema``: sharded like the rest, which ``trainer=fsdp`` does, replicated, on the CPU, or none;
``k3lab.nn.sharding.training_state_bytes`` is the one memory model), the bf16 parameters of the two
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

from k3lab.nn.sharding import EMA_PLACEMENTS, GIB, memory_plan
from k3lab.nn.text_conditioning import TextConditioning
from k3lab.run.config import compose

try:
    from _report import report
except ImportError:  # run as a module
    from benchmarks._report import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="kandinsky3", help="the experiment preset whose stage is planned")
    parser.add_argument("--unet", default=None, help="model/unet preset (default: the experiment's)")
    parser.add_argument(
        "--ema", default=None, choices=EMA_PLACEMENTS, help="EMA placement (default: sharded if the stage keeps one)"
    )
    parser.add_argument("--block", default="biggan_deep", help="model/unet/block")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px through MoVQ's 8x)")
    parser.add_argument("--tokens", type=int, default=128, help="text tokens of context")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--gpu-gib", type=float, default=80.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    overrides = [f"experiment={args.experiment}", f"model/unet/block={args.block}"]
    cfg = compose(overrides + ([f"model/unet={args.unet}"] if args.unet else []))
    ema = args.ema or ("sharded" if cfg.stage.get("ema_decay") is not None else "none")
    with torch.device("meta"):
        unet = instantiate(cfg.model.unet)
        conditioning = TextConditioning(int(cfg.model.text_encoder.dim), int(cfg.model.unet.context_dim))
    extra = sum(p.numel() for p in conditioning.parameters())
    params, act, rows = memory_plan(
        unet, args.gpus, args.latent, args.tokens, args.gpu_gib, ema=ema, extra_trainable=extra
    )
    results: dict[str, object] = {
        "experiment / U-Net / block": f"{args.experiment} / {args.unet or 'its own'} / {args.block}",
        "trained parameters (U-Net + text projection)": params,
        "EMA copy": ema,
        "latent": f"{args.latent}x{args.latent} ({args.latent * 8} px), {args.tokens} text tokens",
        "activations per sample, bf16, no checkpointing (GiB)": act.full / GIB,
        "activations per sample, per-block checkpointing (GiB)": act.checkpointed / GIB,
    }
    for r in rows:
        results[f"{r.gpus} GPU(s): shard + EMA + gathered units = static (GiB)"] = (
            f"{r.sharded_gib:.2f} + {r.ema_gib:.2f} + {r.gathered_gib:.2f} = {r.static_gib:.2f}"
        )
        results[f"{r.gpus} GPU(s): largest batch per {args.gpu_gib:.0f} GiB GPU"] = r.batch_per_gpu
    report("FSDP memory plan (meta device)", results, args.json)


if __name__ == "__main__":
    main()
