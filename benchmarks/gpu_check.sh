#!/usr/bin/env bash
# The prepared GPU check of issue 15, one run on one lent device (no network; ~8 minutes). Use an H200: by
# k3lab.nn.sharding.training_state_bytes the 3.04B U-Net's fp32 weights, gradients, AdamW moments and EMA take 20 bytes
# per parameter (60.8 GB), the benchmark keeps a 12.2 GB reference copy, and batch-8 activations at 64x64 latents
# without checkpointing add ~11.9 GB (benchmarks/fsdp_memory.py): ~85 GB.
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. the GPU tests (bf16 train step, bf16 vs fp32, compiled sampler step);
# 2. MFU of the kandinsky3 U-Net's bf16 training step at 64x64 latents (512 px), switch by switch and combined;
# 3. seconds per 1024 px image vs diffusers' Kandinsky3Pipeline at full U-Net width (bf16, regional compile).
# Every figure lands as JSON under OUT_DIR (default $OUT, else ./gpu_check) with the device name in it.
set -uo pipefail
out="${1:-${OUT:-gpu_check}}"
mkdir -p "$out"
py="${PYTHON:-.venv/bin/python}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/device.txt"
timeout 120 "$py" -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -5 | tee "$out/gpu_tests.txt"
timeout 300 "$py" benchmarks/train_step.py --unet kandinsky3 --latent 64 --tokens 128 --batch 8 --steps 6 \
    --device cuda --switches bf16 compile fused_adamw foreach_ema flash_sdpa --out "$out/train_step_kandinsky3.json" \
    2>&1 | grep -v Warning | tail -40
timeout 240 "$py" benchmarks/sample_speed.py --device cuda --width 384 --resolution 1024 --text-dim 4096 \
    --steps 25 50 --dtype bf16 --compile --out "$out/sample_speed_1024.json" 2>&1 | grep -v Warning | tail -30
