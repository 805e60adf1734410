"""The ablation table: ``python -m k3lab.report <sweep dir | MLflow parent run id> [--tracking-uri URI]``.

Reads the sweep's cell runs from MLflow (children of the parent run with role ``cell``), finds the axes (the job
overrides that vary, seeds aside) and writes, into the sweep folder (or ``--out``):
- ``report.md``: each axis's effect on each metric (level - reference level, averaged over the other axes'
  cells within a seed) as mean +- 95% t-interval over seeds, then every cell's mean +- interval, the chance and
  real-image rows, and where to look;
- ``report.png`` / ``report_effects.png``: forest plots per metric (cells with chance and ceiling lines; effects),
  both with their intervals; ``runs.csv``: one row per run.
The notebook ``notebooks/ablation.ipynb`` calls the same functions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from k3lab.ablation import views
from k3lab.ablation.report import analyse, build_report, compare_markdown, plan_text


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments and print the report, the seed plan or the comparison; bad input returns 2."""
    p = argparse.ArgumentParser(
        prog="python -m k3lab.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "source", nargs="?", default=None, help="a sweep folder (with mlflow_sweep.json) or an MLflow parent run id"
    )
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("SWEEP_A", "SWEEP_B"),
        default=None,
        help="two runs of one design (another machine, another seed set) side by side: each effect's paired interval "
        "in both, marked replicated / one only / contradicted / neither",
    )
    p.add_argument(
        "--plan",
        type=float,
        default=None,
        metavar="DELTA",
        help="how many seeds this design needs to see an effect of DELTA (80%% power) on --plan-metric",
    )
    p.add_argument("--plan-metric", default="eval/seen/single_object", help="the metric --plan is about")
    p.add_argument(
        "--tracking-uri", default=None, help="default: the sweep's, $MLFLOW_TRACKING_URI, or <project>/logs/mlflow.db"
    )
    p.add_argument("--out", default=None, help="where report.md/png and runs.csv go (default: the sweep folder)")
    p.add_argument(
        "--metric", action="append", default=None, help="metrics to tabulate (repeatable; default: the main ones)"
    )
    p.add_argument("--json", action="store_true", help="print the effects as JSON instead of the markdown")
    args = p.parse_args(argv)
    if (args.source is None) == (args.compare is None):
        p.error("give one sweep (source) or --compare SWEEP_A SWEEP_B")
    try:
        if args.compare:
            text = compare_markdown(*args.compare, tracking_uri=args.tracking_uri)
            if args.out:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                (Path(args.out) / "compare.md").write_text(text)
            print(text)
            return 0
        if args.plan is not None:
            report = analyse(args.source, args.tracking_uri, args.metric or None)
            if not len(report.power):
                raise ValueError(f"{args.source}: no per-prompt scores (eval/per_prompt.csv) to plan from")
            answer = views.plan(report.power, args.plan, args.plan_metric)
            print(json.dumps(answer, indent=1) if args.json else plan_text(answer))
            return 0
        report = build_report(args.source, args.tracking_uri, args.out, args.metric or None)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.effects.to_dict("records"), indent=1) if args.json else report.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
