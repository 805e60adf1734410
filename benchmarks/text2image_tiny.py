"""Tiny text-to-image preset on CPU: training samples/s (frozen encoders online vs precomputed inputs),
sampling seconds per image, and a U-Net step ratio against diffusers' Kandinsky3UNet (same run).

The stage is the real ``experiment=text2image_tiny`` stage (tiny T5, tiny U-Net, EMA, AdamW) on the tiny
MoVQ architecture with random weights (speed does not depend on the weights). diffusers' Kandinsky3UNet
hard-codes four levels, expansion ratio 4 and attention on levels 1..3, and breaks with one block triple per
level (layers_per_block=1 raises a channel mismatch in its up path), so the peer comparison uses the tiny
preset's widths and block type with four levels (dim_mult 1,2,2,2), two triples per level and those settings.

    .venv/bin/python benchmarks/text2image_tiny.py                # ~3 minutes
    .venv/bin/python benchmarks/text2image_tiny.py --steps 10 --out bench.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from hydra.utils import instantiate

from k3lab.nn.first_stage import FrozenMoVQ
from k3lab.run.config import compose

from _report import report


def timed(fn: Callable[[], object], steps: int, warmup: int = 3) -> float:
    """Seconds per call."""
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per variant")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="k3lab_bench_"))
    cfg = compose(
        ["experiment=text2image_tiny", f"paths.root_dir={root}", "stage.first_stage.checkpoint=null"],
        output_dir=root / "run",
    )
    torch.manual_seed(0)
    first_stage = FrozenMoVQ(instantiate(cfg.model.autoencoder))
    stage = instantiate(cfg.stage, first_stage=first_stage)
    stage.trainer = None
    stage.log = lambda *a, **k: None  # no trainer here: Lightning's logging is not what is timed
    opt = stage.configure_optimizers()["optimizer"]
    b, res = int(cfg.data.batch_size), int(cfg.data.resolution)
    captions = [
        "a big red circle to the left of a small blue square",
        "three green crosses",
        "a yellow triangle",
        "a magenta box above a cyan disk",
    ] * (b // 4)
    images = torch.rand(b, 3, res, res) * 2 - 1
    batch = {"image": images, "caption": captions, "key": [f"k{i}" for i in range(b)]}
    stage.latents(batch)  # measures the latent scale once
    hidden, mask = stage.text_encoder.encode(captions)
    pre = dict(batch, text_embedding=hidden * mask[..., None], text_mask=mask, latent=first_stage.encode(images))

    def step(data: dict) -> Callable[[], None]:
        def run() -> None:
            loss = stage.training_step(data, 0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(stage.unet.parameters(), 1.0)
            opt.step()
            stage.on_train_batch_end(None, data, 0)

        return run

    unet_params = sum(p.numel() for p in stage.unet.parameters())
    results: dict[str, object] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": b,
        "resolution": res,
        "latent": f"{first_stage.latent_channels}x{res // 8}x{res // 8}",
        "unet_params": unet_params,
    }
    results["train_samples_per_s_online_encoders"] = b / timed(step(batch), args.steps)
    results["train_samples_per_s_precomputed"] = b / timed(step(pre), args.steps)

    gen = stage.generator()
    prompts8 = captions[:8]
    for sampler, steps_, w in (("kandinsky3", 50, 3.0), ("dpmpp_2m", 20, 3.0)):
        for n in (1, 8):
            s = timed(
                lambda n=n, sampler=sampler, steps_=steps_, w=w: gen(
                    prompts8[:n], list(range(n)), res, sampler, steps_, w
                ),
                2,
                warmup=1,
            )
            results[f"sample_s_per_image_{sampler}_{steps_}steps_cfg_batch{n}"] = s / n

    # U-Net fwd+bwd: k3lab vs diffusers Kandinsky3UNet on a peer-expressible tiny config (same widths/blocks).
    try:
        from diffusers import Kandinsky3UNet

        u = cfg.model.unet
        four = dict(
            dim_mult=[1, 2, 2, 2],
            num_blocks=[2] * 4,
            add_cross_attention=[False, True, True, True],
            add_self_attention=[False, True, True, True],
            expansion_ratio=4,
        )
        ours = instantiate(u, **four).train()
        peer = Kandinsky3UNet(
            in_channels=u.in_channels,
            time_embedding_dim=u.time_embed_dim,
            groups=u.groups,
            attention_head_dim=u.head_dim,
            layers_per_block=2,
            block_out_channels=tuple(u.model_channels * m for m in four["dim_mult"]),
            cross_attention_dim=u.context_dim,
            encoder_hid_dim=u.context_dim,
        ).train()
        proj = torch.nn.Sequential(
            torch.nn.Linear(u.context_dim, u.context_dim, bias=False), torch.nn.LayerNorm(u.context_dim)
        )
        x, t = torch.randn(b, u.in_channels, res // 8, res // 8), torch.randint(0, 1000, (b,))
        ctx, m = torch.randn(b, 12, u.context_dim), torch.ones(b, 12, dtype=torch.bool)

        def fwd_bwd(model: torch.nn.Module, call: Callable[[], torch.Tensor]) -> Callable[[], None]:
            def run() -> None:
                model.zero_grad(set_to_none=True)
                call().pow(2).mean().backward()

            return run

        ours_s = timed(fwd_bwd(ours, lambda: ours(x, t, proj(ctx), m)), args.steps)
        peer_s = timed(fwd_bwd(peer, lambda: peer(x, t, ctx, m.long()).sample), args.steps)
        results["peer_params_k3lab_unet_plus_projection"] = sum(p.numel() for p in ours.parameters()) + sum(
            p.numel() for p in proj.parameters()
        )
        results["peer_params_diffusers"] = sum(p.numel() for p in peer.parameters())
        results["peer_unet_fwd_bwd_samples_per_s_k3lab"] = b / ours_s
        results["peer_unet_fwd_bwd_samples_per_s_diffusers"] = b / peer_s
        results["peer_time_ratio_k3lab_over_diffusers"] = ours_s / peer_s
    except ImportError:
        print("diffusers not installed: no peer ratio")

    report(f"tiny text-to-image benchmark ({results['threads']} threads, torch {torch.__version__})", results, args.out)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
