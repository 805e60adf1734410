"""Evaluate a trained mapping prior: prior-sample vs true CLIP image embedding cosine per split, beside the
mean-embedding and other-image baselines.

    python -m k3lab.mapping <prior run>/checkpoints/prior.safetensors
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from k3lab.diffusion.settings import DEFAULT_SAMPLING
from k3lab.inference.mapping import evaluate_prior


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, evaluate the prior and print the cosines as JSON."""
    parser = argparse.ArgumentParser(prog="python -m k3lab.mapping", description=__doc__)
    parser.add_argument("checkpoint", help="the prior stage's prior.safetensors (config.yaml beside it)")
    parser.add_argument("--split", action="append", default=None, help="splits to evaluate (default: test and heldout)")
    parser.add_argument("--steps", type=int, default=DEFAULT_SAMPLING.prior_steps)
    parser.add_argument("--guidance", type=float, default=DEFAULT_SAMPLING.prior_guidance)
    args = parser.parse_args(argv)
    result = evaluate_prior(args.checkpoint, args.split or ("test", "heldout"), args.steps, args.guidance)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
