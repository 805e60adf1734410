"""Values of the composed Hydra config, as JSON: what the docs state about a preset (steps, rates, sizes) read from the
tree ``python -m k3lab.train`` composes, so the claims ledger can check them.

    python benchmarks/config_values.py --keys stage.loss.num_timesteps stage.conditioning.dropout
    python benchmarks/config_values.py experiment=ablation_tiny --keys trainer.max_steps --json out.json
    python benchmarks/config_values.py experiment=ablation_tiny --sweep --json out.json   # + the sweep's job count

``--sweep`` adds ``jobs``: the number of jobs the preset's multirun launches (its sweeper's params, a fraction applied),
and ``seeds``: how many seeds it sweeps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from k3lab.run.config import compose


def sweep_size(overrides: list[str]) -> dict[str, int]:
    """Jobs of the preset's multirun, counted by the function its start-of-sweep estimate uses."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from k3lab.ablation.timing import count_jobs
    from k3lab.run.config import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("train", overrides=[o for o in overrides if not is_sweep(o)], return_hydra_config=True)
    hydra = OmegaConf.create(
        {"hydra": {"sweeper": OmegaConf.to_container(cfg.hydra.sweeper), "overrides": {"task": list(overrides)}}}
    )
    seeds = str((cfg.hydra.sweeper.get("params") or {}).get("seed", "0"))
    return {"jobs": count_jobs(hydra), "seeds": len(seeds.split(","))}


def is_sweep(override: str) -> bool:
    """``key=a,b`` (a comma outside brackets and quotes): a multirun sweep, not one value."""
    value = override.partition("=")[2]
    depth, quote = 0, ""
    for ch in value:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*")
    p.add_argument("--keys", nargs="*", default=[])
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    plain = [o for o in args.overrides if not is_sweep(o)]  # a sweep (a,b) is counted, not composed
    cfg = compose(plain)
    GlobalHydra.instance().clear()
    out: dict[str, Any] = {k: OmegaConf.select(cfg, k, throw_on_missing=True) for k in args.keys}
    out = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for k, v in out.items()}
    if args.sweep:
        out.update(sweep_size(args.overrides))
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
