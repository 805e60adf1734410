"""The memory of a LoRA fine-tune of an experiment's U-Net on one GPU (the 3.0B Kandinsky 3 U-Net by default),
computed on the meta device (nothing allocated, no GPU needed), and the largest batch on 24, 48 and 80 GiB GPUs.

    python benchmarks/lora_memory.py                       # kandinsky3, ranks 4/16/64, 512 and 1024 px
    python benchmarks/lora_memory.py --ranks 8 --latents 64 --json plan.json

Assumptions (``k3lab.nn.sharding.lora_memory_plan``): the base U-Net and the text projection frozen, stored in the
preset's ``stage.lora.base_dtype`` (bf16 in ``kandinsky3_lora``: 2 bytes per parameter; fp32 when null), the step
under bf16 autocast (``trainer=gpu``), every U-Net block's activations checkpointed
(``model.unet.gradient_checkpointing=true``), text embeddings and latents precomputed (``python -m k3lab.precompute``:
no Flan-UL2, no MoVQ encoder in the step), the adapters' fp32 weights, gradients, AdamW moments and EMA (20 bytes per
adapter parameter), the frozen fp32 MoVQ kept for validation samples (~1 GiB) and 3 GiB for the CUDA context and the
allocator. Activations are measured by one meta-device forward pass with the adapters in place.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from k3lab.nn.sharding import lora_memory_plan
from k3lab.run.config import compose

try:
    from _report import report
except ImportError:  # run as a module
    from benchmarks._report import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="kandinsky3_lora")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--latents", type=int, nargs="+", default=[64, 128], help="latent sides (x8 = pixels)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--gpu-gib", type=float, nargs="+", default=[24.0, 48.0, 80.0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cfg = compose([f"experiment={args.experiment}", "stage.init_weights=null", "data.source.path=."])
    with torch.device("meta"):
        unet = instantiate(cfg.model.unet)
    projection = int(cfg.model.text_encoder.dim) * int(cfg.model.unet.context_dim) + 2 * int(cfg.model.unet.context_dim)
    base_dtype = OmegaConf.select(cfg, "stage.lora.base_dtype") or "float32"
    frozen_bytes = 4 if base_dtype == "float32" else 2
    rows = lora_memory_plan(
        unet, args.ranks, args.latents, args.gpu_gib, args.tokens, extra_frozen=projection, frozen_bytes=frozen_bytes
    )
    results: dict[str, object] = {
        "experiment": args.experiment,
        f"frozen base (U-Net + text projection, {base_dtype}, GiB)": rows[0].frozen_gib,
        "MoVQ (fp32, for validation samples) + CUDA reserve (GiB)": rows[0].other_gib,
    }
    for r in rows:
        px = r.latent * 8
        results[f"rank {r.rank}: adapter parameters"] = r.adapter_params
        results[f"rank {r.rank}: adapter weights + grads + AdamW + EMA (GiB)"] = r.adapter_gib
        results[f"rank {r.rank}, {px} px: activations per sample, checkpointed (GiB)"] = r.activation_gib
        for gib, batch in r.batch.items():
            results[f"rank {r.rank}, {px} px: largest batch on a {gib:.0f} GiB GPU"] = batch
    report("LoRA fine-tune memory plan, one GPU (meta device)", results, args.json)


if __name__ == "__main__":
    main()
