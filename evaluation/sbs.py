"""Human side-by-side evaluation (the Kandinsky 3 report's protocol, made reproducible): blinded export
and ingestion of annotations into win rates with intervals, per-category tables and rater agreement.
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import math
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from evaluation.stats import bootstrap_interval, krippendorff_alpha_nominal, wilson_interval

QUESTIONS: tuple[str, ...] = ("alignment", "quality")
CHOICES: tuple[str, ...] = ("left", "right", "tie")
HTML_TEMPLATE = Path(__file__).resolve().parent / "data" / "sbs_page.html"


@dataclass(frozen=True)
class Pair:
    """Two models' images of the same prompt and seed."""

    prompt_id: str
    prompt: str
    category: str
    seed: int
    image_a: Path
    image_b: Path


def _item_id(salt: str, *parts: object) -> str:
    return hashlib.sha256(":".join([salt, *map(str, parts)]).encode()).hexdigest()[:16]


def export(
    pairs: Sequence[Pair],
    out_dir: str | Path,
    model_a: str,
    model_b: str,
    seed: int = 0,
    repeat_fraction: float = 0.1,
    key_path: str | Path | None = None,
) -> dict[str, Path]:
    """Write a blinded annotation package: ``index.html``, ``items.json``, ``images/<hash>.png``.

    Left/right is drawn per item from ``seed``; ``repeat_fraction`` of the items come back later with the
    sides swapped (consistency checks). The key (which model is left) goes to ``key_path``, by default a
    file beside ``out_dir`` (never inside it, so the folder can be shared with raters as is).
    """
    out_dir = Path(out_dir)
    key_path = Path(key_path) if key_path else out_dir.parent / f"{out_dir.name}.key.json"
    if key_path.resolve().is_relative_to(out_dir.resolve()):
        raise ValueError(f"key file {key_path} must not be inside the shared folder {out_dir}")
    for p in pairs:
        for img in (p.image_a, p.image_b):
            if not Path(img).is_file():
                raise FileNotFoundError(f"prompt {p.prompt_id!r} seed {p.seed}: image not found: {img}")
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    salt = f"{seed}:{model_a}:{model_b}"
    items, key = [], {}
    order = list(range(len(pairs)))
    repeats = (
        set(rng.choice(len(pairs), size=int(round(repeat_fraction * len(pairs))), replace=False).tolist())
        if pairs
        else set()
    )
    plan = [(i, False) for i in order] + [(i, True) for i in sorted(repeats)]
    a_left_first = rng.random(len(pairs)) < 0.5
    for i, repeat in plan:
        p = pairs[i]
        a_left = bool(a_left_first[i]) != repeat  # a repeat swaps the sides
        item = _item_id(salt, p.prompt_id, p.seed, int(repeat))
        left, right = (p.image_a, p.image_b) if a_left else (p.image_b, p.image_a)
        shutil.copyfile(left, out_dir / "images" / f"{item}-l.png")
        shutil.copyfile(right, out_dir / "images" / f"{item}-r.png")
        items.append(
            {"item_id": item, "prompt": p.prompt, "left": f"images/{item}-l.png", "right": f"images/{item}-r.png"}
        )
        key[item] = {
            "prompt_id": p.prompt_id,
            "category": p.category,
            "seed": p.seed,
            "left": model_a if a_left else model_b,
            "right": model_b if a_left else model_a,
            "repeat_of": _item_id(salt, p.prompt_id, p.seed, 0) if repeat else None,
        }
    # Repeats are shuffled in among the originals so raters cannot spot them by position.
    perm = rng.permutation(len(items))
    items = [items[j] for j in perm]
    (out_dir / "items.json").write_text(json.dumps(items, indent=1), encoding="utf-8")
    (out_dir / "index.html").write_text(render_page(items, QUESTIONS), encoding="utf-8")
    key_path.write_text(json.dumps({"model_a": model_a, "model_b": model_b, "seed": seed, "items": key}, indent=1))
    return {"html": out_dir / "index.html", "items": out_dir / "items.json", "key": key_path}


# Inside <script>, "</script>" or "<!--" in a string would end or change the data block: the embedded JSON spells
# every character that HTML or JavaScript could read as markup or a line end as a \u escape (still the same JSON).
_SCRIPT_SAFE = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def script_json(value: Any) -> str:
    """``value`` as JSON that is safe inside an HTML ``<script>`` element, whatever strings it holds."""
    return json.dumps(value, ensure_ascii=False).translate(_SCRIPT_SAFE)


def render_page(items: Sequence[Mapping[str, Any]], questions: Sequence[str]) -> str:
    """The annotation page: the template with the items and questions embedded (one pass, so a prompt that
    contains a placeholder's text is never substituted into)."""
    data = {"/*ITEMS*/[]": script_json(list(items)), "/*QUESTIONS*/[]": script_json(list(questions))}
    template = HTML_TEMPLATE.read_text(encoding="utf-8")
    return re.sub("|".join(map(re.escape, data)), lambda m: data[m.group(0)], template)


def read_annotations(path: str | Path) -> list[dict[str, str]]:
    """Rows ``item_id, annotator_id, question, choice`` from a CSV or a JSON list."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
    else:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    for i, r in enumerate(rows):
        missing = {"item_id", "annotator_id", "question", "choice"} - set(r)
        if missing:
            raise ValueError(f"{path}: row {i + 1} lacks {sorted(missing)}")
    return rows


def ingest(
    annotations: str | Path, key_path: str | Path, bootstrap_samples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Aggregate annotations into per-question results for model A vs model B (see ``key_path``)."""
    key = json.loads(Path(key_path).read_text())
    items: Mapping[str, dict] = key["items"]
    model_a = key["model_a"]
    rows = read_annotations(annotations)
    votes: list[dict[str, Any]] = []
    for i, r in enumerate(rows):
        if r["item_id"] not in items:
            raise ValueError(f"{annotations}: row {i + 1}: unknown item id {r['item_id']!r}")
        if r["choice"] not in CHOICES:
            raise ValueError(f"{annotations}: row {i + 1}: invalid choice {r['choice']!r} (expected one of {CHOICES})")
        if r["question"] not in QUESTIONS:
            raise ValueError(
                f"{annotations}: row {i + 1}: unknown question {r['question']!r} (expected one of {QUESTIONS})"
            )
        meta = items[r["item_id"]]
        winner = "tie" if r["choice"] == "tie" else meta[r["choice"]]
        outcome = "tie" if winner == "tie" else ("win" if winner == model_a else "loss")
        votes.append(
            {
                **r,
                "outcome": outcome,
                "prompt_id": meta["prompt_id"],
                "category": meta["category"],
                "repeat_of": meta["repeat_of"],
                "unit": (meta["prompt_id"], meta["seed"]),
            }
        )
    report: dict[str, Any] = {"model_a": model_a, "model_b": key["model_b"], "num_votes": len(votes), "questions": {}}
    for q in QUESTIONS:
        qv = [v for v in votes if v["question"] == q and v["repeat_of"] is None]
        report["questions"][q] = {
            "overall": summarize(qv, bootstrap_samples, seed),
            "by_category": {
                c: summarize([v for v in qv if v["category"] == c], bootstrap_samples, seed)
                for c in sorted({v["category"] for v in qv})
            },
            "consistency": consistency([v for v in votes if v["question"] == q], items),
            "agreement_krippendorff_alpha": agreement(qv),
        }
    report["pairs"] = {
        q: pair_votes([v for v in votes if v["question"] == q and v["repeat_of"] is None]) for q in QUESTIONS
    }
    return report


def pair_votes(votes: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (prompt, seed) pair: the votes for A, for B and the ties (what ``python -m evaluation agreement`` reads)."""
    counts: dict[tuple[str, int], dict[str, int]] = defaultdict(lambda: {"win": 0, "loss": 0, "tie": 0})
    for v in votes:
        counts[(v["prompt_id"], int(v["unit"][1]))][v["outcome"]] += 1
    return [
        {"prompt_id": p, "seed": s, "a_wins": c["win"], "b_wins": c["loss"], "ties": c["tie"]}
        for (p, s), c in sorted(counts.items())
    ]


def summarize(votes: Sequence[Mapping[str, Any]], bootstrap_samples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """W/T/L, win rate with ties as half and without ties, Wilson 95% and a prompt-resampling bootstrap 95%."""
    w = sum(v["outcome"] == "win" for v in votes)
    t = sum(v["outcome"] == "tie" for v in votes)
    losses = sum(v["outcome"] == "loss" for v in votes)
    n = w + t + losses
    per_prompt: dict[str, list[float]] = defaultdict(list)
    for v in votes:
        per_prompt[v["prompt_id"]].append({"win": 1.0, "tie": 0.5, "loss": 0.0}[v["outcome"]])
    return {
        "wins": w,
        "ties": t,
        "losses": losses,
        "n": n,
        "win_rate_ties_half": (w + 0.5 * t) / n if n else float("nan"),
        "win_rate_no_ties": w / (w + losses) if w + losses else float("nan"),
        "wilson95_ties_half": wilson_interval(w + 0.5 * t, n),
        "wilson95_no_ties": wilson_interval(w, w + losses),
        "bootstrap95_ties_half": bootstrap_interval(list(per_prompt.values()), bootstrap_samples, seed),
    }


def consistency(votes: Sequence[Mapping[str, Any]], items: Mapping[str, dict]) -> dict[str, Any]:
    """Share of (annotator, repeated item) pairs where the same model (or a tie) was chosen both times."""
    first = {(v["annotator_id"], v["item_id"]): v["outcome"] for v in votes if v["repeat_of"] is None}
    pairs = [
        (first.get((v["annotator_id"], v["repeat_of"])), v["outcome"]) for v in votes if v["repeat_of"] is not None
    ]
    pairs = [(a, b) for a, b in pairs if a is not None]
    agree = sum(a == b for a, b in pairs)
    return {"pairs": len(pairs), "consistent": agree, "rate": agree / len(pairs) if pairs else float("nan")}


def agreement(votes: Sequence[Mapping[str, Any]]) -> float:
    """Krippendorff's alpha (nominal) over items rated by several annotators."""
    by_item: dict[str, list[str]] = defaultdict(list)
    for v in votes:
        by_item[v["item_id"]].append(v["outcome"])
    return krippendorff_alpha_nominal(by_item.values())


def _md(text: object) -> str:
    """A string for a Markdown line or table cell: HTML-escaped (renderers pass raw HTML through), pipes and
    line breaks neutralised."""
    return html.escape(" ".join(str(text).split()), quote=False).replace("|", "\\|")


def _alpha_text(alpha: float) -> str:
    return "undefined (every rating the same value, or no item rated twice)" if math.isnan(alpha) else f"{alpha:.3f}"


def _interval_text(interval: Sequence[float]) -> str:
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def _finite(value: Any) -> Any:
    """``value`` with every NaN as None, so ``report.json`` is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


HEADER = ("slice", "W", "T", "L", "win rate (ties 1/2)", "Wilson 95%", "bootstrap 95%", "win rate (no ties)")


def _table_rows(res: Mapping[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for name, s in [("all", res["overall"]), *res["by_category"].items()]:
        rows.append(
            (
                str(name),
                str(s["wins"]),
                str(s["ties"]),
                str(s["losses"]),
                f"{s['win_rate_ties_half']:.3f}",
                _interval_text(s["wilson95_ties_half"]),
                _interval_text(s["bootstrap95_ties_half"]),
                f"{s['win_rate_no_ties']:.3f}",
            )
        )
    return rows


def _agreement_text(res: Mapping[str, Any]) -> str:
    c = res["consistency"]
    return (
        f"Rater consistency on repeated items: {c['consistent']}/{c['pairs']}. "
        f"Krippendorff's alpha: {_alpha_text(res['agreement_krippendorff_alpha'])}."
    )


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``report.md``, ``report.html``, ``report.json`` and ``win_rates.png`` (win rate with both intervals).

    Model names and categories come from the key file: every one is escaped where it lands (HTML, Markdown, the
    plot's labels), so a name holding markup or ``$`` stays text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"Side-by-side: {report['model_a']} vs {report['model_b']}"
    md = [f"# {_md(title)}", "", f"{report['num_votes']} votes.", ""]
    page = [f"<h1>{html.escape(title)}</h1>", f"<p>{report['num_votes']} votes.</p>"]
    fig, ax = plt.subplots(figsize=(5, 3))
    for qi, (q, res) in enumerate(report["questions"].items()):
        rows = _table_rows(res)
        md += [f"## {_md(q)}", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        md += ["| " + " | ".join(_md(cell) for cell in row) + " |" for row in rows]
        md += ["", _md(_agreement_text(res)), ""]
        cells = "".join(f"<th>{html.escape(h)}</th>" for h in HEADER)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
        page += [
            f"<h2>{html.escape(str(q))}</h2>",
            f"<table><tr>{cells}</tr>{body}</table>",
            f"<p>{html.escape(_agreement_text(res))}</p>",
        ]
        o = res["overall"]
        lo, hi = o["bootstrap95_ties_half"]
        ax.errorbar(
            [o["win_rate_ties_half"]],
            [qi],
            xerr=[[o["win_rate_ties_half"] - lo], [hi - o["win_rate_ties_half"]]],
            fmt="o",
            capsize=4,
        )
    ax.axvline(0.5, color="grey", ls="--")
    ax.set_yticks(range(len(report["questions"])), list(report["questions"]))
    ax.set_xlabel(f"win rate of {report['model_a']} (ties 1/2, bootstrap 95%)", parse_math=False)
    ax.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(out_dir / "win_rates.png", dpi=120)
    plt.close(fig)
    (out_dir / "report.md").write_text("\n".join(md) + "\n![win rates](win_rates.png)\n", encoding="utf-8")
    (out_dir / "report.json").write_text(json.dumps(_finite(report), indent=1, ensure_ascii=False), encoding="utf-8")
    style = "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
    (out_dir / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>SBS report</title><style>{style}</style>"
        f"</head><body>{''.join(page)}<img src='win_rates.png' alt='win rates'></body></html>\n",
        encoding="utf-8",
    )
    return {
        "markdown": out_dir / "report.md",
        "html": out_dir / "report.html",
        "json": out_dir / "report.json",
        "plot": out_dir / "win_rates.png",
    }
