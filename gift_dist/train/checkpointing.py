"""Writing training checkpoints that are complete or invisible, and resuming from them.

What a checkpoint is (its layout and record) is the contract ``gift_dist.contracts.checkpoint``. All ranks write
their partitions into ``.tmp/<tag>``; after a barrier rank 0 adds the record and the adapter, renames the folder
into place and only then points ``latest`` at it. A kill at any moment leaves the previous checkpoint loadable.
The data position is the step: ``TrainBatches.micro_batches(step)`` is stateless.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional

from gift_dist import dist
from gift_dist.contracts import (
    ASIDE_SUFFIX,
    ContractError,
    atomic_write_text,
    changed_settings,
    folder_digests,
    recover_directory,
    replace_directory,
)
from gift_dist.contracts.adapter import AdapterProvenance
from gift_dist.contracts.checkpoint import (
    ADAPTER_DIR,
    CheckpointRecord,
    LATEST_NAME,
    OPTIMIZER_STATE_NAME,
    RECORD_NAME,
    TMP_DIR,
    read_checkpoint_record,
    tag_for,
    verify_checkpoint_files,
)
from gift_dist.train import adapter_io

log = logging.getLogger(__name__)

# Result-changing settings a resumed run may still change, with --resume-anyway: how long it trains.
RESUME_ANYWAY_KEYS = ("max_steps", "epochs")
# How the global batch is split may change with the number of ranks; the global batch itself is checked apart.
BATCH_SPLIT_KEYS = ("micro_batch_size", "gradient_accumulation_steps")


class Checkpoints:
    """Save, find and resume from the checkpoints of one run."""

    def __init__(self, root: str | Path, keep: int):
        self.root = Path(root)
        self.keep = max(1, keep)

    def latest(self) -> Optional[tuple[Path, CheckpointRecord]]:
        """The newest complete checkpoint, or None when there is none."""
        pointer = self.root / LATEST_NAME
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        folder = self.root / tag
        # A crash while this tag's folder was being replaced leaves it aside: every run starts here, so here it
        # is put back.
        recover_directory(folder)
        record_path = folder / RECORD_NAME
        if not record_path.is_file():
            raise ContractError(f"{pointer} names checkpoint {tag}, but {record_path} is missing")
        return folder, read_checkpoint_record(record_path)

    def save(self, engine: Any, peft_model: Any, peft_config: Any, record: CheckpointRecord,
             adapter_provenance: AdapterProvenance) -> Path:
        """Write a checkpoint on all ranks (a collective), then publish it atomically from rank 0."""
        tag = tag_for(record.step)
        tmp_root = self.root / TMP_DIR
        dist.rank0_call(self._clear_tmp, tmp_root / tag)
        # The frozen base is not saved: it is the model on disk (its identity is in the record), and writing it
        # would put a whole model's weights into every checkpoint of a replicated run.
        engine.save_checkpoint(str(tmp_root), tag=tag, client_state={"step": record.step}, save_latest=False,
                               exclude_frozen_parameters=True)
        tensors = adapter_io.gather_lora(peft_model)
        # The LoRA tensors' AdamW moments, for a resume on another number of ranks (DeepSpeed's own optimizer
        # files are partitioned for this world size). Same decision on every rank: it is a collective.
        optimizer_state = None
        if adapter_io.restorable_optimizer(engine) is None:
            optimizer_state = adapter_io.gather_optimizer_state(engine, peft_model)
        dist.barrier()
        config = adapter_io.adapter_config(peft_model, peft_config)
        folder = dist.rank0_call(self._publish, tmp_root / tag, tag, record, config, tensors, adapter_provenance,
                                 optimizer_state)
        log.info("saved checkpoint %s (step %d)", folder, record.step)
        return Path(folder)

    @staticmethod
    def _clear_tmp(folder: Path) -> None:
        if folder.exists():
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)

    def _publish(self, tmp: Path, tag: str, record: CheckpointRecord, peft_config: Any, tensors: dict,
                 provenance: AdapterProvenance, optimizer_state: Optional[tuple[dict, int]] = None) -> str:
        from gift_dist.contracts.adapter import write_adapter

        write_adapter(tmp / ADAPTER_DIR, peft_config, tensors, provenance)
        if optimizer_state is not None:
            moments, optimizer_step = optimizer_state
            adapter_io.write_optimizer_state(tmp / OPTIMIZER_STATE_NAME, moments, optimizer_step, record.step)
        record = replace(record, file_sha256=folder_digests(tmp, skip=(RECORD_NAME,)))
        (tmp / RECORD_NAME).write_text(json.dumps(asdict(record), indent=2, sort_keys=True) + "\n")
        final = self.root / tag
        # A step saved again (after a resume from an earlier checkpoint) replaces its folder, which is never
        # deleted before the new one is in place: a crash here leaves one of them, put back by latest() or by the
        # next save of this step.
        replace_directory(tmp, final)
        atomic_write_text(self.root / LATEST_NAME, tag + "\n")
        self._prune(keep_tag=tag)
        return str(final)

    def _prune(self, keep_tag: str) -> None:
        # A folder set aside by an interrupted replacement is no checkpoint of its own (replace_directory).
        tags = sorted(p.name for p in self.root.glob("step-*") if p.is_dir() and not p.name.endswith(ASIDE_SUFFIX))
        old = [t for t in tags if t != keep_tag][: max(0, len(tags) - self.keep)]
        for name in old:
            shutil.rmtree(self.root / name, ignore_errors=True)

    def resume(self, engine: Any, peft_model: Any, expected: CheckpointRecord, anyway: bool = False) -> int:
        """Load the latest checkpoint into ``engine`` after checking it belongs to this run; returns its step.

        Same number of ranks: DeepSpeed's own checkpoint (weights, optimizer, LR schedule). Another number of
        ranks with the same global batch: LoRA weights from the checkpoint's gathered adapter, AdamW's moments and
        step count from its gathered optimizer state, and the LR schedule advanced to the step. A checkpoint
        without that optimizer state (written by version 1, or by an optimizer it cannot be restored into) resumes
        with a fresh optimizer, with a warning.
        """
        found = self.latest()
        if found is None:
            raise ContractError(
                f"--resume: no checkpoint in {self.root} ({LATEST_NAME} missing); start without --resume or use "
                f"--resume-if-exists"
            )
        folder, record = found
        self._check(folder, record, expected, anyway)
        verify_checkpoint_files(folder, record)
        if record.world_size == expected.world_size:
            # Not strict: the checkpoint holds the trainable (LoRA) weights only; the frozen base is loaded already.
            path, client_state = engine.load_checkpoint(str(self.root), tag=folder.name, load_module_strict=False)
            if path is None:
                raise ContractError(f"DeepSpeed could not load checkpoint {folder}")
            step = int((client_state or {}).get("step", record.step))
        else:
            self._resume_on_another_world_size(engine, peft_model, folder, record, expected.world_size)
            step = record.step
        log.info("resumed from %s at step %d", folder, step)
        return step

    @staticmethod
    def _resume_on_another_world_size(engine: Any, peft_model: Any, folder: Path, record: CheckpointRecord,
                                      world_size: int) -> None:
        """The gathered LoRA weights and optimizer state set into this world size's partitions (every rank)."""
        if OPTIMIZER_STATE_NAME not in record.file_sha256:
            why = (f"it was written by checkpoint format version {record.version}" if record.version < 2
                   else "it holds no optimizer state (its optimizer could not be restored into)")
        else:
            why = adapter_io.restorable_optimizer(engine)
        adapter_io.load_lora_into(peft_model, folder / ADAPTER_DIR)
        if why is None:
            optimizer_step = adapter_io.load_optimizer_state_into(
                engine, peft_model, folder / OPTIMIZER_STATE_NAME, train_step=record.step)
            log.info("checkpoint %s was written by %d ranks, this run has %d: loaded the LoRA weights and their "
                     "AdamW state (step count %d) from its gathered adapter and optimizer state", folder,
                     record.world_size, world_size, optimizer_step)
        else:
            log.warning(
                "checkpoint %s was written by %d ranks, this run has %d: loading the LoRA weights from its "
                "gathered adapter with a FRESH optimizer state, because %s (Adam moments restart; the loss curve "
                "will differ slightly from an uninterrupted run)", folder, record.world_size, world_size, why,
            )
        with warnings.catch_warnings():
            # Replaying the schedule without optimizer steps is intended here.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            for _ in range(record.step):
                engine.lr_scheduler.step()
        # What DeepSpeed's own load sets (its step counters; the data position is the step).
        engine.global_steps = record.step
        engine.global_samples = record.step * record.global_batch_size

    @staticmethod
    def _check(folder: Path, record: CheckpointRecord, expected: CheckpointRecord, anyway: bool = False) -> None:
        where = folder / RECORD_NAME
        if record.train_settings:  # checkpoints written before settings were recorded have none
            changes = changed_settings(record.train_settings, expected.train_settings)
            refused = [key for key in changes
                       if key not in BATCH_SPLIT_KEYS and not (anyway and key in RESUME_ANYWAY_KEYS)]
            if refused:
                listed = ", ".join(f"train.{key}: {changes[key][0]!r} -> {changes[key][1]!r}" for key in refused)
                hint = (" --resume-anyway accepts a change of " + "/".join(RESUME_ANYWAY_KEYS) + " only."
                        if all(key in RESUME_ANYWAY_KEYS for key in refused) else "")
                raise ContractError(
                    f"{where}: this run's settings differ from the checkpoint's: {listed}. Resume with the "
                    f"checkpoint's settings, or train afresh in another output_dir.{hint}"
                )
        if record.model_identity.get("hash") != expected.model_identity.get("hash"):
            raise ContractError(
                f"{where}: checkpoint was trained on {record.model_identity.get('name')} (hash "
                f"{record.model_identity.get('hash')}), this run trains {expected.model_identity.get('name')} "
                f"(hash {expected.model_identity.get('hash')})"
            )
        if record.train_model != expected.train_model:
            raise ContractError(f"{where}: checkpoint trains the {record.train_model} model, this run the "
                                f"{expected.train_model} model")
        if record.prepared_fingerprint != expected.prepared_fingerprint:
            raise ContractError(
                f"{where}: checkpoint was trained on prepared data {record.prepared_fingerprint}, this run's "
                f"prepared data is {expected.prepared_fingerprint}"
            )
        if record.global_batch_size != expected.global_batch_size:
            raise ContractError(
                f"{where}: checkpoint used a global batch of {record.global_batch_size} samples "
                f"({record.world_size} ranks); this run has {expected.global_batch_size} ({expected.world_size} "
                f"ranks). The step is the data position, so the global batch must match: set "
                f"train.gradient_accumulation_steps so that micro_batch_size x GA x ranks = "
                f"{record.global_batch_size}"
            )
