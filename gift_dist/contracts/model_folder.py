"""Reading HF model folders without loading weights: weight files, tensor shapes from headers, identity.

Written by hand because neither transformers nor safetensors exposes "the shapes of every tensor of a sharded
checkpoint, from headers only" as an API; the pair check and the streaming merge need exactly that.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from gift_dist.contracts import ContractError, check_inside
from gift_dist.contracts.shardio import read_header

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


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
    raise ContractError(f"{model_dir} is not a loadable model: it has no weights ({SAFE_SINGLE} or {SAFE_INDEX})")


def require_model(model: str | Path, role: str = "model") -> None:
    """A model named by a local path must be a loadable model folder, config.json and safetensors weights; a
    ContractError names what is missing (a hub id, which is no local path, is left to transformers)."""
    path = Path(model).expanduser()
    if not str(model) or not path.exists():
        return
    if not path.is_dir():
        raise ContractError(f"{role} {model} is a file, not a model folder (config.json and {SAFE_SINGLE})")
    if not (path / "config.json").is_file():
        raise ContractError(f"{role} {model} is not a loadable model: it has no config.json (a model folder holds "
                            f"config.json and {SAFE_SINGLE} or {SAFE_INDEX} with its shards)")
    try:
        weight_files(path)
    except ContractError as exc:
        raise ContractError(f"{role} {exc}") from None


def tensor_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files(model_dir):
        for name, info in read_header(path).items():
            if name != "__metadata__":
                shapes[name] = tuple(info["shape"])
    return shapes


# Per-file digests of a checkpoint, cached beside it (or in the user's cache when the folder is read-only), keyed
# by file name, size, modification time, inode, status-change time and a sample of the content: a 140 GB
# checkpoint is read once, not by every stage. The mtime alone can be put back after a rewrite (`touch -r`,
# `cp -a`); the ctime cannot be set back by a user, a rewritten file gets a new inode when written beside and
# renamed, and the sample sees a rewrite done within one tick of the file system's clock.
DIGEST_CACHE_NAME = ".gift_dist_digests.json"
DIGEST_THREADS = 8
# The content sample of the cache key: this many bytes at the start, the middle and the end of each file.
DIGEST_SAMPLE_BYTES = 64 * 1024


def _digest_cache_path(model_dir: Path) -> Path:
    beside = model_dir / DIGEST_CACHE_NAME
    if os.access(model_dir, os.W_OK):
        return beside
    key = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:24]
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gift_dist" / "digests" / f"{key}.json"


def _digest_stamp(path: Path) -> str:
    """The cache key of one weight file's digest (see DIGEST_CACHE_NAME)."""
    stat = path.stat()
    sample = hashlib.sha256()
    with open(path, "rb") as fh:
        for offset in sorted({0, max(0, stat.st_size // 2 - DIGEST_SAMPLE_BYTES // 2),
                              max(0, stat.st_size - DIGEST_SAMPLE_BYTES)}):
            fh.seek(offset)
            sample.update(fh.read(DIGEST_SAMPLE_BYTES))
    return (f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}:{stat.st_ctime_ns}:"
            f"{sample.hexdigest()[:16]}")


def weight_digests(model_dir: str | Path) -> dict[str, str]:
    """sha256 of every weight file (name -> hex), computed in parallel and cached by ``_digest_stamp`` (size,
    mtime, inode, ctime and a content sample)."""
    from concurrent.futures import ThreadPoolExecutor

    from gift_dist.contracts import atomic_write_text, file_sha256

    model_dir = Path(model_dir)
    files = weight_files(model_dir)
    cache_path = _digest_cache_path(model_dir)
    try:
        cached = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        cached = {}
    stamps = {p.name: _digest_stamp(p) for p in files}
    digests = {name: entry["sha256"] for name, entry in cached.items()
               if isinstance(entry, dict) and entry.get("stamp") == stamps.get(name)}
    missing = [p for p in files if p.name not in digests]
    if missing:
        with ThreadPoolExecutor(max_workers=min(DIGEST_THREADS, len(missing))) as pool:
            for path, digest in zip(missing, pool.map(file_sha256, missing)):
                digests[path.name] = digest
        record = {name: {"stamp": stamps[name], "sha256": digests[name]} for name in stamps}
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache_path, json.dumps(record, indent=1, sort_keys=True) + "\n")
        except OSError:
            pass  # an unwritable cache only costs the next stage the same hashing
    return {p.name: digests[p.name] for p in files}


def model_identity(model: str) -> dict[str, str]:
    """A model's identity: its config and the sha256 of every weight file, so two checkpoints that differ in any
    weight differ here (a v1 and a v2 of the same fine-tune, a base and its instruct sibling of equal shapes).
    Weight digests are cached beside the model (see ``weight_digests``)."""
    digest = hashlib.sha256()
    if is_local(model):
        require_model(model)
        model_dir = Path(model)
        config = model_dir / "config.json"
        digest.update(config.read_bytes() if config.is_file() else b"")
        for name, file_digest in weight_digests(model_dir).items():
            digest.update(f"{name}:{file_digest}".encode())
        name = str(model_dir.resolve())
    else:
        from huggingface_hub import HfApi

        info = HfApi().model_info(model)
        digest.update(f"{model}@{info.sha}".encode())
        name = model
    return {"name": name, "hash": digest.hexdigest()[:16]}
