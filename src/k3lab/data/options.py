"""The data's option groups: how a sample is read (``data.format``) and how a shard stream is ordered."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from k3lab.io.options import group_of

__all__ = ["FEATURES", "SampleFormat", "StreamOrder", "group_of"]

# precomputed members a shard sample may carry (k3lab.precompute) -> the sample's key
FEATURES = {"text.npy": "text_embedding", "latent.npy": "latent", "clip_image.npy": "image_embedding"}


def _keys(value: str | Sequence[str], name: str) -> tuple[str, ...]:
    """A list of member extensions, given as a list or a ';'-separated string (webdataset's ``png;jpg``)."""
    items = value.split(";") if isinstance(value, str) else [str(v) for v in value]
    keys = tuple(k.strip().lower() for k in items if k.strip())
    if not keys:
        raise ValueError(f"{name}={value!r}: give at least one member extension")
    return keys


@dataclass(frozen=True)
class SampleFormat:
    """Which members of a shard sample are read, and which samples are skipped and counted (``data.format``)."""

    image_keys: tuple[str, ...] = ("png", "jpg", "jpeg", "webp")  # first present wins; a list or "png;jpg"
    caption_key: str = "txt"
    metadata_key: str = "json"
    feature_keys: tuple[str, ...] = ()  # precomputed members (text.npy, latent.npy, clip_image.npy): k3lab.precompute
    min_image_size: int | None = None  # smaller images are skipped; None = the training resolution
    require_caption: bool = True  # a sample without a (non-empty) caption is skipped
    decode_images: bool = True  # False: headers checked, image=None (training on precomputed latents)
    skip_examples: int = 3  # skipped samples logged by file per reason (then only counted: k3lab.data.skips)
    skip_summary_every: int = 1000  # one summary line every this many skips

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_keys", _keys(self.image_keys, "image_keys"))
        object.__setattr__(self, "caption_key", str(self.caption_key).lower())
        object.__setattr__(self, "metadata_key", str(self.metadata_key).lower())
        features = (self.feature_keys,) if isinstance(self.feature_keys, str) else self.feature_keys
        object.__setattr__(self, "feature_keys", tuple(str(k) for k in features))
        unknown = [k for k in self.feature_keys if k not in FEATURES]
        if unknown:
            raise ValueError(f"feature_keys: unknown {unknown} (known: {sorted(FEATURES)})")
        if self.min_image_size is not None and int(self.min_image_size) < 0:
            raise ValueError(f"min_image_size={self.min_image_size}: a size in pixels >= 0, or null (the resolution)")
        if int(self.skip_examples) < 0 or int(self.skip_summary_every) < 1:
            raise ValueError(
                f"skip_examples={self.skip_examples} (>= 0), skip_summary_every={self.skip_summary_every} (>= 1)"
            )
        if not self.decode_images and "latent.npy" not in self.feature_keys:
            raise ValueError(
                "decode_images=false needs precomputed latents (feature_keys with latent.npy): without them the "
                "stage trains on the images"
            )


@dataclass(frozen=True)
class StreamOrder:
    """How a shard stream is shuffled and split across ranks (built by the data module per split)."""

    shuffle: bool = True  # shards shuffled per epoch, samples through a shuffle buffer
    shuffle_buffer: int = 1000
    seed: int = 0
    rank: int = 0  # this rank reads shards rank, rank + world_size, ...
    world_size: int = 1
    endless: bool = False  # one iterator plays pass after pass: every rank always has data

    def __post_init__(self) -> None:
        if not 0 <= int(self.rank) < int(self.world_size):
            raise ValueError(f"rank={self.rank} of world_size={self.world_size}: need 0 <= rank < world_size")
        if int(self.shuffle_buffer) < 0:
            raise ValueError(f"shuffle_buffer={self.shuffle_buffer}: must be >= 0")
