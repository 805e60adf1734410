"""The work behind ``python -m k3lab.precompute`` (usage: :mod:`k3lab.precompute`): captions (and optionally
latents) encoded once into webdataset shards, and :class:`PrecomputedShards`, the data source that reads them."""

from __future__ import annotations

import io
import json
import logging
import sys
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from k3lab.data.options import StreamOrder
from k3lab.data.shards import ShardDataset, iter_tar_samples
from k3lab.io.checkpoint import atomic_write_bytes

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


class PrecomputedShards:
    """A ``data.source`` over a precompute output folder: ``build()`` reads its manifest (split -> shards)."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)

    def build(self) -> dict[str, list[str]]:
        """The precomputed shards per split from the folder's manifest; an error names the command that writes them."""
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no precomputed shards here; write them with python -m k3lab.precompute (same experiment and "
                "overrides)"
            )
        manifest = json.loads(path.read_text())
        return {split: [str(self.root / name) for name in names] for split, names in manifest["shards"].items()}


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def _flush(out_dir: Path, name: str, samples: list[dict[str, Any]]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for ext, data in s.items():
                if ext != "__key__":
                    _add(tar, f"{s['__key__']}.{ext}", data)
    atomic_write_bytes(out_dir / name, buf.getvalue())


@torch.no_grad()
def _encode(
    batch: list[tuple[dict[str, Any], dict[str, Any]]],
    encoder: Any,
    first_stage: Any,
    device: torch.device,
    clip: Any = None,
) -> list[dict[str, Any]]:
    """Output samples: the raw members plus ``text.npy`` (real tokens only) and optionally ``latent.npy`` and
    ``clip_image.npy`` (the frozen conditioning CLIP's image embedding, for the mapping-prior arm)."""
    hidden, mask = encoder.encode([s["caption"] for _, s in batch])
    images = torch.stack([s["image"] for _, s in batch]).to(device) if first_stage is not None or clip else None
    latents = first_stage.encode(images) if first_stage is not None else None
    embeddings = clip.embed_images(images).float() if clip is not None else None
    out = []
    for i, (raw, _) in enumerate(batch):
        sample = {k: v for k, v in raw.items() if not k.endswith(".npy")}
        sample["text.npy"] = _npy(hidden[i, : int(mask[i].sum())].float().cpu().numpy())
        if latents is not None:
            sample["latent.npy"] = _npy(latents[i].float().cpu().numpy())
        if embeddings is not None:
            sample["clip_image.npy"] = _npy(embeddings[i].cpu().numpy())
        out.append(sample)
    return out


@torch.no_grad()
def precompute(cfg: DictConfig) -> Path:
    """Write the precomputed shards for every split of ``cfg.data``; returns the output folder."""
    pc = cfg.precompute
    out_dir = Path(pc.output_dir)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    splits = datamodule.split_urls()
    encoder = instantiate(cfg.model.text_encoder.encoder)
    first_stage = instantiate(cfg.stage.first_stage) if pc.latents else None
    clip = None
    if pc.get("image_embeddings"):
        if OmegaConf.select(cfg, "mapping.clip") is None:
            raise ValueError(
                "precompute.image_embeddings=true embeds the images with the mapping arm's CLIP: add "
                "model/prior=diffusion_mapping mapping.clip.checkpoint=<clip.safetensors>"
            )
        clip = instantiate(cfg.mapping.clip).to(torch.device(pc.device))
    device = torch.device(pc.device)
    encoder.to(device)
    if first_stage is not None:
        first_stage.to(device)
    # the data's own format, read whole: every image decoded, no precomputed members (they are being written)
    reader = ShardDataset(
        [],
        datamodule.resolution,
        replace(datamodule.format, feature_keys=(), decode_images=True),
        StreamOrder(shuffle=False),
    )
    manifest: dict[str, Any] = {
        "text_encoder": OmegaConf.to_container(cfg.model.text_encoder, resolve=True),
        "latents": bool(pc.latents),
        "first_stage": OmegaConf.select(cfg, "stage.first_stage.checkpoint"),
        "image_embeddings": OmegaConf.select(cfg, "mapping.clip.checkpoint") if clip is not None else None,
        "resolution": datamodule.resolution,
        "shards": {},
        "counts": {},
        "skipped": {},
    }
    for split, urls in splits.items():
        urls = list(dict.fromkeys(urls))  # a folder's training list repeats its shards (data.source.repeats)
        skipped: Counter[str] = Counter()
        names: list[str] = []
        pending: list[tuple[dict[str, Any], dict[str, Any]]] = []
        shard: list[dict[str, Any]] = []
        count = 0
        bar = tqdm(desc=f"precompute {split}", unit="sample", mininterval=5, file=sys.stdout)
        for url in urls:
            for raw in iter_tar_samples(url, skipped):
                sample = reader.decode(raw, url, skipped)
                bar.update(1)
                if sample is None:
                    continue
                raw = dict(raw, __key__=f"{Path(url).stem}_{raw['__key__']}")
                pending.append((raw, sample))
                if len(pending) == pc.batch_size:
                    shard.extend(_encode(pending, encoder, first_stage, device, clip))
                    pending = []
                while len(shard) >= pc.shard_size:
                    names.append(f"{split}-{len(names):05d}.tar")
                    _flush(out_dir, names[-1], shard[: pc.shard_size])
                    count += pc.shard_size
                    del shard[: pc.shard_size]
        if pending:
            shard.extend(_encode(pending, encoder, first_stage, device, clip))
        if shard:
            names.append(f"{split}-{len(names):05d}.tar")
            _flush(out_dir, names[-1], shard)
            count += len(shard)
        bar.close()
        manifest["shards"][split], manifest["counts"][split], manifest["skipped"][split] = names, count, dict(skipped)
        log.info(
            "%s: %d samples in %d shards%s", split, count, len(names), f", skipped {dict(skipped)}" if skipped else ""
        )
    atomic_write_bytes(out_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
    keys = "[text.npy,latent.npy]" if pc.latents else "[text.npy]"
    log.info(
        "train on them: python -m k3lab.train <same overrides> data=precomputed data.source.root=%s "
        "data.format.feature_keys=%s stage.text_encoder=null",
        out_dir,
        keys,
    )
    return out_dir
