"""The one-tensor-at-a-time safetensors writer produces files safetensors itself reads back exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from gift_dist.contracts import ContractError
from gift_dist.merge.writer import SAFE_DTYPE_OF, ShardWriter, TensorSlot


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
