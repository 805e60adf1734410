"""Re-run a long measurement the docs state, from scratch in a fresh root, and write what it gives as JSON (the claims
ledger's ``run`` claims call it; see ``benchmarks/claims.py``).

    python benchmarks/reproduce.py main-job --json out.json               # experiment=ablation_tiny, seeds 0,1,2 (~2 h)
    python benchmarks/reproduce.py main-job --seeds 3,4,5 --json out.json  # the replication
    python benchmarks/reproduce.py ablation-block --json out.json         # the one-axis job (~36 min at 218 GFLOP/s)
    python benchmarks/reproduce.py reference-cell --json out.json         # ablation_block's all-reference cell, seed 0
    python benchmarks/reproduce.py editing --json out.json                # inpainting_tiny at 3,000 steps + edit_bench
    python benchmarks/reproduce.py suite --json out.json                  # the default test suite, timed
    python benchmarks/reproduce.py eval-suite --json out.json             # the reference cell, then evaluation suite

Every result carries the machine's fp32 matmul GFLOP/s measured at the start, the wall seconds and what was asked
(``reproduce``: what, seeds, steps, root). ``--root`` keeps the run's folder (default: a temporary one, removed
afterwards); a root that already holds the sweep's shared parts (``K3LAB_ROOT`` of an earlier run) reuses them, so the
main job takes ~80 min instead of ~105, and ``claims.py run --results out.json`` checks the claims against it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _report import matmul_gflops

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], root: Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    """A k3lab command with ``K3LAB_ROOT`` set to the fresh root, from the checkout, failing loudly."""
    env = {**os.environ, "K3LAB_ROOT": str(root)}
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, text=True, capture_output=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def sweep(experiment: str, seeds: str | None, root: Path) -> dict[str, Any]:
    """An ablation sweep in ``root`` and its report (effects, cells, paired effects, power) as records."""
    from k3lab.ablation.report import analyse

    run(["-m", "k3lab.ablation", "-m", f"experiment={experiment}", *([f"seed={seeds}"] if seeds else [])], root)
    found = sorted((root / "logs" / experiment / "multiruns").glob("*/mlflow_sweep.json"))
    if not found:
        raise RuntimeError(f"no sweep folder under {root / 'logs' / experiment / 'multiruns'}")
    report = analyse(str(found[-1].parent))

    def records(frame: Any) -> list[dict[str, Any]]:
        return json.loads(frame.to_json(orient="records")) if frame is not None and len(frame) else []

    return {
        "sweep": str(found[-1].parent),
        "effects": records(report.effects),
        "cells": records(report.cells),
        "paired": records(report.paired),
        "power": records(report.power),
        "equal_compute": records(report.equal_compute),
    }


def reference_cell(root: Path) -> dict[str, Any]:
    """``experiment=ablation_block`` as a single run (its all-reference cell, seed 0): the cell's metrics."""
    run(["-m", "k3lab.ablation", "experiment=ablation_block"], root)
    found = sorted((root / "logs" / "ablation_block" / "runs").glob("*/metrics.json"))
    if not found:
        raise RuntimeError("the cell left no eval/metrics.json")
    return json.loads(found[-1].read_text())


def editing(root: Path, steps: int) -> dict[str, Any]:
    """The editing benchmark's measurement: its autoencoder, ``experiment=inpainting_tiny`` at ``steps`` steps, and
    ``python -m k3lab.edit_bench --num 256``."""
    run(
        [
            "-m",
            "k3lab.train",
            "experiment=autoencoder_tiny",
            "model/autoencoder=movq_fast",
            "data.resolution=32",
            "trainer.max_steps=450",
            "stage.disc_start=100000",
            f"hydra.run.dir={root}/ae",
        ],
        root,
    )
    run(
        [
            "-m",
            "k3lab.train",
            "experiment=inpainting_tiny",
            f"trainer.max_steps={steps}",
            f"stage.first_stage.checkpoint={root}/ae/checkpoints/autoencoder.safetensors",
            f"hydra.run.dir={root}/inpaint",
        ],
        root,
    )
    run(["-m", "k3lab.edit_bench", f"{root}/inpaint/checkpoints", "--num", "256", "--out", f"{root}/edit_bench"], root)
    return json.loads((root / "edit_bench" / "report.json").read_text())


def suite(root: Path) -> dict[str, Any]:
    """``python -m pytest -q`` (the README's test command): passed, skipped, failed and wall seconds."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=ROOT, text=True, capture_output=True
    )
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|skipped|failed|errors?)", tail)}
    return {
        "passed": counts.get("passed", 0),
        "skipped": counts.get("skipped", 0),
        "failed": counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0),
        "summary": tail,
    }


def eval_suite(root: Path) -> dict[str, Any]:
    """The reference cell (``reference_cell``), then ``benchmarks/eval_suite.py`` on it (``--limit 32`` per set)."""
    reference_cell(root)
    out = root / "eval_suite.json"
    run(
        [
            str(ROOT / "benchmarks" / "eval_suite.py"),
            "--root",
            str(root),
            "--out",
            str(root / "suite"),
            "--json",
            str(out),
        ],
        root,
    )
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["main-job", "ablation-block", "reference-cell", "editing", "suite", "eval-suite"])
    p.add_argument("--seeds", default=None, help="the sweep's seeds (main-job, ablation-block), e.g. 3,4,5")
    p.add_argument("--steps", type=int, default=3000, help="editing: inpainting training steps")
    p.add_argument("--root", type=Path, default=None, help="keep the run here (default: a temporary folder)")
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    gflops = matmul_gflops()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = (args.root or Path(tmp)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        if args.what == "main-job":
            out = sweep("ablation_tiny", args.seeds, root)
        elif args.what == "ablation-block":
            out = sweep("ablation_block", args.seeds, root)
        elif args.what == "reference-cell":
            out = reference_cell(root)
        elif args.what == "editing":
            out = editing(root, args.steps)
        elif args.what == "eval-suite":
            out = eval_suite(root)
        else:
            out = suite(root)
    out = {
        "machine fp32 matmul GFLOP/s": gflops,
        "wall_s": time.perf_counter() - start,
        "reproduce": {"what": args.what, "seeds": args.seeds, "steps": args.steps, "root": str(args.root or "")},
        **out,
    }
    args.json.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, list)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
