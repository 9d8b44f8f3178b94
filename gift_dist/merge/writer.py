"""Writing a safetensors file one tensor at a time.

``safetensors.torch.save_file`` takes the whole shard as a dict and serialises it into one bytes object first, so
writing a shard costs about twice its size in RAM. The merge knows every output tensor's name, dtype and shape
from the input headers before it reads any data, so it can write the header first and then each tensor as soon
as it is merged: peak memory is one tensor (and its fp32 working copies), not one shard. The layout is the
documented safetensors format (u64 little-endian header length, JSON header padded to 8 bytes, contiguous data),
and every file written is read back by safetensors' own reader in the tests and in ``verify-merge``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from gift_dist.contracts import ContractError

SAFE_DTYPE_OF = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
SAFE_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass(frozen=True)
class TensorSlot:
    name: str
    safe_dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * SAFE_DTYPE_BYTES[self.safe_dtype]


class ShardWriter:
    """Writes the tensors of ``slots`` in order into ``path``; anything else (name, dtype, shape) is an error."""

    def __init__(self, path: Path, slots: list[TensorSlot], metadata: Optional[dict[str, str]] = None):
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for slot in slots:
            header[slot.name] = {"dtype": slot.safe_dtype, "shape": list(slot.shape),
                                 "data_offsets": [offset, offset + slot.nbytes]}
            offset += slot.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self.path = path
        self.slots = list(slots)
        self.written = 0
        self.fh = open(path, "wb")
        self.fh.write(struct.pack("<Q", len(raw)))
        self.fh.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.written >= len(self.slots):
            raise ContractError(f"{self.path}: tensor {name} is not in the planned header")
        slot = self.slots[self.written]
        actual = (name, SAFE_DTYPE_OF.get(tensor.dtype), tuple(tensor.shape))
        if actual != (slot.name, slot.safe_dtype, slot.shape):
            raise ContractError(f"{self.path}: wrote {actual} where the header plans {slot}")
        self.fh.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.written += 1

    def close(self) -> None:
        self.fh.close()
        if self.written != len(self.slots):
            raise ContractError(f"{self.path}: {len(self.slots) - self.written} planned tensors were never written")

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.fh.close()
