"""Reading HF checkpoint directories without loading weights: weight files, safetensors headers, identity.

Written by hand because neither transformers nor safetensors exposes "the shapes of every tensor of a sharded
checkpoint, from headers only" as an API; the pair check and the streaming merge need exactly that.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from gift_dist.contracts import ContractError, check_inside

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# A safetensors header larger than this is not a real header (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000


def is_local(model: str) -> bool:
    return Path(model).is_dir()


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, in index order. Pickle-only checkpoints are refused, never read."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ContractError(f"model directory not found: {model_dir}")
    index = model_dir / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ContractError(f"{index} is not a valid safetensors index: {exc}") from exc
        files = []
        for name in dict.fromkeys(weight_map.values()):
            path = check_inside(model_dir, name)
            if not path.is_file():
                raise ContractError(f"{model_dir}: shard {name} listed in {SAFE_INDEX} is missing")
            files.append(path)
        return files
    single = model_dir / SAFE_SINGLE
    if single.is_file():
        return [single]
    if any((model_dir / name).exists() for name in PICKLE_NAMES):
        raise ContractError(
            f"{model_dir} holds only pickle (.bin) weights, which gift_dist never unpickles. Convert it once to "
            f"safetensors, e.g. `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, "
            f"safe_serialization=True)` on a machine you trust."
        )
    raise ContractError(f"{model_dir} has no {SAFE_SINGLE} or {SAFE_INDEX}")


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


def tensor_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files(model_dir):
        for name, info in read_header(path).items():
            if name != "__metadata__":
                shapes[name] = tuple(info["shape"])
    return shapes


def model_identity(model: str) -> dict[str, str]:
    """A cheap identity for a model: hash of its config and tensor headers (names, shapes, dtypes, sizes).

    Hashing 140 GB of weights per stage would cost minutes; headers plus file sizes tell apart any two
    checkpoints a user would plausibly mix up (other model, other revision, re-saved in another dtype).
    """
    digest = hashlib.sha256()
    if is_local(model):
        model_dir = Path(model)
        config = model_dir / "config.json"
        digest.update(config.read_bytes() if config.is_file() else b"")
        for path in weight_files(model_dir):
            header = read_header(path)
            header.pop("__metadata__", None)
            digest.update(path.name.encode())
            digest.update(json.dumps(header, sort_keys=True).encode())
            digest.update(str(path.stat().st_size).encode())
        name = str(model_dir.resolve())
    else:
        from huggingface_hub import HfApi

        info = HfApi().model_info(model)
        digest.update(f"{model}@{info.sha}".encode())
        name = model
    return {"name": name, "hash": digest.hexdigest()[:16]}
