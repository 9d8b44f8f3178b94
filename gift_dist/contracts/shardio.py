"""Reading and writing safetensors shards one tensor at a time, by byte range.

safetensors' own API works on whole shards: ``save_file`` takes the shard as a dict and serialises it into one
bytes object first (about twice the shard in RAM), and ``safe_open`` memory-maps the whole file, so every page of
the input shard that is touched counts against the process. The merge knows every tensor's name, dtype, shape and
byte range from the headers before it reads any data, so it writes the output header first, copies each tensor
the adapter leaves alone as a byte range (``os.copy_file_range``: inside the kernel, the I/O floor), and reads,
merges and appends only the adapted ones: peak memory is one adapted tensor (and its fp32 working blocks) per
thread, not one shard. The layout is the documented safetensors format (u64 little-endian header length, JSON
header padded to 8 bytes, contiguous data); every file written is read back by safetensors itself in the tests
and in ``verify-merge``. The confidence shards use the same writer: its output depends only on the tensors and
the metadata (safetensors' ``save_file`` orders ``__metadata__`` differently from process to process).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from gift_dist.contracts import ContractError

# A safetensors header larger than this is not a real header (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000
SAFE_DTYPE_OF = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
# The floating dtypes a config may name (score.logprob_dtype, merge.dtype), by their config names.
TORCH_DTYPE_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TORCH_DTYPE_OF = {name: dtype for dtype, name in SAFE_DTYPE_OF.items()}
SAFE_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: {tensor name: {dtype, shape, data_offsets}} (+ __metadata__)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ContractError(f"{path} is truncated: no safetensors header")
            (length,) = struct.unpack("<Q", raw)
            if length > MAX_HEADER_BYTES:
                raise ContractError(f"{path} has a corrupt safetensors header (length {length})")
            header_bytes = fh.read(length)
        if len(header_bytes) != length:
            raise ContractError(f"{path} is truncated inside its safetensors header")
        header = json.loads(header_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ContractError(f"{path} has a corrupt safetensors header: {exc}") from exc
    data_len = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size < 8 + length + data_len:
        raise ContractError(f"{path} is truncated: header promises {data_len} data bytes")
    return header


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


@dataclass(frozen=True)
class TensorRange:
    """Where one tensor's bytes sit in an input shard."""

    path: Path
    offset: int
    nbytes: int
    safe_dtype: str
    shape: tuple[int, ...]


def tensor_ranges(path: Path, header: dict) -> dict[str, TensorRange]:
    """Absolute byte ranges of every tensor of a shard, from its (already validated) header."""
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
    data_start = 8 + header_len
    return {
        name: TensorRange(path, data_start + info["data_offsets"][0],
                          info["data_offsets"][1] - info["data_offsets"][0], info["dtype"], tuple(info["shape"]))
        for name, info in header.items() if name != "__metadata__"
    }


def read_tensor(fh, where: TensorRange) -> torch.Tensor:
    """One tensor read into its own (anonymous, freed with the tensor) buffer."""
    if where.safe_dtype not in TORCH_DTYPE_OF:
        raise ContractError(f"{where.path}: tensor dtype {where.safe_dtype} cannot be merged")
    buffer = bytearray(where.nbytes)
    fh.seek(where.offset)
    if fh.readinto(buffer) != where.nbytes:
        raise ContractError(f"{where.path} is truncated inside a tensor at byte {where.offset}")
    if not where.nbytes:
        return torch.empty(where.shape, dtype=TORCH_DTYPE_OF[where.safe_dtype])
    return torch.frombuffer(buffer, dtype=TORCH_DTYPE_OF[where.safe_dtype]).reshape(where.shape)


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
        # Unbuffered: tensor writes and kernel-side range copies share the file offset.
        self.fh = open(path, "wb", buffering=0)
        self._write_all(struct.pack("<Q", len(raw)) + raw)

    def _next_slot(self, actual: tuple) -> TensorSlot:
        if self.written >= len(self.slots):
            raise ContractError(f"{self.path}: tensor {actual[0]} is not in the planned header")
        slot = self.slots[self.written]
        if actual != (slot.name, slot.safe_dtype, slot.shape):
            raise ContractError(f"{self.path}: wrote {actual} where the header plans {slot}")
        self.written += 1
        return slot

    def _write_all(self, data) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            view = view[self.fh.write(view):]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._next_slot((name, SAFE_DTYPE_OF.get(tensor.dtype), tuple(tensor.shape)))
        if tensor.numel():
            self._write_all(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def copy(self, name: str, source_fh, where: TensorRange) -> None:
        """Append a tensor unchanged, straight from its byte range in an input shard."""
        self._next_slot((name, where.safe_dtype, where.shape))
        offset, left = where.offset, where.nbytes
        while left:
            try:
                done = os.copy_file_range(source_fh.fileno(), self.fh.fileno(), left, offset)
            except OSError:  # file systems without copy_file_range (and cross-device copies on old kernels)
                source_fh.seek(offset)
                data = source_fh.read(min(left, 1 << 24))
                self._write_all(data)
                done = len(data)
            if done == 0:
                raise ContractError(f"{where.path} is truncated inside tensor {name}")
            offset, left = offset + done, left - done

    def close(self) -> None:
        os.fsync(self.fh.fileno())
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
