"""The training checkpoint's on-disk contract: its folder layout and the record a resume checks.

Layout of a run's ``checkpoints/``::

    checkpoints/
      latest                    # the tag of the newest complete checkpoint (replaced atomically)
      step-00000200/            # DeepSpeed's checkpoint (every rank's ZeRO-3 partitions + optimizer state)
        gift_checkpoint.json    # this record: step, world size, model identity, prepared fingerprint, checksums
        adapter/                # the gathered LoRA as a PEFT adapter (resume on another number of ranks)
        optimizer_state.safetensors  # the LoRA tensors' full AdamW moments and step count (idem)
      .tmp/                     # a checkpoint being written; never read

The trainer writes and resumes checkpoints (``gift_dist.train.checkpointing``); this module is what a checkpoint
is, so every reader (the trainer, tests, tools) checks it the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from gift_dist.contracts import read_record, verify_folder_digests

log = logging.getLogger(__name__)

LATEST_NAME = "latest"
RECORD_NAME = "gift_checkpoint.json"
ADAPTER_DIR = "adapter"
OPTIMIZER_STATE_NAME = "optimizer_state.safetensors"
TMP_DIR = ".tmp"
FORMAT = "gift_dist.checkpoint"
# 2: the gathered optimizer state (OPTIMIZER_STATE_NAME) beside the adapter. Version 1 checkpoints are still
# resumed; on another number of ranks their optimizer restarts (with a warning).
VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class CheckpointRecord:
    """What a checkpoint must agree with to be resumed from."""

    step: int
    world_size: int
    global_batch_size: int
    model_identity: dict
    prepared_fingerprint: str
    train_model: str
    format: str = FORMAT
    version: int = VERSION
    # The train settings that shape the result (every key not marked operational); compared on resume.
    train_settings: dict = field(default_factory=dict)
    # sha256 of every file of the checkpoint but this record, by path relative to the checkpoint folder; checked
    # before anything is loaded (DeepSpeed's files are torch pickles: only files this run wrote are unpickled).
    file_sha256: dict = field(default_factory=dict)


def verify_checkpoint_files(folder: Path, record: CheckpointRecord) -> None:
    """Every file the record lists is there with its checksum, and no other file is (checkpoints written before
    checksums were recorded have none to check)."""
    if not record.file_sha256:
        log.warning("checkpoint %s records no file checksums (written by an older version): not verified", folder)
        return
    verify_folder_digests(folder, record.file_sha256, "checkpoint", "the checkpoint",
                          f"resume from an earlier checkpoint (point {folder.parent / LATEST_NAME} at it) or train "
                          f"afresh", skip=(RECORD_NAME,))


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def read_checkpoint_record(record_path: Path) -> CheckpointRecord:
    """A checkpoint's record, its format and version checked (every readable version accepted)."""
    return read_record(record_path, CheckpointRecord, FORMAT, VERSION, "train afresh in another output_dir",
                       "checkpoint record", readable=READABLE_VERSIONS)
