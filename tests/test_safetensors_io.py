"""Streamed safetensors: files any safetensors reader loads, atomic on failure, lazy reads, and conversions that hold
one tensor at a time (the memory promise of ``python -m k3lab.convert``; its figures: benchmarks/convert_memory.py)."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from k3lab.io.safetensors_io import LazySafetensors, LazyState, write_safetensors


def test_written_files_load_with_safetensors_in_every_dtype(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(3, 5, generator=g),
        "half": torch.randn(7, generator=g).half(),
        "bf": torch.randn(2, 2, generator=g).bfloat16(),
        "ids": torch.arange(6).reshape(2, 3),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6, generator=g).t(),
    }
    out = write_safetensors(tmp_path / "a.safetensors", tensors, metadata={"source": "test"})
    back = load_file(str(out))
    assert set(back) == set(tensors) and all(
        back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items()
    )
    header_len = int.from_bytes(out.read_bytes()[:8], "little")
    assert header_len % 8 == 0 and json.loads(out.read_bytes()[8 : 8 + header_len])["__metadata__"] == {
        "format": "pt",
        "source": "test",
    }
    cast = load_file(str(write_safetensors(tmp_path / "b.safetensors", tensors, dtype=torch.float32)))
    assert (
        cast["half"].dtype == cast["bf"].dtype == torch.float32 and cast["ids"].dtype == torch.int64
    )  # only floats are cast
    assert torch.equal(cast["half"], tensors["half"].float())


def test_a_failure_mid_write_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    before = path.read_bytes()

    def boom() -> torch.Tensor:
        raise OSError("disk went away")

    state = LazyState(
        {"a": (torch.Size([2]), torch.float32, lambda: torch.zeros(2)), "b": (torch.Size([3]), torch.float32, boom)}
    )
    with pytest.raises(OSError, match="disk went away"):
        write_safetensors(path, state)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [
        "model.safetensors"
    ]  # no temporary left
    wrong = LazyState({"a": (torch.Size([2]), torch.float32, lambda: torch.zeros(3))})
    with pytest.raises(ValueError, match=r"a: shape \[3\] differs from the announced \[2\]"):
        write_safetensors(path, wrong)
    assert path.read_bytes() == before


def test_lazy_reading_across_shards(tmp_path: Path) -> None:
    save_file({"a": torch.arange(4.0), "b": torch.ones(2, 3).half()}, str(tmp_path / "1.safetensors"))
    save_file({"c": torch.zeros(5, dtype=torch.int32)}, str(tmp_path / "2.safetensors"))
    lazy = LazySafetensors([tmp_path / "1.safetensors", tmp_path / "2.safetensors"])
    assert (
        sorted(lazy) == ["a", "b", "c"] and lazy.shape("b") == torch.Size([2, 3]) and lazy.dtype("b") == torch.float16
    )
    assert torch.equal(lazy["a"], torch.arange(4.0)) and lazy["c"].dtype == torch.int32
    save_file({"a": torch.ones(1)}, str(tmp_path / "3.safetensors"))
    with pytest.raises(ValueError, match="'a' is also in"):
        LazySafetensors([tmp_path / "1.safetensors", tmp_path / "3.safetensors"])


def test_conversion_holds_one_tensor_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers -> k3lab and back: every weight read is released before the next one is read."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the test-only parity peer")
    from k3lab.convert.__main__ import main

    torch.manual_seed(0)
    peer = diffusers.Kandinsky3UNet(
        in_channels=4,
        time_embedding_dim=64,
        groups=8,
        attention_head_dim=16,
        layers_per_block=2,
        block_out_channels=(32, 64, 64, 128),
        cross_attention_dim=48,
        encoder_hid_dim=40,
    )
    peer.save_pretrained(tmp_path / "pipe" / "unet")
    live, peak, reads = set(), [0], [0]
    original = LazySafetensors.__getitem__

    def tracked(self: LazySafetensors, key: str) -> torch.Tensor:
        t = original(self, key)
        if key.startswith("encoder_hid_proj."):  # the 3 small projection tensors, read together up front
            return t
        token = object.__new__(type("Token", (), {}))
        live.add(id(token))
        t._k3lab_token = token  # released with the tensor
        weakref.finalize(token, live.discard, id(token))
        reads[0] += 1
        peak[0] = max(peak[0], len(live))
        return t

    monkeypatch.setattr(LazySafetensors, "__getitem__", tracked)
    assert main(["diffusers", str(tmp_path / "pipe"), "--out", str(tmp_path / "k3")]) == 0
    n = len(peer.state_dict())
    assert reads[0] == n - 3 and peak[0] == 1, (
        reads[0],
        peak[0],
    )  # each U-Net weight read once, released before the next
    out = load_file(str(tmp_path / "k3" / "unet.safetensors"))
    assert torch.equal(out["in_layer.weight"], peer.state_dict()["conv_in.weight"])
    reads[0] = peak[0] = 0
    from k3lab.convert.k3lab_io import to_diffusers

    to_diffusers(tmp_path / "k3", tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert reads[0] == n - 3 and peak[0] == 1, (reads[0], peak[0])
    assert set(back) == set(peer.state_dict()) and all(torch.equal(back[k], v) for k, v in peer.state_dict().items())


@pytest.mark.slow
def test_conversion_of_a_multi_gigabyte_unet_keeps_the_memory_promise(tmp_path: Path) -> None:
    """The README's promise at scale (``make test-all``; ~1 min, ~9 GB of disk): a 713M-parameter U-Net (2.85 GB fp32)
    converted diffusers -> k3lab -> diffusers in fresh processes, bit-identical, each peaking within 1.5x of the
    0.69 GB docs/performance.md states (the process with torch imported plus one tensor, flat in the model's size),
    where the model alone is 2.85 GB."""
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "convert_memory.py"
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(bench), "--width", "192", "--workdir", str(tmp_path / "work"), "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = json.loads(out.read_text())
    assert result["model bytes (GB, fp32)"] > 2.5 and result["round trip"].startswith("identical")
    model_gb = result["model bytes (GB, fp32)"]
    for direction in ("diffusers -> k3lab", "k3lab -> diffusers"):
        peak_gb = result[f"{direction}: peak RSS / model bytes"] * model_gb
        assert peak_gb < 1.5 * 0.69, f"{direction}: peak RSS {peak_gb:.2f} GB (stated: 0.69 GB, flat in model size)"
