"""LightningDataModule over webdataset shards (any img2dataset output, or the embedded scene world)."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Iterator, Mapping, Protocol, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader
from typing_extensions import override

from k3lab.data.batch import collate
from k3lab.data.options import SampleFormat, StreamOrder, group_of
from k3lab.data.shards import ShardDataset, expand_urls, missing_local_shards
from k3lab.data.shards import aspect_buckets as bucket_shapes_for

log = logging.getLogger(__name__)


class ShardSource(Protocol):
    """Something that can produce shards, e.g. :class:`k3lab.data.scene_world.SceneWorld`."""

    resolution: int

    def build(self) -> dict[str, list[str]]:
        """Build (or find) the shards; returns the shard paths per split."""
        ...


class EpochLoader(DataLoader):
    """A DataLoader that advances its ShardDataset's epoch after starting each pass (new shuffle per epoch).

    Its state (saved in checkpoints by Lightning) is the position in the stream: the current pass's epoch and the
    batches the training loop consumed from it (``consumed``, set by :class:`k3lab.run.resume.ResumeState`). A loader
    given that state replays the same pass and skips those batches, so a resumed run sees exactly the batches an
    uninterrupted one would. The stream is deterministic per (seed, epoch, rank, worker); with ``W`` loader workers
    batch ``i`` comes from worker ``i mod W`` while every worker has data, and a resumed pass rotates the workers'
    streams so the next batch comes from the right one: the same order holds with workers as long as none has run
    dry (near the end of a pass, once one has, the remaining batches are the same set, possibly in another order).
    Worker seeds come from the loader's own generator, so starting a pass never draws from the global random stream.
    """

    dataset: ShardDataset
    generator: torch.Generator

    def __init__(self, dataset: ShardDataset, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(dataset, *args, **kwargs)
        self.pass_epoch = 0  # the epoch of the pass in progress
        self.consumed = 0  # its batches the training loop has taken
        self._skip = 0

    def __iter__(self) -> Iterator[Any]:
        self.pass_epoch = int(self.dataset.epoch)
        self.generator.manual_seed(int(self.dataset.order.seed) * 1_000_003 + self.pass_epoch)
        workers = max(1, self.num_workers)
        self.dataset.skip = per_worker_skip(self._skip, workers, int(self.batch_size or 1))
        # the loader asks worker 0 first: it plays the stream whose batch comes next
        self.dataset.worker_offset = self._skip % workers
        self.consumed, self._skip = self._skip, 0
        iterator = super().__iter__()
        self.dataset.skip, self.dataset.worker_offset = [], 0
        self.dataset.set_epoch(self.pass_epoch + 1)
        return iterator

    def state_dict(self) -> dict[str, int]:
        """The data position for exact resume: the pass (epoch) and batches consumed in it."""
        return {"epoch": self.pass_epoch, "batches": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a saved data position: the same pass, skipping the batches already consumed."""
        self.dataset.set_epoch(int(state["epoch"]))
        self._skip = int(state["batches"])
        log.info("data: resuming pass %d after its first %d batches", state["epoch"], state["batches"])


def per_worker_skip(batches: int, workers: int, batch_size: int) -> list[int]:
    """Samples each loader worker skips when the first ``batches`` batches of a pass were already consumed (batch
    ``i`` comes from worker ``i mod workers``)."""
    return [((batches - w + workers - 1) // workers) * batch_size if batches > w else 0 for w in range(workers)]


class ShardDataModule(L.LightningDataModule):
    """Train/val/test loaders over shard urls given directly (``shards``) or built by a ``source``.

    No horizontal flips: they would break "left of" captions.
    """

    def __init__(
        self,
        shards: Mapping[str, str | Sequence[str] | None] | None = None,  # split -> brace pattern / list / pipe: url
        source: ShardSource | None = None,  # builds shards in prepare_data (scene world)
        resolution: int = 64,  # training resolution (progressive stages are config changes)
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        format: SampleFormat | Mapping[str, Any] | None = None,  # members read, samples skipped (data.format)
        shuffle_buffer: int = 1000,
        seed: int = 0,
        val_split: str = "val",
        test_split: str = "test",
        in_memory: bool = False,  # training split: keep decoded samples after the first pass instead of re-reading
        aspect_buckets: Mapping[str, Any] | None = None,  # training split: {ratios: [w/h, ...], multiple: px}
    ) -> None:
        super().__init__()
        if shards is None and source is None:
            raise ValueError("data: give either data.shards (split -> urls) or data.source")
        if int(resolution) <= 0:
            raise ValueError(f"data.resolution must be a positive integer, got {resolution}")
        if int(batch_size) <= 0:
            raise ValueError(f"data.batch_size must be a positive integer, got {batch_size}")
        self.shards = dict(shards) if shards is not None else None
        self.source = source
        self.resolution, self.batch_size = int(resolution), int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = num_workers
        fmt = group_of(SampleFormat, format, "data.format")
        if fmt.min_image_size is None:  # the default: images smaller than the training resolution are skipped
            fmt = replace(fmt, min_image_size=self.resolution)
        self.format = fmt
        self.shuffle_buffer, self.seed = int(shuffle_buffer), int(seed)
        self.val_split, self.test_split = val_split, test_split
        self.in_memory = bool(in_memory)
        self.bucket_shapes: list[tuple[int, int]] | None = None
        if aspect_buckets:
            unknown = sorted(set(aspect_buckets) - {"ratios", "multiple"})
            if unknown:
                raise ValueError(f"data.aspect_buckets: unknown key(s) {unknown} (known: ratios, multiple)")
            if "latent.npy" in fmt.feature_keys:
                raise ValueError(
                    "data.aspect_buckets with precomputed latents (data.format.feature_keys has latent.npy): the "
                    "latents were written square at one resolution; train bucketed stages from the images"
                )
            self.bucket_shapes = bucket_shapes_for(
                self.resolution, list(aspect_buckets.get("ratios") or []), int(aspect_buckets.get("multiple", 64))
            )
            log.info("data: aspect buckets (height x width) %s", [f"{h}x{w}" for h, w in self.bucket_shapes])
        self.datasets: dict[str, ShardDataset] = {}

    @override
    def prepare_data(self) -> None:
        if self.source is not None:
            self.source.build()

    def split_urls(self) -> dict[str, list[str]]:
        """Shard urls per split; raises naming the key when a local shard is missing."""
        if self.source is not None:
            return self.source.build()  # cached after the first call: reads the manifest
        urls = {split: expand_urls(spec) for split, spec in (self.shards or {}).items() if spec}
        for split, items in urls.items():
            missing = missing_local_shards(items)
            if missing:
                raise FileNotFoundError(
                    f"data.shards.{split}: {len(missing)} of {len(items)} shard(s) missing, e.g. {missing[0]!r}"
                )
        return urls

    @override
    def setup(self, stage: str | None = None) -> None:
        urls = self.split_urls()
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        if world > 1:
            self.check_multi_rank(urls.get("train", []), world)
            train_urls = urls.get("train", [])
            log.info(
                "data: rank %d of %d trains on %d of %d training shards (endless stream)",
                rank,
                world,
                len(train_urls[rank::world]),
                len(train_urls),
            )
        for split, items in urls.items():
            train = split == "train"
            # several ranks: each trains on its own shards, in one endless stream (no rank runs dry before another,
            # which would leave the others waiting in a gradient all-reduce); evaluation splits are read whole by
            # every rank (the same batches, so every rank logs the same validation figures)
            self.datasets[split] = ShardDataset(
                items,
                self.resolution,
                self.format if train else replace(self.format, decode_images=True),
                StreamOrder(
                    shuffle=train,
                    shuffle_buffer=self.shuffle_buffer if train else 0,
                    seed=self.seed,
                    rank=rank if train else 0,
                    world_size=world if train else 1,
                    endless=train and world > 1,
                ),
                in_memory=self.in_memory and train,
                buckets=self.bucket_shapes if train else None,
                batch_size=self.batch_size if train else 0,
            )
            self.datasets[split].skip_log.name = split

    def check_multi_rank(self, train_urls: list[str], world: int) -> None:
        """With several ranks: enough training shards for every rank and loader worker, and a step budget (the
        training stream is endless)."""
        readers = world * max(1, int(self.num_workers))
        if len(train_urls) < readers:
            raise ValueError(
                f"data: {len(train_urls)} training shard(s) for {world} rank(s) x {max(1, int(self.num_workers))} "
                f"loader worker(s): give at least {readers} shards (each reader needs its own)"
            )
        max_steps = int(getattr(self.trainer, "max_steps", -1) or -1)
        if max_steps <= 0:
            raise ValueError(
                f"trainer.max_steps={max_steps}: with {world} ranks the training stream is endless (every rank must "
                "take the same number of steps); set trainer.max_steps"
            )

    def _loader(self, split: str, batch_size: int, drop_last: bool) -> DataLoader:
        if split not in self.datasets:
            raise KeyError(f"data: no '{split}' split (have {sorted(self.datasets)})")
        bucketed = self.datasets[split].buckets is not None  # the dataset yields whole one-bucket batches
        return EpochLoader(
            self.datasets[split],
            batch_size=None if bucketed else batch_size,
            num_workers=self.num_workers,
            collate_fn=collate,
            drop_last=drop_last and not bucketed,
            pin_memory=False,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, drop_last=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_split, self.val_batch_size, drop_last=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_split, self.val_batch_size, drop_last=False)

    def split_dataloader(self, split: str, batch_size: int | None = None) -> DataLoader:
        """A loader over any split (e.g. ``heldout``) in its stored order."""
        return self._loader(split, batch_size or self.val_batch_size, drop_last=False)
