"""The merged-model contract: what `merge` hands to users (and what `verify-merge` checks).

A merged directory is an ordinary HF checkpoint, loadable with ``AutoModelForCausalLM.from_pretrained``::

    merged/
      config.json, generation_config.json, tokenizer files, chat template   # copied from the target model
      model-0000N-of-0000M.safetensors + model.safetensors.index.json       # (or one model.safetensors)
      gift_merge.json                                                        # provenance, written last

``gift_merge.json`` says which base, target (instruct) model and adapter made the weights and with which scale
and dtype. The directory is assembled under a temporary sibling and renamed when complete, so a directory with
this file at the final path is a finished merge.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from gift_dist.contracts import ContractError, atomic_write_text, check_inside, file_sha256, read_record

FORMAT = "gift_dist.merged"
VERSION = 1
RECORD_NAME = "gift_merge.json"


@dataclass
class MergeRecord:
    # {"name", "hash"} of the base model the adapter was trained on, when it was given (needed for full weights).
    base: Optional[dict[str, str]]
    # {"name", "hash"} of the checkpoint the adapter was merged into, and which of the pair it was.
    target: dict[str, str]
    into: str
    # {"path", "hash"} of the adapter dir.
    adapter: dict[str, str]
    # LoRA scaling alpha/r (or alpha/sqrt(r)), and the user's blend strength applied on top of it.
    lora_scaling: float
    strength: float
    dtype: str
    merged_tensors: list[str]
    shards: list[str]
    format: str = FORMAT
    version: int = VERSION
    # sha256 of every weight file (shard name -> hex): `verify-merge` recomputes them, so a damaged copy of a merged
    # model is found without the inputs it was made from. Empty in records written before checksums.
    shard_sha256: dict[str, str] = field(default_factory=dict)
    # {"name", "hash"} of the instruct model the adapter was scored and trained for, when it was merged into another
    # one (merge.allow_other_instruct=true); None when the target is that model (or the adapter records none).
    other_instruct: Optional[dict[str, str]] = None
    # Set when the adapter was (or may have been) trained against int8 base weights (its provenance's
    # quantized_frozen_weights; ``contracts.adapter.int8_base_note``): the line merge reported. None otherwise and in
    # records written before it was recorded.
    int8_base_weights: Optional[str] = None
    # Set when the adapter was trained on a bitsandbytes base (its provenance's quantize_base, QLoRA;
    # ``contracts.adapter.quantized_base_note``): the line merge reported. None otherwise and in older records.
    quantized_base: Optional[str] = None

    @property
    def scale(self) -> float:
        """The factor applied to B @ A: LoRA scaling times blend strength (rank/alpha patterns aside)."""
        return self.lora_scaling * self.strength


@dataclass
class Merged:
    path: Path
    record: MergeRecord


def write_record(out_dir: str | Path, record: MergeRecord) -> Path:
    path = Path(out_dir) / RECORD_NAME
    return atomic_write_text(path, json.dumps(asdict(record), indent=2, sort_keys=True) + "\n")


def read_merged(path: str | Path) -> Merged:
    """Open a merged dir and check it is complete: record present and valid, every shard it names on disk."""
    path = Path(path)
    if not path.is_dir():
        raise ContractError(f"merged model directory not found: {path}")
    record_path = path / RECORD_NAME
    if not record_path.is_file():
        raise ContractError(f"{path} has no {RECORD_NAME}: not a finished gift_dist merge")
    record = read_record(record_path, MergeRecord, FORMAT, VERSION, "merge again with this gift_dist", "merge record")
    for shard in record.shards:
        if not check_inside(path, shard).is_file():
            raise ContractError(f"merged model {path}: shard {shard} named in {RECORD_NAME} is missing")
    if record.shard_sha256 and set(record.shard_sha256) != set(record.shards):
        raise ContractError(f"{record_path}: checksums name {sorted(record.shard_sha256)}, shards {record.shards}")
    if not (path / "config.json").is_file():
        raise ContractError(f"merged model {path} has no config.json")
    return Merged(path, record)


def shard_checksums(path: str | Path, shards: list[str]) -> dict[str, str]:
    """sha256 of each named shard of a merged dir (read in parallel: shards are gigabytes)."""
    from concurrent.futures import ThreadPoolExecutor

    path = Path(path)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(shards)))) as pool:
        return dict(zip(shards, pool.map(lambda name: file_sha256(check_inside(path, name)), shards)))


def verify_checksums(merged: "Merged") -> int:
    """Recompute every recorded shard checksum; a ContractError names the first shard that differs. Returns how
    many were checked (0 for records without checksums)."""
    actual = shard_checksums(merged.path, sorted(merged.record.shard_sha256))
    for name, digest in actual.items():
        if digest != merged.record.shard_sha256[name]:
            raise ContractError(f"merged model {merged.path}: shard {name} does not match the sha256 in "
                                f"{RECORD_NAME}: the file changed or was damaged after the merge; merge again")
    return len(actual)
