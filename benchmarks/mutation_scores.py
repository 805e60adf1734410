"""Mutation scores per module from a ``mutmut run`` (``make mutation``): killed, survived, not covered by the selected
tests, timeouts, and the score = killed / (mutants - skipped), each surviving mutant named.

    .venv/bin/mutmut run && .venv/bin/python benchmarks/mutation_scores.py --json mutation.json
    .venv/bin/python benchmarks/mutation_scores.py --survivors   # + each survivor's name (mutmut show <name>)

A mutant counts as killed when a test failed on it (mutmut's exit codes 1 and 3); "no tests" means no selected test
reaches the mutated function, which counts against the score like a survivor.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

KILLED = {1, 3}
SURVIVED = {0}
NO_TESTS = {5, 33}
SKIPPED = {34, 37}
TIMEOUT = {24, -24, 36, 152, 255}


def scores(mutants: Path) -> dict[str, dict[str, object]]:
    """Per mutated module: counts by status, the score and the surviving mutants' names."""
    out: dict[str, dict[str, object]] = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        if not codes:
            continue
        module = meta.relative_to(mutants).as_posix().removesuffix(".meta")
        count = Counter(
            "killed"
            if c in KILLED
            else "survived"
            if c in SURVIVED
            else "no tests"
            if c in NO_TESTS
            else "skipped"
            if c in SKIPPED
            else "timeout"
            if c in TIMEOUT
            else "not checked"
            if c is None
            else "suspicious"
            for c in codes.values()
        )
        counted = len(codes) - count["skipped"]
        out[module] = {
            "mutants": len(codes),
            **{k: count[k] for k in ("killed", "survived", "no tests", "timeout", "suspicious", "not checked")},
            "score": count["killed"] / counted if counted else float("nan"),
            "survivors": sorted(k for k, c in codes.items() if c in SURVIVED or c in NO_TESTS),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the table (and the survivors with ``--survivors``); ``--min-score`` fails below it."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mutants", type=Path, default=Path("mutants"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--survivors", action="store_true")
    p.add_argument("--min-score", type=float, default=None)
    args = p.parse_args(argv)
    table = scores(args.mutants)
    if not table:
        print(f"no mutmut results under {args.mutants}: run `.venv/bin/mutmut run` first")
        return 1
    print("| module | mutants | killed | survived | no tests | timeout | score |")
    print("|---|---|---|---|---|---|---|")
    for module, row in table.items():
        print(
            f"| {module} | {row['mutants']} | {row['killed']} | {row['survived']} | {row['no tests']} | "
            f"{row['timeout']} | {row['score']:.1%} |"
        )
    total = {k: sum(int(r[k]) for r in table.values()) for k in ("mutants", "killed")}  # type: ignore[call-overload]
    print(f"| all | {total['mutants']} | {total['killed']} | | | | {total['killed'] / total['mutants']:.1%} |")
    if args.survivors:
        for module, row in table.items():
            for name in row["survivors"]:  # type: ignore[union-attr]
                print(f"{module}: {name}")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
    low = [m for m, r in table.items() if args.min_score is not None and float(r["score"]) < args.min_score]  # type: ignore[arg-type]
    if low:
        print(f"below {args.min_score:.0%}: {low}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
