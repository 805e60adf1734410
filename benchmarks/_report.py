"""Printing benchmark results: a markdown table on stdout and, optionally, JSON."""

from __future__ import annotations

import json
from pathlib import Path


def report(title: str, results: dict[str, object], out: Path | None = None) -> None:
    """``| key | value |`` rows under ``## title`` (floats to 4 significant digits); ``out`` gets the raw JSON."""
    print(f"\n## {title}")
    for k, v in results.items():
        print(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    if out:
        out.write_text(json.dumps(results, indent=1))


def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
    """This machine's fp32 matmul throughput (GFLOP/s, best of ``repeats`` n x n products): print it beside every
    time, so a reader can scale the time to their own machine."""
    import time

    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9
