"""Printing benchmark results: a markdown table on stdout and, optionally, JSON."""

from __future__ import annotations

import json
from pathlib import Path

from k3lab.ablation.timing import matmul_gflops  # noqa: F401 - the one measurement, re-exported for the scripts


def report(title: str, results: dict[str, object], out: Path | None = None) -> None:
    """``| key | value |`` rows under ``## title`` (floats to 4 significant digits); ``out`` gets the raw JSON."""
    print(f"\n## {title}")
    for k, v in results.items():
        print(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    if out:
        out.write_text(json.dumps(results, indent=1))
