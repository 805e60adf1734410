"""``python -m evaluation compare a.json b.json``: two score files of the same prompt set, compared prompt by prompt.

Refused, naming what differs, when the files do not measure the same thing: another prompt set or prompt file, a
metric whose definition or scorer weights differ, or a file whose content hash does not match (edited by hand).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from evaluation import scorefile
from evaluation.stats import bootstrap_interval


def differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Why two score records cannot be compared (empty when they can)."""
    out = []
    if a["set"] != b["set"]:
        out.append(f"prompt set: {a['set']!r} vs {b['set']!r}")
    if a["prompt_files_sha256"] != b["prompt_files_sha256"]:
        out.append(f"prompt files' sha256: {a['prompt_files_sha256'][:12]} vs {b['prompt_files_sha256'][:12]}")
    for m in sorted(set(a["metrics"]) & set(b["metrics"])):
        da, db = a["metrics"][m], b["metrics"][m]
        if da["definition"] != db["definition"]:
            out.append(f"{m}: definitions differ")
        if da["weights_sha256"] != db["weights_sha256"]:
            out.append(f"{m}: scorer weights differ ({da['weights_sha256'][:12]} vs {db['weights_sha256'][:12]})")
    if not set(a["metrics"]) & set(b["metrics"]):
        out.append(f"no metric in common ({sorted(a['metrics'])} vs {sorted(b['metrics'])})")
    return out


def paired(values_a: list[float], values_b: list[float], samples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean of a - b over prompts scored in both, with a percentile bootstrap 95% interval over prompts."""
    d = [x - y for x, y in zip(values_a, values_b, strict=True) if not (math.isnan(x) or math.isnan(y))]
    if not d:
        return {"diff": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    lo, hi = bootstrap_interval([[v] for v in d], samples, seed)
    return {"diff": float(np.mean(d)), "lo": lo, "hi": hi, "n": len(d)}


def _value(row: Mapping[str, Any], m: str) -> float:
    v = row.get(m)
    return math.nan if v is None else float(v)


def compare(path_a: str | Path, path_b: str | Path, samples: int = 2000) -> dict[str, Any]:
    """Per metric, overall and per category: A's and B's means and the paired difference on common prompts."""
    a, b = scorefile.load(path_a), scorefile.load(path_b)
    why = differences(a, b)
    if why:
        raise ValueError(f"{path_a} and {path_b} do not measure the same thing: " + "; ".join(why))
    common = sorted(set(a["per_prompt"]) & set(b["per_prompt"]))
    if not common:
        raise ValueError(f"{path_a} and {path_b} share no prompt")
    metrics = sorted(set(a["metrics"]) & set(b["metrics"]))
    out: dict[str, Any] = {"set": a["set"], "common_prompts": len(common), "metrics": {}}
    for m in metrics:
        rows = {"overall": common}
        for cat in sorted({a["per_prompt"][p]["category"] for p in common}):
            rows[f"category:{cat}"] = [p for p in common if a["per_prompt"][p]["category"] == cat]
        out["metrics"][m] = {
            name: {
                "a": float(np.nanmean([_value(a["per_prompt"][p], m) for p in ids])),
                "b": float(np.nanmean([_value(b["per_prompt"][p], m) for p in ids])),
                **paired(
                    [_value(a["per_prompt"][p], m) for p in ids], [_value(b["per_prompt"][p], m) for p in ids], samples
                ),
            }
            for name, ids in rows.items()
        }
    return out
