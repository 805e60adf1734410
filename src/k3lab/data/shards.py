"""Reading img2dataset-style webdataset shards: streaming, decoding, and counted skips of bad samples."""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import IterableDataset, get_worker_info

from k3lab.data.options import FEATURES, SampleFormat, StreamOrder, group_of
from k3lab.data.skips import SkipLog

log = logging.getLogger(__name__)

SKIP_REASONS = (
    "missing_image",
    "undecodable_image",
    "image_too_small",
    "missing_caption",
    "empty_caption",
    "missing_features",
    "corrupt_features",
    "corrupt_shard",
    "unreadable_shard",
)


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Brace patterns (``a-{000..009}.tar``), ``::``-separated lists, or a list of those -> shard urls."""
    from braceexpand import braceexpand

    items = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in items:
        for part in str(item).split("::"):
            urls.extend(braceexpand(part))
    return urls


def is_local(url: str) -> bool:
    """A plain path or ``file://`` url (not ``pipe:`` and not a remote scheme)."""
    return not url.startswith("pipe:") and ("://" not in url or url.startswith("file://"))


def missing_local_shards(urls: Sequence[str]) -> list[str]:
    """Local shard paths that do not exist (``pipe:`` and remote urls are not checked)."""
    return [u for u in urls if is_local(u) and not Path(u.removeprefix("file://")).is_file()]


def _open(url: str) -> Any:
    if not is_local(url):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return open(url.removeprefix("file://"), "rb")


def local_tar_is_truncated(path: str) -> bool:
    """A tar written to the end has a whole number of 512-byte blocks and two zero blocks at the end."""
    size = os.path.getsize(path)
    if size % 512 or size < 1024:
        return True
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024).count(0) != 1024


def write_tar_members(samples: list[tuple[str, list[tuple[str, bytes]]]]) -> bytes:
    """A reproducible webdataset tar (mtime 0, root owner): ``key.ext`` for each (key, [(ext, payload), ...])."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, payload in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def iter_tar_samples(url: str, skipped: Counter[str]) -> Iterator[dict[str, Any]]:
    """Group a tar stream's members by key (the name up to the first dot of the basename).

    A truncated local shard (tarfile alone stops quietly at a cut between members) is counted as
    ``corrupt_shard``; its complete samples are still read, the last, possibly cut one is dropped.
    """
    try:
        truncated = is_local(url) and local_tar_is_truncated(url.removeprefix("file://"))
        stream = _open(url)
    except OSError as e:
        skipped["unreadable_shard"] += 1
        log.warning("skipping shard %s: cannot open (%s)", url, e)
        return
    if truncated:
        skipped["corrupt_shard"] += 1
        log.warning("shard %s is truncated: reading its complete samples, dropping the last one", url)
    current: dict[str, Any] = {}
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, base = os.path.split(member.name)
                key, _, ext = base.partition(".")
                key = f"{directory}/{key}" if directory else key
                if current and current["__key__"] != key:
                    yield current
                    current = {}
                f = tar.extractfile(member)
                current["__key__"] = key
                current[ext.lower()] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        skipped["corrupt_shard"] += 0 if truncated else 1
        log.warning(
            "shard %s is corrupt after %s: %s (the rest of the shard is skipped)",
            url,
            current.get("__key__", "its start"),
            e,
        )
        return  # the half-read sample is dropped with the shard
    if current and not truncated:
        yield current


def aspect_buckets(resolution: int, ratios: Sequence[float], multiple: int) -> list[tuple[int, int]]:
    """(height, width) buckets of about ``resolution``² pixels, one per aspect ratio (width / height), both sides
    multiples of ``multiple`` (duplicates after rounding dropped), ordered by aspect ratio."""
    if int(multiple) <= 0 or int(resolution) < int(multiple):
        raise ValueError(
            f"data.aspect_buckets.multiple={multiple}: must be positive and at most data.resolution={resolution}"
        )
    bad = [r for r in ratios if not float(r) > 0]
    if bad or not len(ratios):
        raise ValueError(f"data.aspect_buckets.ratios={list(ratios)}: give positive width/height ratios")
    shapes: list[tuple[int, int]] = []
    for ratio in sorted(float(r) for r in ratios):
        h = max(multiple, round(resolution / ratio**0.5 / multiple) * multiple)
        w = max(multiple, round(resolution * ratio**0.5 / multiple) * multiple)
        if (h, w) not in shapes:
            shapes.append((h, w))
    return shapes


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's in log scale (least cropped)."""
    aspect = np.log(width / height)
    return min(buckets, key=lambda hw: abs(np.log(hw[1] / hw[0]) - aspect))


def load_image(data: bytes, resolution: int | tuple[int, int]) -> torch.Tensor:
    """Decode, convert to RGB, resize to cover ``resolution`` (a square side, or (height, width)) and centre-crop.
    Output in [-1, 1]."""
    img = Image.open(io.BytesIO(data))
    img = img.convert("RGB")
    th, tw = (resolution, resolution) if isinstance(resolution, int) else resolution
    w, h = img.size
    scale = max(tw / w, th / h)
    if scale != 1.0:
        img = img.resize(
            (max(tw, round(w * scale)), max(th, round(h * scale))),
            Image.Resampling.BICUBIC,
            reducing_gap=None,
        )
    w, h = img.size
    left, top = (w - tw) // 2, (h - th) // 2
    img = img.crop((left, top, left + tw, top + th))
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return arr.float().div(127.5).sub(1.0)


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    """The uint8 levels a decoded image came from (``load_image``: levels / 127.5 - 1, exactly invertible)."""
    return image.add(1.0).mul(127.5).round().to(torch.uint8)


class ShardDataset(IterableDataset):
    """Streams samples from webdataset shards; bad samples are skipped and counted, never fatal.

    Shards are shuffled per epoch with ``seed``, then split by node (rank) and by loader worker;
    samples pass through a shuffle buffer seeded by (seed, epoch, rank, worker).
    With ``buckets`` ((height, width) shapes) each image goes to the bucket nearest its aspect ratio and the dataset
    yields whole batches of ``batch_size`` samples of one bucket (a loader with ``batch_size=None``); the samples left
    in unfilled buckets when a finite stream ends are dropped and logged.
    """

    def __init__(
        self,
        urls: Sequence[str],
        resolution: int,
        format: SampleFormat | Mapping[str, Any] | None = None,  # members read, samples skipped (min size 0 if unset)
        order: StreamOrder | Mapping[str, Any] | None = None,  # shuffle, seed, rank of world size, endless
        in_memory: bool = False,  # keep decoded samples after the first pass (small datasets: no re-reading)
        buckets: Sequence[Sequence[int]] | None = None,  # (height, width) shapes: aspect-ratio bucketing
        batch_size: int = 0,  # with buckets: the size of the one-bucket batches this dataset yields
    ) -> None:
        super().__init__()
        self.format = group_of(SampleFormat, format, "data.format")
        self.order = group_of(StreamOrder, order, "ShardDataset order")
        self.buckets = [(int(h), int(w)) for h, w in buckets] if buckets else None
        if self.buckets and int(batch_size) <= 0:
            raise ValueError("ShardDataset: buckets need the batch size (each yielded batch is one bucket)")
        if self.buckets and not self.format.decode_images:
            raise ValueError("aspect buckets need decoded images (precomputed latents are square)")
        self.batch_size = int(batch_size)
        self.urls, self.resolution = list(urls), resolution
        self.epoch = 0
        self.in_memory = in_memory
        self._cache: dict[str, list[tuple[dict[str, Any] | None, Counter[str]]]] = {}
        self.skip: list[int] = []  # samples each worker's stream drops from its start (exact resume)
        self.worker_offset = 0  # loader worker i reads stream (i + offset) mod workers (exact resume)
        self.skip_log = SkipLog("data", self.format.skip_examples, self.format.skip_summary_every)

    def set_epoch(self, epoch: int) -> None:
        """Set the pass number that seeds the next pass's shuffle."""
        self.epoch = epoch

    def my_urls(self, worker: int = 0, num_workers: int = 1, epoch: int | None = None) -> list[str]:
        """This rank's and worker's shards for ``epoch`` (default: the current one)."""
        urls = list(self.urls)
        epoch = self.epoch if epoch is None else epoch
        if self.order.shuffle:
            np.random.default_rng([self.order.seed, epoch]).shuffle(urls)
        return urls[self.order.rank :: self.order.world_size][worker::num_workers]

    def decode(self, raw: dict[str, Any], shard: str, skipped: Counter[str]) -> dict[str, Any] | None:
        """A training sample, or None (counted in ``skipped`` under its reason)."""
        key = f"{Path(shard).name}/{raw['__key__']}"
        image_bytes = next((raw[k] for k in self.format.image_keys if k in raw), None)
        reason = None
        if image_bytes is None:
            reason = "missing_image"
        caption = raw.get(self.format.caption_key)
        if reason is None and self.format.require_caption:
            if caption is None:
                reason = "missing_caption"
            elif not caption.decode("utf-8", errors="replace").strip():
                reason = "empty_caption"
        image = None
        if reason is None and image_bytes is not None:  # (no image bytes: reason is missing_image)
            try:
                with Image.open(io.BytesIO(image_bytes)) as probe:
                    size = probe.size
                target = nearest_bucket(*size, self.buckets) if self.buckets else self.resolution
                if min(size) < (self.format.min_image_size or 0):
                    reason = "image_too_small"
                elif self.format.decode_images:
                    image = load_image(image_bytes, target)
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
                reason = "undecodable_image"
                log.debug("%s: %s", key, e)
        if reason is not None:
            skipped[reason] += 1
            self.skip_log.example(reason, key)
            return None
        metadata: dict[str, Any] = {}
        if self.format.metadata_key in raw:
            try:
                metadata = json.loads(raw[self.format.metadata_key])
            except (json.JSONDecodeError, UnicodeDecodeError):
                metadata = {}
        text = caption.decode("utf-8", errors="replace").strip() if caption is not None else ""
        sample = {"image": image, "caption": text, "key": key, "metadata": metadata}
        if self.buckets:
            sample["bucket"] = "{}x{}".format(*target)  # type: ignore[str-format]
        for member in self.format.feature_keys:
            if member not in raw:
                reason = "missing_features"
            else:
                try:
                    sample[FEATURES[member]] = torch.from_numpy(
                        np.load(io.BytesIO(raw[member]), allow_pickle=False).astype(np.float32)
                    )
                    continue
                except (ValueError, OSError, EOFError) as e:
                    reason = "corrupt_features"
                    log.debug("%s: %s", key, e)
            skipped[reason] += 1
            self.skip_log.example(reason, f"{key} ({member})")
            return None
        return sample

    def __iter__(self) -> Iterator[dict[str, Any] | list[dict[str, Any]]]:
        # Read the epoch now (not lazily in the generator): the loader bumps it right after.
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (worker + self.worker_offset) % num_workers
        samples = (
            self._passes(worker, num_workers, self.epoch)
            if self.order.endless
            else self._iterate(
                self.my_urls(worker, num_workers),
                np.random.default_rng([self.order.seed, self.epoch, self.order.rank, worker]),
                f"pass {self.epoch}, rank {self.order.rank}, worker {worker}",
            )
        )
        skip = self.skip[worker] if worker < len(self.skip) else 0  # with buckets: whole batches
        stream: Iterator[Any] = self._batches(samples) if self.buckets else samples
        return itertools.islice(stream, skip, None) if skip else stream

    def _batches(self, samples: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        """Samples grouped into batches of one bucket each, in the order the buckets fill."""
        pending: dict[str, list[dict[str, Any]]] = {}
        for sample in samples:
            group = pending.setdefault(sample["bucket"], [])
            group.append(sample)
            if len(group) == self.batch_size:
                yield pending.pop(sample["bucket"])
        left = {bucket: len(g) for bucket, g in pending.items() if g}
        if left:
            log.info(
                "aspect buckets: %d sample(s) left in unfilled batches at the end of the pass: %s",
                sum(left.values()),
                left,
            )

    def _passes(self, worker: int, num_workers: int, epoch: int) -> Iterator[dict[str, Any]]:
        """Pass after pass, each shuffled as its epoch's would be (``endless``: with several ranks every rank must
        take the same number of steps, so none may run out of data first)."""
        while True:
            urls = self.my_urls(worker, num_workers, epoch)
            count = 0
            rng = np.random.default_rng([self.order.seed, epoch, self.order.rank, worker])
            for sample in self._iterate(urls, rng, f"pass {epoch}, rank {self.order.rank}, worker {worker}"):
                count += 1
                yield sample
            if count == 0:
                raise RuntimeError(
                    f"rank {self.order.rank}, loader worker {worker}: a whole pass over its {len(urls)} shard(s) gave "
                    f"no usable sample (epoch {epoch}; {len(self.urls)} shard(s) in all for {self.order.world_size} "
                    "rank(s))"
                )
            epoch += 1

    def _read(self, url: str) -> Iterator[tuple[dict[str, Any] | None, Counter[str]]]:
        """A shard's decoded samples (None for a skipped one) with the skips counted on the way; with ``in_memory``
        the first pass keeps them (images as uint8) and later passes replay them without reading the shard."""
        cached = self._cache.get(url)
        if cached is not None:
            for sample, reasons in cached:
                if sample is not None and sample["image"] is not None:
                    sample = dict(sample, image=sample["image"].float().div(127.5).sub(1.0))
                yield sample, reasons
            return
        kept: list[tuple[dict[str, Any] | None, Counter[str]]] = []
        reasons: Counter[str] = Counter()
        for raw in iter_tar_samples(url, reasons):
            sample = self.decode(raw, url, reasons)
            if self.in_memory:
                stored = (
                    None
                    if sample is None
                    else dict(sample, image=None if sample["image"] is None else _to_uint8(sample["image"]))
                )
                kept.append((stored, Counter(reasons)))
            yield sample, Counter(reasons)
            reasons.clear()  # (the reader keeps counting into this same object)
        if reasons:  # counted after the shard's last sample (a corrupt end)
            if self.in_memory:
                kept.append((None, Counter(reasons)))
            yield None, Counter(reasons)
        if self.in_memory:
            self._cache[url] = kept

    def _iterate(self, urls: list[str], rng: np.random.Generator, label: str) -> Iterator[dict[str, Any]]:
        """One pass over ``urls`` through the shuffle buffer; each sample carries the skips since the previous one,
        and the pass ends with the skip table (:class:`k3lab.data.skips.SkipLog`)."""
        skipped: Counter[str] = Counter()
        buffer: list[dict[str, Any]] = []

        def emit(sample: dict[str, Any]) -> dict[str, Any]:
            sample["skipped"] = dict(skipped)
            skipped.clear()
            return sample

        for url in urls:
            for sample, reasons in self._read(url):
                skipped.update(reasons)
                if reasons:
                    self.skip_log.count(reasons)
                if sample is None:
                    continue
                if not self.order.shuffle or self.order.shuffle_buffer <= 1:
                    yield emit(sample)
                    continue
                buffer.append(sample)
                if len(buffer) >= self.order.shuffle_buffer:
                    i = int(rng.integers(len(buffer)))
                    buffer[i], buffer[-1] = buffer[-1], buffer[i]
                    yield emit(buffer.pop())
        rng.shuffle(buffer)
        for sample in buffer:
            yield emit(sample)
        if skipped:
            log.warning("skipped after the last sample of this worker (not in any batch count): %s", dict(skipped))
        self.skip_log.end_of_pass(label)
