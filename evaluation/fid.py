"""FID and KID on clean-fid's features (Parmar et al. 2022, arXiv 2104.11222), with Inception from a local
file or any feature extractor (e.g. an open_clip image tower: FD on CLIP features).

The distances are computed here, not by clean-fid: FID's trace term from the eigenvalues of the symmetric
``sqrt(S1) S2 sqrt(S1)`` (no ``scipy.linalg.sqrtm``, whose ``disp`` argument clean-fid passes and SciPy 1.18
removes), KID with clean-fid's estimator but subsets drawn from a seeded generator (clean-fid draws them from the
global ``np.random``, so the same features gave another KID on every call when the sets differ in size).

An extractor is ``f(x) -> [B, D]`` for ``x`` float [B, 3, 299, 299] in 0..255 (clean-fid's convention,
after its resize). Reference statistics are cached under a key of (dataset, split, resolution, count,
extractor). Every result names the extractor and the implementation.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from evaluation.images import ImageRecord, write_folder

Extractor = Callable[[torch.Tensor], torch.Tensor]
INCEPTION_FILE = "inception-2015-12-05.pt"


def implementation() -> str:
    """The FID implementation a score file records: clean-fid's version and features, k3lab's FID and KID."""
    from importlib.metadata import version

    return f"clean-fid {version('clean-fid')} features (mode=clean); k3lab evaluation FID (eigh) and seeded KID"


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets [N, D] (float64). The trace of the
    square root is the sum of sqrt(eigenvalues) of sqrt(S_a) S_b sqrt(S_a), which has the same spectrum."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"FID needs two [N >= 2, D] feature sets of one width, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = _psd_sqrt(s_a)
    middle = root @ s_b @ root
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum())
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2 * tr_covmean)


def kernel_distance(
    feats_a: np.ndarray, feats_b: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0
) -> float:
    """KID (Binkowski et al. 2018, arXiv 1801.01401): the unbiased MMD^2 with the cubic polynomial kernel, averaged
    over ``num_subsets`` subsets of ``min(N_a, N_b, max_subset_size)`` samples drawn without replacement from a
    generator seeded by ``seed`` (clean-fid's estimator and defaults; the same features give the same KID)."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    n = a.shape[1]
    m = min(len(a), len(b), max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = b[rng.choice(len(b), m, replace=False)]
        y = a[rng.choice(len(a), m, replace=False)]
        k = (x @ x.T / n + 1) ** 3 + (y @ y.T / n + 1) ** 3
        cross = (x @ y.T / n + 1) ** 3
        total += (k.sum() - np.diag(k).sum()) / (m - 1) - cross.sum() * 2 / m
    return float(total / num_subsets / m)


def inception_extractor(weights: str | Path) -> Extractor:
    """clean-fid's standard TorchScript Inception from a local file (never downloaded)."""
    path = Path(weights)
    if path.is_dir():
        path = path / INCEPTION_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {path}. Offline, place clean-fid's TorchScript file {INCEPTION_FILE} "
            "there "
            "(from https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt) "
            "or pass another feature extractor."
        )
    from cleanfid.inception_torchscript import InceptionV3W

    model = InceptionV3W(str(path.parent), download=False).eval()
    return lambda x: model(x)


def open_clip_extractor(model: Any, image_size: int, mean: Sequence[float], std: Sequence[float]) -> Extractor:
    """An open_clip image tower as an extractor: 0..255 input -> resized, normalised -> image embedding."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)

    @torch.no_grad()
    def extract(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(
            x / 255.0, size=(image_size, image_size), mode="bicubic", antialias=True, align_corners=False
        )
        return model.encode_image((x - m.to(x)) / s.to(x)).float()

    return extract


def checked(extractor: Extractor) -> Extractor:
    """Wrap an extractor so a wrong output shape is an error naming both shapes."""

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        out = extractor(x)
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"feature extractor returned {shape} for a batch of {x.shape[0]}: expected [B, D]")
        return out

    return run


def folder_features(
    directory: str | Path, extractor: Extractor, batch_size: int = 32, verbose: bool = True
) -> np.ndarray:
    """Features of every image file in a folder (clean-fid's resize, then the extractor)."""
    from cleanfid.fid import get_folder_features

    return get_folder_features(
        str(directory),
        model=checked(extractor),
        num_workers=0,
        batch_size=batch_size,
        device=torch.device("cpu"),
        mode="clean",
        verbose=verbose,
    )


def record_features(
    records: Sequence[ImageRecord], extractor: Extractor, batch_size: int = 32, verbose: bool = True
) -> np.ndarray:
    """Features of in-memory images (written to a temporary folder so clean-fid's exact pipeline applies)."""
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(records, tmp)
        return folder_features(tmp, extractor, batch_size, verbose)


def distances(feats_a: np.ndarray, feats_b: np.ndarray) -> dict[str, float]:
    """FID (Frechet distance) and KID (x1000 in many papers; here the raw value) between two feature sets."""
    return {"fid": frechet_distance(feats_a, feats_b), "kid": kernel_distance(feats_a, feats_b)}


def cache_key(dataset: str, split: str, resolution: int, count: int, extractor_name: str) -> str:
    """A short hash naming the cached reference features of a dataset split, count, size and extractor."""
    return hashlib.sha256(json.dumps([dataset, split, resolution, count, extractor_name]).encode()).hexdigest()[:16]


def reference_features(
    cache_dir: str | Path,
    dataset: str,
    split: str,
    resolution: int,
    extractor_name: str,
    records: Callable[[], Sequence[ImageRecord]],
    extractor: Extractor,
) -> np.ndarray:
    """Reference features, computed once per (dataset, split, resolution, count, extractor) and cached as .npz."""
    items = records()
    path = (
        Path(cache_dir) / f"{dataset}-{split}-{cache_key(dataset, split, resolution, len(items), extractor_name)}.npz"
    )
    if path.is_file():
        return np.load(path)["features"]
    feats = record_features(items, extractor)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        features=feats,
        dataset=dataset,
        split=split,
        resolution=resolution,
        count=len(items),
        extractor=extractor_name,
    )
    return feats


def compute(
    generated: Sequence[ImageRecord], reference: np.ndarray, extractor: Extractor, extractor_name: str
) -> dict[str, Any]:
    """FID/KID of generated images against reference features, as a JSON-ready dict."""
    feats = record_features(generated, extractor)
    return {
        **distances(feats, reference),
        "extractor": extractor_name,
        "implementation": implementation(),
        "num_generated": len(generated),
        "num_reference": int(reference.shape[0]),
    }
