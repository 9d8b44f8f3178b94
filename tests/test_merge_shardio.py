"""The one-tensor-at-a-time safetensors writer produces files safetensors itself reads back exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from gift_dist.contracts import ContractError
from gift_dist.contracts.shardio import SAFE_DTYPE_OF, ShardWriter, TensorSlot


def slot(name: str, tensor: torch.Tensor) -> TensorSlot:
    return TensorSlot(name, SAFE_DTYPE_OF[tensor.dtype], tuple(tensor.shape))


def test_roundtrip_through_safetensors(tmp_path):
    tensors = {
        "w.bf16": torch.randn(5, 3).to(torch.bfloat16),
        "w.f32": torch.randn(7),
        "w.f16.noncontiguous": torch.randn(4, 6).to(torch.float16).T,
        "ids": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "shard.safetensors"
    with ShardWriter(path, [slot(n, t) for n, t in tensors.items()], metadata={"format": "pt"}) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}
        assert set(fh.keys()) == set(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(fh.get_tensor(name), tensor), name


def test_out_of_plan_tensor_is_refused(tmp_path):
    first, second = torch.zeros(2), torch.ones(3)
    writer = ShardWriter(tmp_path / "s.safetensors", [slot("a", first), slot("b", second)])
    with pytest.raises(ContractError, match="wrote .'b'"):
        writer.write("b", second)
    writer.write("a", first)
    with pytest.raises(ContractError, match="1 planned tensors were never written"):
        writer.close()


def test_copy_and_read_by_byte_range(tmp_path):
    from safetensors.torch import save_file

    from gift_dist.contracts.shardio import read_tensor, tensor_ranges
    from gift_dist.contracts.shardio import read_header

    source = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int32), "c": torch.randn(4)}
    src = tmp_path / "src.safetensors"
    save_file(source, str(src))
    ranges = tensor_ranges(src, read_header(src))
    out = tmp_path / "out.safetensors"
    with open(src, "rb") as fh:
        assert torch.equal(read_tensor(fh, ranges["a"]), source["a"])
        with ShardWriter(out, [slot(n, source[n]) for n in ("c", "a", "b")]) as writer:
            writer.copy("c", fh, ranges["c"])
            writer.write("a", read_tensor(fh, ranges["a"]) * 2)
            writer.copy("b", fh, ranges["b"])
        with pytest.raises(ContractError, match="wrote"):
            ShardWriter(tmp_path / "x.safetensors", [slot("c", source["c"])]).copy("b", fh, ranges["b"])
    with safe_open(str(out), framework="pt") as fh:
        assert torch.equal(fh.get_tensor("c"), source["c"]) and torch.equal(fh.get_tensor("b"), source["b"])
        assert torch.equal(fh.get_tensor("a"), source["a"] * 2)
