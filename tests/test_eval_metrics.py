"""FID/KID through clean-fid with a custom extractor, CLIP score and the reference CLIP, all offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from evaluation import fid
from evaluation.clip_score import clip_score, load_clip
from evaluation.images import ImageRecord, load_folder, load_shards, write_folder


def random_features_net() -> torch.nn.Module:
    """A fixed random conv net: a deterministic custom feature extractor (clean-fid's custom_feat_extractor
    contract)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 5, stride=4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 5, stride=4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
    ).eval()


@pytest.fixture(scope="module")
def scene_records(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[ImageRecord]]:
    from k3lab.data.scene_world import SceneWorld

    shards = SceneWorld(
        root=str(tmp_path_factory.mktemp("m")),
        seed=5,
        num_train=2000,
        num_val=300,
        num_test=0,
        num_heldout=0,
        shard_size=1000,
    ).build()
    return {"train": list(load_shards(shards["train"])), "val": list(load_shards(shards["val"]))}


def blur(records: list[ImageRecord], radius: float) -> list[ImageRecord]:
    if radius == 0:
        return records
    return [
        ImageRecord(
            np.asarray(Image.fromarray(r.image).filter(ImageFilter.GaussianBlur(radius))), r.prompt_id, r.prompt, r.seed
        )
        for r in records
    ]


def test_fid_self_is_zero_and_grows_with_distortion(scene_records: dict, tmp_path: Path) -> None:
    net = random_features_net()

    def extractor(x: torch.Tensor) -> torch.Tensor:
        return net(x / 255.0)

    base = scene_records["val"][:200]
    ref = fid.record_features(base, extractor, verbose=False)
    values = [
        fid.distances(fid.record_features(blur(base, r), extractor, verbose=False), ref)["fid"]
        for r in (0, 0.5, 1.0, 2.0)
    ]
    assert abs(values[0]) < 1e-3, values
    assert all(a < b for a, b in zip(values, values[1:], strict=False)), values


def test_fid_equals_a_direct_clean_fid_call(scene_records: dict, tmp_path: Path) -> None:
    from cleanfid import fid as cfid

    net = random_features_net()

    def extractor(x: torch.Tensor) -> torch.Tensor:
        return net(x / 255.0)

    a, b = (
        write_folder(scene_records["val"][:100], tmp_path / "a"),
        write_folder(blur(scene_records["val"][100:200], 1.0), tmp_path / "b"),
    )
    ours = fid.distances(
        fid.folder_features(a, extractor, verbose=False), fid.folder_features(b, extractor, verbose=False)
    )["fid"]
    direct = cfid.compute_fid(
        str(a),
        str(b),
        mode="clean",
        custom_feat_extractor=extractor,
        device=torch.device("cpu"),
        num_workers=0,
        verbose=False,
        use_dataparallel=False,
    )
    assert ours == pytest.approx(direct, rel=1e-5)  # (eigh here, sqrtm there: equal up to float rounding)


def test_inception_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"Inception weights not found at {tmp_path}/inception-2015-12-05\.pt"):
        fid.inception_extractor(tmp_path)


def test_wrong_extractor_shape_is_named(scene_records: dict) -> None:
    with pytest.raises(ValueError, match=r"feature extractor returned \(4, 3, 2\) for a batch of 4"):
        fid.checked(lambda x: torch.zeros(4, 3, 2))(torch.zeros(4, 3, 299, 299))


def test_reference_clip_learns_and_scores(scene_records: dict, tmp_path: Path) -> None:
    from evaluation import reference_clip

    report = reference_clip.train(
        scene_records["train"], scene_records["val"][:100], tmp_path / "clip", steps=120, batch_size=64, lr=2e-3
    )
    r = report["heldout_retrieval"]
    assert r["image_to_text_top1"] > 5 * r["chance"], r
    clip = reference_clip.load_reference(tmp_path / "clip")
    val = scene_records["val"][:64]
    matched = clip_score(clip, [x.image for x in val], [x.prompt for x in val])["clip_score"]
    shuffled = clip_score(clip, [x.image for x in val], [x.prompt for x in val[1:] + val[:1]])["clip_score"]
    assert matched > shuffled, (matched, shuffled)
    assert json.loads((tmp_path / "clip" / "report.json").read_text())["heldout_retrieval"] == r
    # FD on CLIP features: the open_clip image tower as clean-fid's custom extractor
    size = clip.model.visual.image_size
    extractor = fid.open_clip_extractor(
        clip.model, size[0] if isinstance(size, tuple) else size, reference_clip.OPENAI_MEAN, reference_clip.OPENAI_STD
    )
    ref = fid.record_features(val, extractor, verbose=False)
    assert ref.shape == (64, 64)
    assert abs(fid.distances(ref, ref)["fid"]) < 1e-3
    assert (
        fid.compute(blur(val, 2.0), ref, extractor, clip.name)["fid"]
        > fid.compute(val, ref, extractor, clip.name)["fid"] + 1e-3
    )


def test_reference_statistics_are_cached_by_key(scene_records: dict, tmp_path: Path) -> None:
    net = random_features_net()
    calls = []

    def extractor(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return net(x / 255.0)

    def records() -> list:
        return scene_records["val"][:40]

    first = fid.reference_features(tmp_path, "scene_world", "val", 64, "randnet", records, extractor)
    n_calls = len(calls)
    second = fid.reference_features(tmp_path, "scene_world", "val", 64, "randnet", records, extractor)
    assert np.array_equal(first, second) and len(calls) == n_calls  # served from the cache
    fid.reference_features(tmp_path, "scene_world", "val", 64, "other-extractor", records, extractor)
    assert len(calls) > n_calls and len(list(tmp_path.glob("*.npz"))) == 2  # the extractor is part of the key


def test_clip_score_definition_and_missing_weights(tmp_path: Path) -> None:
    """clip_score computes Hessel et al.'s per-image form, 100 * mean(max(cos, 0)), checked by hand on a small random
    open_clip model saved and loaded from local files; torchmetrics' form clamps the mean and differs here."""
    import open_clip

    from evaluation.reference_clip import NAME, model_config

    with pytest.raises(FileNotFoundError, match=r"CLIP weights for 'ViT-B-32' not found at .*nope\.pt"):
        load_clip("ViT-B-32", tmp_path / "nope.pt")
    config = tmp_path / f"{NAME}.json"
    config.write_text(json.dumps(model_config(32)))
    open_clip.add_model_config(config)
    torch.manual_seed(7)
    model = open_clip.create_model(NAME)
    with torch.no_grad():  # perturbed so that cosines take both signs (a fresh init gives only positive ones here)
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    clip = load_clip(NAME, tmp_path / "w.pt", config)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(12)]
    prompts = [f"a {c} circle" for c in ("red", "blue", "green", "yellow")] * 3
    result = clip_score(clip, images, prompts)
    cos = (clip.embed_images(images) * clip.embed_texts(prompts)).sum(-1).numpy()
    assert (cos < 0).any() and (cos > 0).any()  # both signs: the two forms must differ
    assert result["per_image"] == pytest.approx(list(100 * np.maximum(cos, 0)), abs=1e-4)
    assert result["clip_score"] == pytest.approx(100 * np.maximum(cos, 0).mean(), abs=1e-4)
    assert (
        abs(result["clip_score"] - 100 * max(cos.mean(), 0)) > 0.1
    )  # torchmetrics' clamp-the-mean form is another number


def test_folder_errors_name_the_file(tmp_path: Path) -> None:
    rec = ImageRecord(np.zeros((8, 8, 3), dtype=np.uint8), "p0", "a prompt")
    folder = write_folder([rec], tmp_path / "f")
    assert len(load_folder(folder, expected=1)) == 1
    with pytest.raises(ValueError, match=r"1 images but 2 expected"):
        load_folder(folder, expected=2)
    (folder / "p0_0.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"unreadable image .*p0_0\.png"):
        load_folder(folder)
    (folder / "p0_0.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"line 1: image not found: .*p0_0\.png"):
        load_folder(folder)


def test_fid_has_its_closed_form_and_needs_no_scipy_sqrtm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gaussians with diagonal covariances: FID = |mu_a - mu_b|^2 + sum (sqrt(va) - sqrt(vb))^2, computed from
    samples whose moments are exact; scipy.linalg.sqrtm is never called (SciPy 1.18 drops the `disp` argument
    clean-fid passes to it)."""
    import scipy.linalg

    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sqrtm used")))
    rng = np.random.default_rng(0)
    d = 6
    z = rng.standard_normal((4000, d))
    z = (z - z.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # exactly zero mean, cov I
    mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
    var_a, var_b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    a, b = mu_a + z * np.sqrt(var_a), mu_b + z[::-1] * np.sqrt(var_b)
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert fid.distances(a, b)["fid"] == pytest.approx(expected, rel=1e-9)
    assert fid.distances(a, a)["fid"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="FID needs"):
        fid.frechet_distance(a[:1], b)


def test_kid_is_reproducible_and_is_clean_fids_estimator() -> None:
    from cleanfid.fid import kernel_distance as clean_kid

    rng = np.random.default_rng(1)
    gen, ref = rng.standard_normal((128, 16)), rng.standard_normal((512, 16)) + 0.3
    first = fid.distances(gen, ref)["kid"]
    np.random.seed(123)
    np.random.rand(7)  # whatever the global stream does in between
    assert fid.distances(gen, ref)["kid"] == first  # the outside check: 128 vs 512 features, the same KID twice
    assert fid.kernel_distance(gen, ref, seed=1) != first  # the subsets do depend on the seed
    # with subsets as large as both sets every draw is a permutation: clean-fid's value, whatever its random draws
    same_size = rng.standard_normal((64, 16))
    assert fid.kernel_distance(gen[:64], same_size, num_subsets=3) == pytest.approx(
        clean_kid(gen[:64], same_size, num_subsets=3), rel=1e-5
    )  # (sums of permuted matrices: the same value up to float rounding of a difference of large sums)
