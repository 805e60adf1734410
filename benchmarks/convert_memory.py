"""Peak memory of weight conversion against the model's size: ``python -m k3lab.convert`` streams tensors.

Writes a diffusers ``unet/`` folder of random weights (the Kandinsky 3 U-Net at 2/3 width: ``--width 256`` is
~1.27B parameters, ~5.1 GB in float32), then runs, each in a fresh process whose peak resident memory is read from
the kernel (``getrusage(RUSAGE_CHILDREN)``, the figure ``/usr/bin/time -v`` prints):

- ``python -m k3lab.convert diffusers <pipeline> --out <k3lab folder>``
- ``python -m k3lab.convert to-diffusers <k3lab folder> --out <pipeline2>``

and prints peak RSS / model bytes for each (goal < 1.5), with the seconds and this machine's fp32 matmul GFLOP/s.
It then checks that the round trip gave back the same bytes. ``--k3lab-src DIR`` runs the conversions from another
checkout's ``src`` (e.g. an older commit, for a before/after figure).

    .venv/bin/python benchmarks/convert_memory.py                    # ~5.1 GB; needs ~16 GB of free disk
    .venv/bin/python benchmarks/convert_memory.py --width 64         # a quick run (~0.34 GB)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from k3lab.convert.formats import OFFICIAL_UNET, diffusers_unet_config, read_safetensors_folder
from k3lab.convert.keymaps import PROJECTION_DIFFUSERS
from k3lab.io.safetensors_io import LazyState, write_safetensors
from k3lab.nn.unet import KandinskyUNet

from _report import matmul_gflops, report


def write_random_unet(folder: Path, width: int, layers: int, encoder_dim: int) -> int:
    """A diffusers Kandinsky3UNet folder of random float32 weights, written one tensor at a time; returns its bytes."""
    kwargs = {
        **OFFICIAL_UNET,
        "model_channels": width,
        "init_channels": width // 2,
        "time_embed_dim": 4 * width,
        "context_dim": 4 * width,
        "num_blocks": (layers,) * 4,
        "head_dim": 64 if width % 64 == 0 else 32,
    }
    with torch.device("meta"):
        unet = KandinskyUNet(**kwargs)
    from k3lab.convert.keymaps import unet_to_diffusers

    shapes = {unet_to_diffusers(k): v.shape for k, v in unet.state_dict().items()}
    shapes |= {
        PROJECTION_DIFFUSERS["projection.0.weight"]: torch.Size([kwargs["context_dim"], encoder_dim]),
        PROJECTION_DIFFUSERS["projection.1.weight"]: torch.Size([kwargs["context_dim"]]),
        PROJECTION_DIFFUSERS["projection.1.bias"]: torch.Size([kwargs["context_dim"]]),
    }
    g = torch.Generator().manual_seed(0)
    state = LazyState(
        {k: (s, torch.float32, lambda s=s: torch.randn(s, generator=g) * 0.02) for k, s in shapes.items()}
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(diffusers_unet_config(unet, kwargs, encoder_dim)))
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", state)
    return sum(4 * s.numel() for s in shapes.values())


def peak_rss(cmd: list[str], env: dict[str, str]) -> tuple[int, float]:
    """(peak resident bytes, seconds) of ``cmd`` run in a fresh process (via a small wrapper so that only this
    command's peak is read)."""
    wrapper = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)"
    )
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return int(r.stderr.strip().splitlines()[-1]) * 1024, seconds  # ru_maxrss is in KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--width", type=int, default=256, help="first block width (Kandinsky 3: 384 = 3.0B; 256 = 1.27B; 192 = 0.71B)"
    )
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--encoder-dim", type=int, default=1024)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder (removed afterwards)")
    p.add_argument("--k3lab-src", type=Path, default=None, help="run the conversions from this src/ (another checkout)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="k3lab-convert-"))
    env = {**os.environ, "PYTHONPATH": str((args.k3lab_src or Path(__file__).resolve().parents[1] / "src").resolve())}
    try:
        gflops = matmul_gflops()
        t0 = time.perf_counter()
        model_bytes = write_random_unet(work / "pipe" / "unet", args.width, args.layers, args.encoder_dim)
        made = time.perf_counter() - t0
        k3, back = work / "k3lab", work / "pipe2"
        rss_in, sec_in = peak_rss(
            [sys.executable, "-m", "k3lab.convert", "diffusers", str(work / "pipe"), "--out", str(k3)], env
        )
        rss_out, sec_out = peak_rss(
            [sys.executable, "-m", "k3lab.convert", "to-diffusers", str(k3), "--out", str(back)], env
        )
        a, b = read_safetensors_folder(work / "pipe" / "unet"), read_safetensors_folder(back / "unet")
        assert set(a) == set(b), "round trip changed the key set"
        sample = list(a)[:: max(1, len(a) // 50)]
        assert all(torch.equal(a[k], b[k]) for k in sample), "round trip changed the weights"
        report(
            "Conversion memory (peak RSS / model bytes; goal < 1.5)",
            {
                "fp32 matmul GFLOP/s (this machine)": gflops,
                "parameters (M)": model_bytes / 4 / 1e6,
                "model bytes (GB, fp32)": model_bytes / 1e9,
                "writing the random diffusers folder (s)": made,
                "diffusers -> k3lab: peak RSS (GB)": rss_in / 1e9,
                "diffusers -> k3lab: peak RSS / model bytes": rss_in / model_bytes,
                "diffusers -> k3lab: seconds": sec_in,
                "k3lab -> diffusers: peak RSS (GB)": rss_out / 1e9,
                "k3lab -> diffusers: peak RSS / model bytes": rss_out / model_bytes,
                "k3lab -> diffusers: seconds": sec_out,
                "round trip": f"identical ({len(sample)} of {len(a)} tensors compared bit for bit, key sets equal)",
                "conversion code": str(env["PYTHONPATH"]),
            },
            args.json,
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
