"""Prompt-set loaders: small files in each public format that the tests write themselves (always), and the real
public files in ../shared/prompt-sets (or $K3LAB_SHARED) with their exact counts, when that folder is there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.prompts import (
    Prompt,
    PromptSet,
    load_drawbench,
    load_geneval,
    load_jsonl,
    load_own_prompts,
    load_partiprompts,
    load_scene_world,
    load_t2i_compbench,
)

from conftest import SHARED

PROMPTS = SHARED / "prompt-sets"
real_files = pytest.mark.skipif(
    not PROMPTS.is_dir(), reason=f"the public prompt sets are not at {PROMPTS} (set K3LAB_SHARED)"
)


def test_partiprompts_format(tmp_path: Path) -> None:
    path = tmp_path / "PartiPrompts.tsv"
    path.write_text(
        "Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\tBiology-inspired\n"
        'a red cube on a blue sphere\tArtifacts\tPerspective\t\n"quoted, with tab-free text"\tAbstract\tBasic\tn\n'
    )
    ps = load_partiprompts(path)
    assert [p.text for p in ps] == ["bond", "a red cube on a blue sphere", "quoted, with tab-free text"]
    assert ps.categories() == {"Abstract": 2, "Artifacts": 1} and ps[1].spec["challenge"] == "Perspective"


def test_geneval_format(tmp_path: Path) -> None:
    rows = [
        {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
        {"tag": "counting", "include": [{"class": "cow", "count": 3}], "prompt": "a photo of three cows"},
    ]
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ps = load_geneval(path)
    assert [p.category for p in ps] == ["single_object", "counting"] and ps[1].spec["include"] == [
        {"class": "cow", "count": 3}
    ]
    assert ps[0].text == "a photo of a bench"


def test_t2i_compbench_format(tmp_path: Path) -> None:
    (tmp_path / "color_val.txt").write_text("a green bench and a blue bowl\na blue bench and a green bowl\n")
    (tmp_path / "3d_spatial_val.txt").write_text("a dog in front of a desk\n")
    ps = load_t2i_compbench(tmp_path)
    assert (
        ps.categories() == {"color": 2, "3d_spatial": 1}
        and ps.filter(["color"])[0].text == "a green bench and a blue bowl"
    )


@real_files
def test_partiprompts() -> None:
    ps = load_partiprompts(PROMPTS / "partiprompts" / "PartiPrompts.tsv")
    assert len(ps) == 1632
    assert len(ps.categories()) == 12 and "Abstract" in ps.categories()
    assert len({p.spec["challenge"] for p in ps}) == 11
    assert ps[0].text == "bond"


@real_files
def test_geneval() -> None:
    ps = load_geneval(PROMPTS / "geneval" / "evaluation_metadata.jsonl")
    assert len(ps) == 553
    assert set(ps.categories()) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert ps[0].spec["include"] == [{"class": "bench", "count": 1}]


@real_files
def test_t2i_compbench() -> None:
    ps = load_t2i_compbench(PROMPTS / "t2i-compbench")
    cats = ps.categories()
    assert set(cats) == {"color", "shape", "texture", "spatial", "non_spatial", "complex", "numeracy", "3d_spatial"}
    assert all(295 <= n <= 300 for n in cats.values()), cats
    assert ps.filter(["color"])[0].text == "a green bench and a blue bowl"


def test_drawbench_csv(tmp_path: Path) -> None:
    path = tmp_path / "drawbench.csv"
    path.write_text('Prompts,Category\n"A red colored car.",Colors\n"A cat on the left of a dog.",Positional\n')
    ps = load_drawbench(path)
    assert [p.category for p in ps] == ["Colors", "Positional"] and ps[0].text == "A red colored car."
    bad = tmp_path / "bad.csv"
    bad.write_text("text,kind\na,b\n")
    with pytest.raises(
        ValueError, match=r"bad\.csv: not a DrawBench CSV: missing column\(s\) \['Category', 'Prompts'\]"
    ):
        load_drawbench(bad)


def test_own_prompt_set_has_21_categories() -> None:
    ps = load_own_prompts()
    assert len(ps.categories()) == 21 and all(n == 5 for n in ps.categories().values())


def test_round_trip_and_duplicates(tmp_path: Path) -> None:
    ps = PromptSet("x", [Prompt("a", "one", "c", {"k": 1}), Prompt("b", "two", "d")])
    back = load_jsonl(ps.to_jsonl(tmp_path / "x.jsonl"))
    assert [(p.id, p.text, p.category, p.spec) for p in back] == [("a", "one", "c", {"k": 1}), ("b", "two", "d", None)]
    with pytest.raises(ValueError, match="duplicate prompt id 'a'"):
        PromptSet("y", [Prompt("a", "one"), Prompt("a", "two")])


def test_scene_world_prompts(tmp_path: Path) -> None:
    from k3lab.data.scene_world import SceneWorld

    shards = SceneWorld(root=str(tmp_path), num_train=10, num_val=5, num_test=5, num_heldout=6, shard_size=10).build()
    ps = load_scene_world(shards["heldout"])
    assert len(ps) == 6 and all(p.spec["split"] == "heldout" and p.spec["caption"] == p.text for p in ps)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        load_partiprompts(tmp_path / "nope.tsv")
