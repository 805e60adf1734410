"""The deterministic detector: 100% on the generator's own renders for every task, 0% on noise and blank images, ~10%
at chance (renders judged against another scene's prompt), and each task failing on the one thing it checks."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from evaluation import compbench, detector
from k3lab.data import scene_spec
from k3lab.data.scene_world import SceneWorld


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[np.ndarray, dict]]:
    shards = SceneWorld(
        root=str(tmp_path_factory.mktemp("cb")),
        seed=11,
        num_train=600,
        num_val=0,
        num_test=0,
        num_heldout=200,
        shard_size=1000,
    ).build()
    items = []
    for shard in shards["train"] + shards["heldout"]:
        with tarfile.open(shard) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar}
        for name in sorted(files):
            if name.endswith(".png"):
                spec = json.loads(files[name[:-4] + ".json"])
                items.append((np.asarray(Image.open(io.BytesIO(files[name])).convert("RGB")), spec))
    return items


def test_palette_matches_the_generator() -> None:
    assert detector.PALETTE == scene_spec.COLORS and detector.BACKGROUND == scene_spec.BACKGROUND
    assert set(detector.SHAPES) == set(scene_spec.SHAPES)


def test_ground_truth_scores_100_percent_on_every_task(renders: list) -> None:
    """docs/evaluation.md: 100% on the generator's renders, every task, both splits."""
    report = compbench.score(renders)
    tasks = report["all"]["tasks"]
    assert set(tasks) == set(compbench.TASKS)
    assert all(acc == 1.0 for acc in tasks.values()), tasks
    assert report["heldout"]["overall"] == 1.0 and report["train"]["overall"] == 1.0
    print("ground truth:", {k: round(v, 4) for k, v in tasks.items()})


def test_noise_scores_zero_and_other_prompts_about_ten_percent(renders: list) -> None:
    """docs/evaluation.md: 0% on noise (and on blank images), ~10% on renders judged against another scene's prompt
    (9.5% on this world: within 2 points of 10% asserted)."""
    rng = np.random.default_rng(0)
    noise = [(rng.integers(0, 256, size=img.shape, dtype=np.uint8), spec) for img, spec in renders[:300]]
    report = compbench.score(noise)
    assert report["all"]["overall"] == 0.0, report["all"]
    blank = [(np.full_like(img, 245), spec) for img, spec in renders[:100]]
    assert compbench.score(blank)["all"]["overall"] == 0.0
    # chance level with real scenes: each render judged against another scene's prompt
    shuffled = [(renders[i][0], renders[(i + 7) % len(renders)][1]) for i in range(len(renders))]
    chance = compbench.score(shuffled)["all"]
    print("shuffled prompts:", {k: round(v, 3) for k, v in chance["tasks"].items()}, round(chance["overall"], 3))
    assert chance["overall"] == pytest.approx(0.10, abs=0.02)


def test_wrong_colour_or_position_fails(renders: list) -> None:
    img, spec = next((i, s) for i, s in renders if s["kind"] == "relation")
    assert all(compbench.check(spec, detector.detect(img)).values())
    mirrored = img[:, ::-1] if spec["relations"][0]["relation"] in ("left of", "right of") else img[::-1]
    assert not compbench.check(spec, detector.detect(np.ascontiguousarray(mirrored)))["position"]
    recoloured = img.copy()
    obj = spec["objects"][0]
    mask = np.all(np.abs(img.astype(int) - np.array(scene_spec.COLORS[obj["color"]])) < 30, axis=-1)
    other = next(
        c
        for c in scene_spec.COLORS.values()
        if c != scene_spec.COLORS[obj["color"]] and c != scene_spec.COLORS[spec["objects"][1]["color"]]
    )
    recoloured[mask] = other
    assert not compbench.check(spec, detector.detect(recoloured))["color_attr"]


def test_counting_passes_only_the_exact_count(renders: list) -> None:
    """A count scene passes counting at its own count and fails at one more or one fewer (an off-by-one judge would
    move the chance rate too little for the rate test to see)."""
    counts = [(img, spec) for img, spec in renders if spec["kind"] == "count"]
    assert len(counts) >= 20
    for img, spec in counts[:20]:
        dets = detector.detect(img)
        assert compbench.check(spec, dets)["counting"]
        for n in (spec["count"]["n"] - 1, spec["count"]["n"] + 1):
            assert not compbench.check({**spec, "count": {**spec["count"], "n": n}}, dets)["counting"], (spec, n)


def test_detect_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"RGB image \[H, W, 3\]"):
        detector.detect(np.zeros((8, 8), dtype=np.uint8))
