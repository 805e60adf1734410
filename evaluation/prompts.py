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


MAX_PROMPT_CHARS = 2000


class Skips:
    """Rows a tolerant loader left out, counted per reason with the first few places named."""

    def __init__(self, examples: int = 3) -> None:
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self._keep = examples

    def add(self, reason: str, where: str) -> None:
        """Count one skipped row (``where``: file and line)."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(shown := self.examples.setdefault(reason, [])) < self._keep:
            shown.append(where)

    def total(self) -> int:
        """All skipped rows."""
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, dict[str, object]]:
        """``{reason: {"count", "examples"}}`` for score files."""
        return {r: {"count": n, "examples": self.examples[r]} for r, n in self.counts.items()}


def _bad(skips: Skips | None, reason: str, where: str) -> None:
    """Count a bad row when loading tolerantly, else raise naming it."""
    if skips is None:
        raise ValueError(f"{where}: {reason}")
    skips.add(reason, where)


def _lines(path: Path, skips: Skips | None) -> list[tuple[int, str]]:
    """(line number, text) of a file's lines; a line that is not UTF-8 is an error or a counted skip."""
    out = []
    for i, raw in enumerate(path.read_bytes().split(b"\n")):
        try:
            out.append((i + 1, raw.decode("utf-8").rstrip("\r")))
        except UnicodeDecodeError as e:
            _bad(skips, f"not UTF-8 ({e.reason})", f"{path}:{i + 1}")
    return out


def _text_ok(text: object, where: str, skips: Skips | None, max_chars: int) -> bool:
    """Whether a prompt is usable: a non-empty string of at most ``max_chars`` characters (else error or skip)."""
    if not isinstance(text, str) or not text.strip():
        _bad(skips, "empty prompt", where)
        return False
    if len(text) > max_chars:
        _bad(skips, f"prompt longer than {max_chars} characters", where)
        return False
    return True


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


def _rows(path: Path, delimiter: str, required: set[str], what: str, skips: Skips | None) -> list[tuple[int, dict]]:
    """(line, row) of a CSV/TSV whose header must hold ``required``; rows missing a field are errors or skips."""
    lines = _lines(path, skips)
    if not lines or not lines[0][1].strip():
        raise ValueError(f"{path}: empty file (a {what} needs a header with {sorted(required)})")
    reader = csv.DictReader(io.StringIO("\n".join(t for _, t in lines)), delimiter=delimiter)
    header = set(reader.fieldnames or [])
    if not required <= header:
        raise ValueError(
            f"{path}: not a {what}: missing column(s) {sorted(required - header)} (found {sorted(header)})"
        )
    out = []
    for row in reader:
        number = lines[reader.line_num - 1][0] if reader.line_num <= len(lines) else reader.line_num
        if any(row.get(k) is None for k in required):
            _bad(skips, f"row lacks {sorted(k for k in required if row.get(k) is None)}", f"{path}:{number}")
            continue
        out.append((number, row))
    return out


def load_partiprompts(path: str | Path, skips: Skips | None = None, max_chars: int | None = None) -> PromptSet:
    """PartiPrompts TSV (``Prompt, Category, Challenge, Note``); category = Category, spec = {challenge}.

    ``skips``: load tolerantly (bad rows counted there instead of raising); ``max_chars``: longer prompts are bad."""
    path = _require(path)
    prompts = []
    for line, r in _rows(path, "\t", {"Prompt"}, "PartiPrompts TSV", skips):  # ids from the line: stable under skips
        text = r["Prompt"].strip()
        if _text_ok(text, f"{path}:{line}", skips, max_chars or len(text)):
            prompts.append(
                Prompt(
                    f"parti-{line - 2:04d}",
                    text,
                    (r.get("Category") or "").strip(),
                    {"challenge": (r.get("Challenge") or "").strip()},
                )
            )
    return PromptSet("partiprompts", prompts)


def load_geneval(path: str | Path, skips: Skips | None = None, max_chars: int | None = None) -> PromptSet:
    """GenEval ``evaluation_metadata.jsonl``; category = tag, spec = the whole line (include/exclude)."""
    path = _require(path)
    prompts = []
    for line, text in _lines(path, skips):
        if not text.strip():
            continue
        where = f"{path}:{line}"
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as e:
            _bad(skips, f"not JSON ({e.msg})", where)
            continue
        if not isinstance(meta, dict) or "prompt" not in meta or "tag" not in meta:
            _bad(skips, "line lacks 'prompt' or 'tag'", where)
            continue
        if _text_ok(meta["prompt"], where, skips, max_chars or len(str(meta["prompt"]))):
            prompts.append(Prompt(f"geneval-{line - 1:05d}", meta["prompt"], str(meta["tag"]), meta))
    return PromptSet("geneval", prompts)


def load_t2i_compbench(
    directory: str | Path,
    categories: Sequence[str] | None = None,
    split: str = "val",
    skips: Skips | None = None,
    max_chars: int | None = None,
) -> PromptSet:
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
        for line, raw in _lines(f, skips):
            text = raw.strip()
            if text and _text_ok(text, f"{f}:{line}", skips, max_chars or len(text)):
                prompts.append(Prompt(f"t2i-{category}-{line - 1:04d}", text, category))
    return PromptSet("t2i-compbench", prompts)


def load_drawbench(path: str | Path, skips: Skips | None = None, max_chars: int | None = None) -> PromptSet:
    """A user-supplied DrawBench CSV with ``Prompts`` and ``Category`` columns (not shipped: no licence)."""
    path = _require(path)
    prompts = []
    for line, r in _rows(path, ",", {"Prompts", "Category"}, "DrawBench CSV", skips):
        text = r["Prompts"].strip()
        if _text_ok(text, f"{path}:{line}", skips, max_chars or len(text)):
            prompts.append(Prompt(f"drawbench-{line - 2:03d}", text, r["Category"].strip()))
    return PromptSet("drawbench", prompts)


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
