"""Tiny autoencoder on CPU: training samples/s, a speed ratio against the diffusers VQModel peer on the
same architecture (measured in the same run), and validation PSNR/SSIM after a fixed wall-clock budget.

diffusers' SpatialNorm fixes 32 groups, so the peer comparison uses the tiny preset with ``ch`` raised
to 32 and 32 groups (widths 32/64/128/256); everything else (blocks, attention, codebook) is the preset's.

    .venv/bin/python benchmarks/autoencoder_tiny.py                 # 300 s training budget
    .venv/bin/python benchmarks/autoencoder_tiny.py --budget 60 --steps 20
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from k3lab.nn.movq import count_parameters
from k3lab.run.config import compose

from _report import report


def compose_tiny(root: Path, overrides: list[str]) -> DictConfig:
    return compose(["experiment=autoencoder_tiny", f"paths.root_dir={root}", *overrides], output_dir=root / "bench_run")


def diffusers_peer(model_cfg: dict) -> torch.nn.Module:
    """diffusers.VQModel with the same widths, blocks, norms and codebook as the k3lab preset."""
    from diffusers import VQModel

    widths = [model_cfg["ch"] * m for m in model_cfg["ch_mult"]]
    n = len(widths)
    return VQModel(
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(widths),
        layers_per_block=model_cfg["num_res_blocks"],
        down_block_types=("DownEncoderBlock2D",) * (n - 1) + ("AttnDownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * (n - 1),
        latent_channels=model_cfg["z_channels"],
        vq_embed_dim=model_cfg["embed_dim"],
        num_vq_embeddings=model_cfg["n_embed"],
        norm_num_groups=model_cfg["num_groups"],
        norm_type="spatial",
        mid_block_add_attention=True,
        sample_size=64,
    )


def throughput(step, batch: torch.Tensor, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step(batch)
    t = time.perf_counter()
    for _ in range(steps):
        step(batch)
    return steps * batch.shape[0] / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=300.0, help="training wall-clock budget in seconds")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model for samples/s")
    parser.add_argument(
        "--root", type=Path, default=None, help="where data and logs go (default: a temp dir; data cached in ./data)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="k3lab_bench_"))
    data_dir = Path.cwd() / "data"
    cfg = compose_tiny(root, [f"paths.data_dir={data_dir}", "logger=csv", "trainer.enable_progress_bar=false"])
    model_cfg = {k: v for k, v in dict(cfg.model.autoencoder).items() if k != "_target_"}
    batch_size = int(cfg.data.batch_size)
    torch.manual_seed(0)
    x = torch.rand(batch_size, 3, 64, 64) * 2 - 1

    # 1) samples/s: forward + backward + Adam on the autoencoder loss; then k3lab vs diffusers, same run.
    def k3lab_step_fn(model: torch.nn.Module):
        opt = torch.optim.Adam(model.parameters(), 1e-4)

        def step(b: torch.Tensor) -> None:
            out = model(b)
            loss = torch.nn.functional.mse_loss(out.reconstruction, b) + out.codebook_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    ours = instantiate(cfg.model.autoencoder).train()
    results: dict[str, object] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "params_tiny": count_parameters(ours),
    }
    results["samples_per_s_tiny"] = throughput(k3lab_step_fn(ours), x, args.steps)
    model_cfg = {**model_cfg, "ch": 32, "num_groups": 32}
    ours = instantiate({**cfg.model.autoencoder, "ch": 32, "num_groups": 32}).train()
    results["params_k3lab_peer_arch"] = count_parameters(ours)
    results["samples_per_s_k3lab_peer_arch"] = throughput(k3lab_step_fn(ours), x, args.steps)
    try:
        peer = diffusers_peer(model_cfg).train()
        popt = torch.optim.Adam(peer.parameters(), 1e-4)

        def peer_step(b: torch.Tensor) -> None:
            out = peer(b)
            loss = torch.nn.functional.mse_loss(out.sample, b) + out.commit_loss.mean()
            popt.zero_grad(set_to_none=True)
            loss.backward()
            popt.step()

        results["params_diffusers"] = sum(p.numel() for p in peer.parameters())
        results["samples_per_s_diffusers_peer_arch"] = throughput(peer_step, x, args.steps)
        results["speed_ratio_k3lab_over_diffusers"] = (
            results["samples_per_s_k3lab_peer_arch"] / results["samples_per_s_diffusers_peer_arch"]
        )
    except ImportError:
        print("diffusers not installed: no peer ratio", file=sys.stderr)

    # 2) the real stage and trainer for a fixed wall-clock budget, then validation PSNR/SSIM.
    minutes = args.budget / 60
    cfg_train = compose_tiny(
        root,
        [
            f"paths.data_dir={data_dir}",
            "logger=csv",
            "trainer.enable_progress_bar=false",
            "trainer.max_steps=-1",
            "trainer.val_check_interval=1000000",
            "trainer.limit_val_batches=null",
        ],
    )
    dm, stage = instantiate(cfg_train.data), instantiate(cfg_train.stage)
    trainer = instantiate(
        cfg_train.trainer,
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
        max_time=timedelta(seconds=args.budget),
    )
    initial = trainer.validate(stage, datamodule=dm, verbose=False)[0]
    t = time.perf_counter()
    trainer.fit(stage, datamodule=dm)
    elapsed = time.perf_counter() - t
    final = trainer.validate(stage, datamodule=dm, verbose=False)[0]
    results.update(
        {
            "budget_s": args.budget,
            "train_wall_s": elapsed,
            "batches": int(stage.batches_seen),
            "train_samples_per_s_in_stage": int(stage.batches_seen) * batch_size / elapsed,
            "val_psnr_start": initial["val/psnr"],
            "val_psnr": final["val/psnr"],
            "val_ssim": final["val/ssim"],
            "val_psnr_continuous": final["val/psnr_continuous"],
            "codebook_restarts": stage.autoencoder.quantize.restarts,
        }
    )
    report(
        f"tiny autoencoder benchmark ({minutes:.1f} min budget, {results['threads']} threads, torch "
        f"{torch.__version__})",
        results,
        args.out,
    )


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
