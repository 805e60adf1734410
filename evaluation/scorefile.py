"""Score files that can be trusted later: each records what was measured (metric definitions, scorer weight hashes,
the prompt set's file hash, package versions) and a hash of its own content, so a file edited by hand is caught.
"""

from __future__ import annotations

import hashlib
import json
import math
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

PACKAGES = ("torch", "torchvision", "open_clip_torch", "transformers", "clean-fid", "numpy", "scipy", "pillow")


def versions() -> dict[str, str]:
    """Installed versions of the packages a score depends on ("absent" where one is not installed)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _finite(value: Any) -> Any:
    """NaN and infinities as null (strict JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def content_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 of the record's canonical JSON (sorted keys, no whitespace), its own ``content_sha256`` left out."""
    body = {k: v for k, v in record.items() if k != "content_sha256"}
    return hashlib.sha256(json.dumps(_finite(body), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write(record: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``record`` as JSON with its content hash (written to a temporary file, then renamed)."""
    path = Path(path)
    body = _finite(dict(record))
    body["content_sha256"] = content_hash(body)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=1, sort_keys=True), encoding="utf-8")
    tmp.replace(path)
    return path


def load(path: str | Path) -> dict[str, Any]:
    """A score file, verified: a missing or wrong ``content_sha256`` (the file was edited after it was written) is
    an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"score file not found: {path}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON score file ({e})") from e
    if not isinstance(record, dict) or "content_sha256" not in record:
        raise ValueError(f"{path}: no content_sha256 (not written by python -m evaluation)")
    if content_hash(record) != record["content_sha256"]:
        raise ValueError(
            f"{path}: content does not match its content_sha256 (edited after it was written?); "
            "re-score instead of editing"
        )
    return record
