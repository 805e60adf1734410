"""Prompt sets: one ``PromptSet`` type and loaders for the public benchmark formats and the scene world.

Formats: PartiPrompts TSV, GenEval ``evaluation_metadata.jsonl``, T2I-CompBench ``*_val.txt`` files,
a user-supplied DrawBench CSV (``Prompts, Category``), scene-world shards (``key.txt`` + ``key.json``),
and the package's own categorised prompt set (``evaluation/data/k3lab_prompts.jsonl``).
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

OWN_PROMPTS = Path(__file__).resolve().parent / "data" / "k3lab_prompts.jsonl"


@dataclass(frozen=True)
class Prompt:
    """One prompt; ``spec`` is a machine-checkable scene specification when the set has one."""

    id: str
    text: str
    category: str = ""
    spec: dict[str, Any] | None = field(default=None, compare=False, hash=False)


@dataclass
class PromptSet:
    """An ordered, named list of prompts with unique ids."""

    name: str
    prompts: list[Prompt]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for p in self.prompts:
            if p.id in seen:
                raise ValueError(f"prompt set {self.name!r}: duplicate prompt id {p.id!r}")
            if not p.text.strip():
                raise ValueError(f"prompt set {self.name!r}: prompt {p.id!r} is empty")
            seen.add(p.id)

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)

    def __getitem__(self, i: int) -> Prompt:
        return self.prompts[i]

    def categories(self) -> dict[str, int]:
        """Prompt count per category, in first-seen order."""
        counts: dict[str, int] = {}
        for p in self.prompts:
            counts[p.category] = counts.get(p.category, 0) + 1
        return counts

    def filter(self, categories: Iterable[str]) -> "PromptSet":
        """The prompts of the given categories only, as a new named set."""
        wanted = set(categories)
        return PromptSet(f"{self.name}[{','.join(sorted(wanted))}]", [p for p in self.prompts if p.category in wanted])

    def to_jsonl(self, path: str | Path) -> Path:
        """Write the set as JSONL (id, prompt, category, spec), the format ``python -m k3lab.sample`` reads."""
        path = Path(path)
        path.write_text(
            "".join(
                json.dumps({"id": p.id, "prompt": p.text, "category": p.category, "spec": p.spec}) + "\n"
                for p in self.prompts
            )
        )
        return path


def tar_member(tar: tarfile.TarFile, member: tarfile.TarInfo, shard: str | Path) -> bytes:
    """The bytes of one regular file in a shard; an error naming it for anything else (a link, a folder)."""
    f = tar.extractfile(member)
    if f is None:
        raise ValueError(f"{shard}: member {member.name!r} is not a regular file")
    return f.read()


def _require(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    return path


def load_partiprompts(path: str | Path) -> PromptSet:
    """PartiPrompts TSV (``Prompt, Category, Challenge, Note``); category = Category."""
    path = _require(path)
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if rows and "Prompt" not in rows[0]:
        raise ValueError(f"{path}: not a PartiPrompts TSV (no 'Prompt' column; found {list(rows[0])})")
    return PromptSet(
        "partiprompts",
        [
            Prompt(
                f"parti-{i:04d}",
                r["Prompt"].strip(),
                r.get("Category", "").strip(),
                {"challenge": r.get("Challenge", "").strip()},
            )
            for i, r in enumerate(rows)
        ],
    )


def load_geneval(path: str | Path) -> PromptSet:
    """GenEval ``evaluation_metadata.jsonl``; category = tag, spec = the whole line (include/exclude)."""
    path = _require(path)
    prompts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            meta = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {i + 1} is not JSON ({e})") from e
        prompts.append(Prompt(f"geneval-{len(prompts):05d}", meta["prompt"], meta["tag"], meta))
    return PromptSet("geneval", prompts)


def load_t2i_compbench(directory: str | Path, categories: Sequence[str] | None = None, split: str = "val") -> PromptSet:
    """T2I-CompBench: one ``<category>_<split>.txt`` per category, one prompt per line."""
    directory = Path(directory)
    files = sorted(directory.glob(f"*_{split}.txt"))
    if not files:
        raise FileNotFoundError(f"no T2I-CompBench files *_{split}.txt in {directory}")
    prompts = []
    for f in files:
        category = f.name[: -len(f"_{split}.txt")]
        if categories is not None and category not in categories:
            continue
        for i, line in enumerate(raw.strip() for raw in f.read_text(encoding="utf-8").splitlines()):
            if line:
                prompts.append(Prompt(f"t2i-{category}-{i:04d}", line, category))
    return PromptSet("t2i-compbench", prompts)


def load_drawbench(path: str | Path) -> PromptSet:
    """A user-supplied DrawBench CSV with ``Prompts`` and ``Category`` columns (not shipped: no licence)."""
    path = _require(path)
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"Prompts", "Category"} <= set(rows[0]):
        raise ValueError(f"{path}: a DrawBench CSV needs 'Prompts' and 'Category' columns, found {list(rows[0])}")
    return PromptSet(
        "drawbench",
        [Prompt(f"drawbench-{i:03d}", r["Prompts"].strip(), r["Category"].strip()) for i, r in enumerate(rows)],
    )


def load_jsonl(path: str | Path, name: str | None = None) -> PromptSet:
    """Lines of ``{"id", "prompt", "category", "spec"?}`` (the format ``PromptSet.to_jsonl`` writes)."""
    path = _require(path)
    prompts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            d = json.loads(line)
            prompts.append(Prompt(str(d.get("id", i)), d["prompt"], d.get("category", ""), d.get("spec")))
    return PromptSet(name or path.stem, prompts)


def load_own_prompts() -> PromptSet:
    """The package's own categorised prompt set (written for k3lab, in the spirit of the Kandinsky 3 report's
    categories)."""
    return load_jsonl(OWN_PROMPTS, "k3lab-categories")


def load_scene_world(shards: Sequence[str | Path], name: str = "scene-world") -> PromptSet:
    """Captions and scene specifications from scene-world shards; category = scene kind, id = shard/key."""
    prompts = []
    for shard in shards:
        shard = _require(shard)
        texts: dict[str, str] = {}
        specs: dict[str, dict] = {}
        with tarfile.open(shard) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                if ext == "txt":
                    texts[key] = tar_member(tar, m, shard).decode("utf-8")
                elif ext == "json":
                    specs[key] = json.load(io.BytesIO(tar_member(tar, m, shard)))
        for key in sorted(texts):
            spec = specs.get(key)
            prompts.append(Prompt(f"{shard.stem}/{key}", texts[key], (spec or {}).get("kind", ""), spec))
    return PromptSet(name, prompts)
