"""The confidence contract: per-target-token log-probabilities of the instruct model, written by `score`.

Layout of a confidence directory::

    confidence/
      manifest.json            # this module's manifest: which shards are finished, with sha256 and counts
      shard-00000.safetensors  # one file per shard of the prepared shard plan
      ...

Each shard holds three tensors (a CSR layout over the shard's samples, in shard-plan order):

- ``sample_index`` int64 [n]    : position of each sample in the prepared dataset
- ``offsets``      int64 [n + 1]: sample ``i``'s values are ``logprobs[offsets[i]:offsets[i + 1]]``
- ``logprobs``     float32 (or bf16/fp16) [total target tokens]: ``log p_inst(y_t | x, y<t)`` in label order
- ``entropy``      optional, same shape as ``logprobs``: entropy of the instruct distribution at that position

and ``__metadata__`` naming the format, version, prepared fingerprint, instruct model and dtype. A shard's bytes
depend only on its values: no worker id or timestamp is stored in it, and the header is written with sorted keys,
so any worker (or a re-run) produces a byte-identical file for the same shard.

Shards appear atomically (written to a temporary name, then renamed) and ``manifest.json`` is only ever
replaced whole, under a lock file, so a reader sees finished shards only. Writers may run on many nodes at
once against a shared filesystem.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch

from gift_dist.contracts import (
    ContractError,
    atomic_write_text,
    check_header,
    check_inside,
    file_sha256,
    first_non_finite,
    read_json,
    record_from,
)
from gift_dist.contracts.shardio import SAFE_DTYPE_OF, TORCH_DTYPE_BY_NAME, ShardWriter, TensorSlot

FORMAT = "gift_dist.confidence"
VERSION = 1
MANIFEST_NAME = "manifest.json"
# The scorer's totals over all finished shards (written by score, read by train's trackers).
SUMMARY_NAME = "summary.json"
# The held-out split's confidence, under the same contract, in this subfolder of confidence/.
EVAL_DIR = "eval"
LOCK_NAME = "manifest.lock"
# A manifest lock older than this belongs to a killed writer (the lock is held for milliseconds).
STALE_LOCK_SECONDS = 30.0


def shard_filename(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


@dataclass(frozen=True)
class ShardRecord:
    index: int
    file: str
    sha256: str
    num_samples: int
    num_tokens: int
    # Provenance only (never part of the shard bytes): how long scoring took and who did it.
    seconds: float = 0.0
    worker: str = ""


@dataclass
class ConfidenceManifest:
    prepared_fingerprint: str
    instruct_model: dict
    logprob_dtype: str
    num_shards: int
    record_entropy: bool = False
    shards: dict[int, ShardRecord] = field(default_factory=dict)
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> dict:
        data = asdict(self)
        data["shards"] = {str(k): asdict(v) for k, v in sorted(self.shards.items())}
        return data

    @classmethod
    def from_json(cls, data: dict, where: str) -> "ConfidenceManifest":
        def build(**values) -> "ConfidenceManifest":
            shards = {int(k): ShardRecord(**v) for k, v in values.get("shards", {}).items()}
            return cls(**{**values, "shards": shards})

        return record_from(data, build, FORMAT, VERSION, where, "re-run `gift-dist score` into a fresh directory",
                           "confidence manifest", errors=(TypeError, ValueError))

    @property
    def complete(self) -> bool:
        return len(self.shards) == self.num_shards

    def check_matches(self, prepared_fingerprint: str, instruct_model: Optional[dict], where: str) -> None:
        """Refuse confidence computed for other data or by another instruct model."""
        if self.prepared_fingerprint != prepared_fingerprint:
            raise ContractError(
                f"{where} holds confidence for prepared fingerprint {self.prepared_fingerprint}, but the prepared "
                f"dataset has fingerprint {prepared_fingerprint}. Point score at a fresh output directory or delete "
                f"{where} to recompute."
            )
        if instruct_model is not None and self.instruct_model.get("hash") != instruct_model.get("hash"):
            raise ContractError(
                f"{where} was scored by instruct model {self.instruct_model.get('name')} "
                f"(hash {self.instruct_model.get('hash')}), not {instruct_model.get('name')} "
                f"(hash {instruct_model.get('hash')}). Use a fresh output directory or delete {where}."
            )


@contextmanager
def manifest_lock(conf_dir: Path, timeout: float = 120.0) -> Iterator[None]:
    """An exclusive lock file (O_EXCL works on every shared filesystem, unlike fcntl on some NFS setups)."""
    lock = conf_dir / LOCK_NAME
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, f"{socket.gethostname()}:{os.getpid()}".encode())
            os.close(fd)
            break
        except FileExistsError:
            try:
                if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
                    lock.unlink(missing_ok=True)
                    continue
            except FileNotFoundError:
                continue
            if time.monotonic() > deadline:
                raise ContractError(f"could not take {lock} within {timeout:.0f}s; is another writer stuck?")
            time.sleep(0.05)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def read_manifest(conf_dir: str | Path) -> Optional[ConfidenceManifest]:
    """The manifest, or None when no scorer has started writing into ``conf_dir`` yet."""
    path = Path(conf_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    return ConfidenceManifest.from_json(read_json(path), str(path))


# What every reader of summary.json uses; the scorer writes more (histogram counts, throughput).
SUMMARY_KEYS = ("mean_confidence", "low_confidence_share", "tokens", "samples")


def read_summary(conf_dir: str | Path) -> Optional[dict]:
    """The scorer's totals (``SUMMARY_NAME``, written by ``score.report.write_confidence_report``), or None when
    scoring has not written them yet; a ContractError naming the file when it is not JSON or lacks a key of
    ``SUMMARY_KEYS`` or a value there is not a finite number."""
    path = Path(conf_dir) / SUMMARY_NAME
    if not path.is_file():
        return None
    data = read_json(path)
    bad = [key for key in SUMMARY_KEYS if not isinstance(data, dict) or not isinstance(data.get(key), (int, float))
           or isinstance(data.get(key), bool) or not math.isfinite(data[key])]
    if bad:
        raise ContractError(f"{path}: the scoring summary lacks finite values for {bad}; rerun `gift-dist score` "
                            f"(it rewrites the summary from the finished shards)")
    return data


def init_manifest(conf_dir: str | Path, template: ConfidenceManifest) -> ConfidenceManifest:
    """Create the manifest, or check an existing one describes the same scoring job; returns the current one."""
    conf_dir = Path(conf_dir)
    try:
        conf_dir.mkdir(parents=True, exist_ok=True)
        with manifest_lock(conf_dir):
            existing = read_manifest(conf_dir)
            if existing is None:
                atomic_write_text(conf_dir / MANIFEST_NAME, json.dumps(template.to_json(), indent=2) + "\n")
                return template
    except OSError as exc:
        raise ContractError(f"cannot write the confidence output directory {conf_dir}: {exc}") from exc
    existing.check_matches(template.prepared_fingerprint, template.instruct_model, str(conf_dir))
    if existing.logprob_dtype != template.logprob_dtype or existing.num_shards != template.num_shards:
        raise ContractError(
            f"{conf_dir} was started with logprob_dtype={existing.logprob_dtype}, {existing.num_shards} shards; "
            f"this job asks for {template.logprob_dtype}, {template.num_shards} shards. Use a fresh directory."
        )
    return existing


def save_safetensors_deterministic(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write a safetensors file whose bytes depend only on the tensors and metadata (both in sorted order)."""
    ordered = {name: tensors[name].detach().to("cpu").contiguous() for name in sorted(tensors)}
    slots = [TensorSlot(name, SAFE_DTYPE_OF[t.dtype], tuple(t.shape)) for name, t in ordered.items()]
    with ShardWriter(path, slots, dict(sorted(metadata.items()))) as writer:
        for name, tensor in ordered.items():
            writer.write(name, tensor)


def write_shard(
    conf_dir: str | Path,
    manifest: ConfidenceManifest,
    shard_index: int,
    sample_index: torch.Tensor,
    offsets: torch.Tensor,
    logprobs: torch.Tensor,
    entropy: Optional[torch.Tensor] = None,
    seconds: float = 0.0,
    worker: str = "",
) -> ShardRecord:
    """Write one shard under a temporary name, rename it into place, then record it in the manifest.

    A failed write (disk full, permissions) leaves no partial file behind and is a ContractError naming the
    directory.
    """
    conf_dir = Path(conf_dir)
    dtype = TORCH_DTYPE_BY_NAME[manifest.logprob_dtype]
    tensors = {
        "sample_index": sample_index.to(torch.int64).contiguous(),
        "offsets": offsets.to(torch.int64).contiguous(),
        "logprobs": logprobs.to(dtype).contiguous(),
    }
    if manifest.record_entropy:
        if entropy is None:
            raise ValueError(f"shard {shard_index}: record_entropy is on but no entropy was given")
        tensors["entropy"] = entropy.to(dtype).contiguous()
    _check_layout(tensors, f"shard {shard_index} (being written)")
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "prepared_fingerprint": manifest.prepared_fingerprint,
        "instruct_model": manifest.instruct_model.get("name", ""),
        "instruct_model_hash": manifest.instruct_model.get("hash", ""),
        "dtype": manifest.logprob_dtype,
        "shard_index": str(shard_index),
    }
    final = conf_dir / shard_filename(shard_index)
    tmp = conf_dir / f".{final.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        save_safetensors_deterministic(tensors, metadata, tmp)
        record = ShardRecord(
            index=shard_index,
            file=final.name,
            sha256=file_sha256(tmp),
            num_samples=int(tensors["sample_index"].numel()),
            num_tokens=int(tensors["logprobs"].numel()),
            seconds=round(float(seconds), 3),
            worker=worker,
        )
        os.replace(tmp, final)
        with manifest_lock(conf_dir):
            current = read_manifest(conf_dir)
            if current is None:
                raise ContractError(f"{conf_dir / MANIFEST_NAME} disappeared while shard {shard_index} was written")
            current.shards[shard_index] = record
            atomic_write_text(conf_dir / MANIFEST_NAME, json.dumps(current.to_json(), indent=2) + "\n")
    except OSError as exc:
        raise ContractError(f"cannot write confidence shard {shard_index} into {conf_dir}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return record


def forget_shards(conf_dir: str | Path, indices: list[int]) -> None:
    """Take shards out of the manifest (under its lock) and delete their files, so they are scored again."""
    conf_dir = Path(conf_dir)
    try:
        with manifest_lock(conf_dir):
            current = read_manifest(conf_dir)
            if current is None:
                return
            for index in indices:
                record = current.shards.pop(index, None)
                if record is not None:
                    (conf_dir / record.file).unlink(missing_ok=True)
            atomic_write_text(conf_dir / MANIFEST_NAME, json.dumps(current.to_json(), indent=2) + "\n")
    except OSError as exc:
        raise ContractError(f"cannot update the confidence manifest in {conf_dir}: {exc}") from exc


def _check_layout(tensors: dict[str, torch.Tensor], where: str) -> None:
    sample_index, offsets, logprobs = tensors["sample_index"], tensors["offsets"], tensors["logprobs"]
    if sample_index.dim() != 1 or offsets.dim() != 1 or logprobs.dim() != 1:
        raise ContractError(f"{where}: sample_index, offsets and logprobs must be 1-D")
    if offsets.numel() != sample_index.numel() + 1:
        raise ContractError(f"{where}: offsets has {offsets.numel()} entries for {sample_index.numel()} samples")
    if offsets[0].item() != 0 or offsets[-1].item() != logprobs.numel():
        raise ContractError(f"{where}: offsets must run from 0 to {logprobs.numel()}, got {offsets[0]}..{offsets[-1]}")
    if bool((offsets[1:] < offsets[:-1]).any()):
        raise ContractError(f"{where}: offsets are not non-decreasing")
    if "entropy" in tensors and tensors["entropy"].shape != logprobs.shape:
        raise ContractError(f"{where}: entropy shape {tuple(tensors['entropy'].shape)} != logprobs shape")
    bad = first_non_finite(logprobs.float())
    if bad is not None:
        position = bad[0]
        sample = int(torch.searchsorted(offsets, torch.tensor(position), right=True)) - 1
        raise ContractError(
            f"{where}: non-finite logprob for sample {int(sample_index[sample])} at target position "
            f"{position - int(offsets[sample])}"
        )


@dataclass
class ConfidenceShard:
    index: int
    sample_index: torch.Tensor
    offsets: torch.Tensor
    logprobs: torch.Tensor
    entropy: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.sample_index.numel())

    def values(self, i: int) -> torch.Tensor:
        """Logprobs of the ``i``-th sample of this shard."""
        return self.logprobs[int(self.offsets[i]) : int(self.offsets[i + 1])]


def read_shard(
    conf_dir: str | Path, manifest: ConfidenceManifest, shard_index: int, verify_checksum: bool = True
) -> ConfidenceShard:
    """Load a finished shard, checking checksum, metadata and layout; any damage names the file."""
    from safetensors import safe_open

    conf_dir = Path(conf_dir)
    record = manifest.shards.get(shard_index)
    if record is None:
        raise ContractError(f"shard {shard_index} is not finished in {conf_dir / MANIFEST_NAME}")
    path = check_inside(conf_dir, record.file)
    if not path.is_file():
        raise ContractError(f"confidence shard {path} is listed in the manifest but missing")
    if verify_checksum and file_sha256(path) != record.sha256:
        raise ContractError(f"confidence shard {path} is corrupt: sha256 differs from the manifest")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except Exception as exc:  # safetensors raises SafetensorError / OSError for damaged files
        raise ContractError(f"confidence shard {path} cannot be read: {exc}") from exc
    check_header(metadata, FORMAT, VERSION, f"confidence shard {path}",
                 "score it again (`gift-dist score --rescore-corrupt`)")
    if metadata.get("prepared_fingerprint") != manifest.prepared_fingerprint:
        raise ContractError(
            f"confidence shard {path} belongs to prepared fingerprint {metadata.get('prepared_fingerprint')}, "
            f"the manifest to {manifest.prepared_fingerprint}"
        )
    missing = {"sample_index", "offsets", "logprobs"} - tensors.keys()
    if missing:
        raise ContractError(f"confidence shard {path} lacks tensors {sorted(missing)}")
    _check_layout(tensors, f"confidence shard {path}")
    if tensors["sample_index"].numel() != record.num_samples or tensors["logprobs"].numel() != record.num_tokens:
        raise ContractError(f"confidence shard {path}: counts differ from the manifest record {record}")
    return ConfidenceShard(
        index=shard_index,
        sample_index=tensors["sample_index"],
        offsets=tensors["offsets"],
        logprobs=tensors["logprobs"].float(),
        entropy=tensors["entropy"].float() if "entropy" in tensors else None,
    )


def check_shard_against_plan(shard: ConfidenceShard, start: int, end: int, target_counts: list[int], where: str):
    """Check a shard covers exactly prepared samples ``[start, end)`` with one value per target token."""
    expected = torch.arange(start, end, dtype=torch.int64)
    if shard.sample_index.numel() != expected.numel() or not torch.equal(shard.sample_index, expected):
        raise ContractError(f"{where}: holds samples other than the shard plan's [{start}, {end})")
    counts = (shard.offsets[1:] - shard.offsets[:-1]).tolist()
    for i, (got, want) in enumerate(zip(counts, target_counts)):
        if got != want:
            raise ContractError(
                f"{where}: sample {start + i} has {got} logprobs but {want} target tokens in the prepared dataset"
            )
