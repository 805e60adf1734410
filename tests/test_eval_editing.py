"""The editing benchmark: tasks edit the caption exactly where the mask is, the scores separate a correct edit from
the trivial baselines, and task files round-trip through the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation import editing
from evaluation.__main__ import main as evaluation_main
from evaluation.images import load_shards
from k3lab.data.scene_captions import SHAPE_WORDS
from k3lab.data.scene_render import render
from k3lab.data.scene_spec import Scene, SceneObject
from k3lab.data.scene_world import SceneWorld


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    shards = SceneWorld(
        root=str(tmp_path_factory.mktemp("edit")), seed=5, num_train=0, num_val=0, num_test=160, num_heldout=0
    ).build()
    return shards["test"]


@pytest.fixture(scope="module")
def tasks(world: list[str]) -> list[editing.EditTask]:
    return editing.make_tasks(((r.image, r.spec, r.prompt) for r in load_shards(world)), 48, seed=0)


def oracle(task: editing.EditTask, spec: dict) -> np.ndarray:
    """The scene re-rendered with the requested edit, the original pasted outside the hole."""
    objects = []
    for o in spec["objects"]:
        if (o["x"], o["y"]) == (task.target["x"], task.target["y"]):
            o = dict(o, color=task.target["color"], shape=task.target["shape"])
        objects.append(SceneObject(o["shape"], o["color"], o["size"], o["x"], o["y"], o["radius"]))
    edited = np.asarray(render(Scene(spec["kind"], objects), task.image.shape[0]))
    return np.where(task.hole[..., None], edited, task.image)


def test_nouns_match_the_scene_world() -> None:
    assert {k: tuple(s for s, _ in v) for k, v in SHAPE_WORDS.items()} == editing.SHAPE_NOUNS


def test_tasks_edit_one_phrase_and_mask_its_object(tasks: list[editing.EditTask]) -> None:
    assert len(tasks) == 48 and {t.kind for t in tasks} == {"color", "shape"}
    for t in tasks:
        before, after = t.source_prompt.split(), t.prompt.split()
        changed = [(a, b) for a, b in zip(before, after, strict=False) if a != b]
        if t.kind == "color":
            assert len(before) == len(after) and len(changed) == 1 and changed[0][1] == t.target["color"]
            assert t.target["color"] not in {o["color"] for o in t.others}
        else:
            nouns = editing.SHAPE_NOUNS[t.target["shape"]]
            assert any(re.search(rf"\b{t.target['color']} {n}\b", t.prompt) for n in nouns)
        h, w = t.hole.shape
        cx, cy, r = t.target["x"] * w, t.target["y"] * h, t.target["radius"] * w
        assert t.hole[int(cy), int(cx)] and t.hole[int(cy - r * 0.9), int(cx - r * 0.9)]  # centre and box corner
        assert 0 < t.hole.mean() < 0.5


def test_scores_separate_a_correct_edit_from_the_baselines(world: list[str], tasks: list[editing.EditTask]) -> None:
    specs = {r.prompt: r.spec for r in load_shards(world)}
    good = editing.score([oracle(t, specs[t.source_prompt]) for t in tasks], tasks)
    assert good["target"] >= 0.9 and good["exact_outside"] == 1.0 and good["psnr_outside"] == 100.0
    assert good["others_kept"] >= good["others_kept_real"] - 0.05 and good["others_kept_real"] >= 0.9
    base = editing.baselines(tasks)
    assert base["copy"]["target"] == 0.0 and base["copy"]["exact_outside"] == 1.0
    assert base["mean_fill"]["target"] == 0.0 and base["mean_fill"]["others_kept"] >= 0.9
    # the same edit without paste-back: a darkened frame outside the hole costs PSNR but not the target
    dim = [np.where(t.hole[..., None], oracle(t, specs[t.source_prompt]), t.image // 2) for t in tasks]
    worse = editing.score(dim, tasks)
    assert worse["target"] == good["target"] and worse["exact_outside"] == 0.0 and worse["psnr_outside"] < 20
    with pytest.raises(ValueError, match="results for"):
        editing.score(dim[:3], tasks)


def test_task_files_round_trip_through_the_cli(world: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert evaluation_main(["editing-tasks", "::".join(world), "--out-dir", str(tmp_path / "t"), "--num", "12"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["tasks"] == 12 and made["baselines"]["copy"]["target"] == 0.0
    loaded = editing.load_tasks(tmp_path / "t")
    assert [t.prompt for t in loaded] == [t.prompt for t in editing.make_tasks(
        ((r.image, r.spec, r.prompt) for r in load_shards(world)), 12, seed=0)]  # fmt: skip
    specs = {r.prompt: r.spec for r in load_shards(world)}
    (tmp_path / "r").mkdir()
    for t in loaded:
        Image.fromarray(oracle(t, specs[t.source_prompt])).save(tmp_path / "r" / f"{t.task_id}.png")
    assert evaluation_main(["editing-score", str(tmp_path / "t"), str(tmp_path / "r")]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["model"]["target"] >= 0.9 and scored["model"]["exact_outside"] == 1.0
    (tmp_path / "r" / f"{loaded[0].task_id}.png").unlink()
    assert evaluation_main(["editing-score", str(tmp_path / "t"), str(tmp_path / "r")]) == 2
    assert f"missing or unreadable result for task {loaded[0].task_id}" in capsys.readouterr().err
