"""safetensors read lazily and written as a stream: a conversion or an export holds one tensor at a time, never a
second copy of the model (``safetensors.torch.save`` builds the whole file in memory first).

The file layout is safetensors' own (8-byte little-endian header length, a JSON header padded with spaces to a
multiple of 8, then the tensors' bytes in header order), so ``safetensors.torch.load_file`` and every other
reader load what :func:`write_safetensors` writes.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path

import torch

DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FROM_NAME = {v: k for k, v in DTYPES.items()}


class LazyState(Mapping[str, torch.Tensor]):
    """Tensors known by name, shape and dtype before any is loaded: ``key -> load()``, one tensor per access."""

    def __init__(self, entries: Mapping[str, tuple[torch.Size, torch.dtype, Callable[[], torch.Tensor]]]) -> None:
        self._entries = dict(entries)

    def shape(self, key: str) -> torch.Size:
        """A tensor's shape from the file header, without reading it."""
        return self._entries[key][0]

    def dtype(self, key: str) -> torch.dtype:
        """A tensor's dtype from the file header, without reading it."""
        return self._entries[key][1]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._entries[key][2]()

    def __setitem__(self, key: str, tensor: torch.Tensor) -> None:
        """Add a tensor already in memory (e.g. a small projection beside a lazy U-Net)."""
        self._entries[key] = (tensor.shape, tensor.dtype, lambda: tensor)

    def __contains__(self, key: object) -> bool:  # Mapping's default would load the tensor
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class LazySafetensors(LazyState):
    """The tensors of one or several safetensors files (a sharded checkpoint), read one at a time on access.

    Names, shapes and dtypes come from the headers alone (:meth:`shape`, :meth:`dtype`), so a strict key and shape
    check costs no tensor reads."""

    def __init__(self, files: list[str | Path]) -> None:
        from safetensors import safe_open

        where: dict[str, Path] = {}
        entries = {}
        for file in map(Path, files):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key in where:
                        raise ValueError(f"{file}: tensor {key!r} is also in {where[key]}")
                    sl = f.get_slice(key)
                    where[key] = file
                    entries[key] = (torch.Size(sl.get_shape()), _FROM_NAME[sl.get_dtype()], partial(_read, file, key))
        super().__init__(entries)


def _read(file: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(key)


def shape_of(tensors: Mapping[str, torch.Tensor], key: str) -> torch.Size:
    """A tensor's shape, from the header when ``tensors`` is lazy."""
    return tensors.shape(key) if isinstance(tensors, LazyState) else tensors[key].shape  # type: ignore[union-attr]


def dtype_of(tensors: Mapping[str, torch.Tensor], key: str) -> torch.dtype:
    """The dtype of ``tensors[key]``, without reading the tensor when the mapping is a lazy safetensors file."""
    return tensors.dtype(key) if isinstance(tensors, LazyState) else tensors[key].dtype  # type: ignore[union-attr]


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` as one safetensors file, one tensor in memory at a time, atomically (a temporary file in the
    same folder, then ``os.replace``: a crash never leaves half a file). ``dtype`` casts floating tensors on the way."""
    path = Path(path)
    names = list(tensors)
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name in names:
        src_dtype = dtype_of(tensors, name)
        out_dtype = dtype if dtype is not None and src_dtype.is_floating_point else src_dtype
        if out_dtype not in DTYPES:
            raise ValueError(f"{name}: dtype {out_dtype} cannot be written as safetensors")
        shape = list(shape_of(tensors, name))
        size = out_dtype.itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": DTYPES[out_dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name in names:
                t = tensors[name].detach().to("cpu")
                entry = header[name]
                t = t.to(_FROM_NAME[entry["dtype"]]).contiguous()  # type: ignore[index]
                if list(t.shape) != entry["shape"]:  # type: ignore[index]
                    raise ValueError(f"{name}: shape {list(t.shape)} differs from the announced {entry['shape']}")  # type: ignore[index]
                if t.numel():
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # pyright: ignore[reportArgumentType]
                del t
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
