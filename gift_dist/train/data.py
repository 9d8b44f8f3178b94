"""Training data: micro-batches of prepared samples with their instruct logprobs, streamed from the scorer's shards.

The data position is the optimizer step: ``TrainBatches.micro_batches(step)`` is a pure function of (prepared
dataset, config, rank, world, seed, step), so resuming from a checkpoint taken after step ``s`` is
``micro_batches(s + 1)`` onwards — there is no sampler state to save. Every epoch's order is a function of
(seed, epoch) only: epoch 0 visits the scorer's shards in prepared order, each shard's samples shuffled by
(seed, 0, shard), so training can start while the scorer is still writing later shards and two seeds still see
different batches; later epochs use a permutation of all samples seeded by (seed, epoch).

Neither ``datasets`` nor DeepSpeed's data loader streams a side file that is still being written, splits a global
batch identically for any rank x gradient-accumulation layout, and packs with per-sample position ids, hence this
module.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from gift_dist import dist
from gift_dist.config import ConfigError, TrainConfig
from gift_dist.contracts import ContractError
from gift_dist.contracts import confidence as conf_contract
from gift_dist.contracts.prepared import IGNORE_INDEX, Prepared
from gift_dist.models.batch import collate
from gift_dist.train import attention, loss, weighting

log = logging.getLogger(__name__)

# Shards kept decoded at once: a rank's micro-batches touch one or two neighbouring shards at a time.
SHARD_CACHE_SIZE = 4
# How epoch orders are drawn from train.seed (recorded in checkpoints: a checkpoint of another scheme is not
# resumed, its step would point elsewhere in the data). 2: epoch 0 shuffled within each shard, by the seed.
DATA_ORDER = 2


# While waiting for the scorer, the stop request (SIGTERM/SIGINT) is checked at least this often.
STOP_CHECK_SECONDS = 0.5


class StopWhileWaiting(Exception):
    """A stop was requested (SIGTERM/SIGINT) while the trainer waited for the scorer's confidence shards."""


class ConfidenceReader:
    """Per-sample instruct logprobs from a confidence directory that the scorer may still be filling.

    ``stop``: polled while waiting for a shard (every ``STOP_CHECK_SECONDS``); when it says true the wait ends with
    ``StopWhileWaiting``, so a preempted trainer stops within a second instead of waiting out the scorer."""

    def __init__(
        self,
        conf_dir: str | Path,
        prepared: Prepared,
        wait_seconds: float,
        poll_seconds: float,
        instruct_identity: Optional[dict] = None,
        stop: Optional[Callable[[], bool]] = None,
    ):
        self.conf_dir = Path(conf_dir)
        self.prepared = prepared
        self.wait_seconds = wait_seconds
        self.poll_seconds = poll_seconds
        self.instruct_identity = instruct_identity
        self.stop = stop or (lambda: False)
        self._target_counts = np.asarray(prepared.dataset.with_format("numpy")["num_target_tokens"], dtype=np.int64)
        self._manifest: Optional[conf_contract.ConfidenceManifest] = None
        self._cache: OrderedDict[int, conf_contract.ConfidenceShard] = OrderedDict()

    def logprobs(self, sample_index: int) -> Tensor:
        """float32 [num_target_tokens of the sample], in label order; waits for the scorer if needed."""
        spec = self.prepared.manifest.shard_of(sample_index)
        shard = self._shard(spec.index)
        return shard.values(sample_index - spec.start)

    def _refresh_manifest(self) -> Optional[conf_contract.ConfidenceManifest]:
        manifest = conf_contract.read_manifest(self.conf_dir)
        if manifest is not None:
            manifest.check_matches(self.prepared.manifest.fingerprint, self.instruct_identity, str(self.conf_dir))
            if manifest.num_shards != len(self.prepared.manifest.shards):
                raise ContractError(
                    f"{self.conf_dir / conf_contract.MANIFEST_NAME} plans {manifest.num_shards} shards, the prepared "
                    f"dataset {self.prepared.path} {len(self.prepared.manifest.shards)}"
                )
        self._manifest = manifest
        return manifest

    def _wait_for(self, shard_index: int) -> conf_contract.ConfidenceManifest:
        """The manifest once ``shard_index`` is finished; ContractError naming the shard after wait_seconds."""
        spec = self.prepared.manifest.shards[shard_index]
        started = time.monotonic()
        last_log = -dist.WAIT_LOG_SECONDS
        while True:
            manifest = self._refresh_manifest()
            if manifest is not None and shard_index in manifest.shards:
                return manifest
            waited = time.monotonic() - started
            finished = 0 if manifest is None else len(manifest.shards)
            progress = f"{finished} of {len(self.prepared.manifest.shards)} shards finished"
            if manifest is None:
                progress = f"no {conf_contract.MANIFEST_NAME} yet: the scorer has not started"
            if waited >= self.wait_seconds:
                raise ContractError(
                    f"confidence shard {shard_index} ({conf_contract.shard_filename(shard_index)}, samples "
                    f"[{spec.start}, {spec.end})) did not appear in {self.conf_dir} within {self.wait_seconds:.0f}s "
                    f"({progress}). Is `gift-dist score` running? Raise train.confidence_wait_seconds to wait longer."
                )
            if waited - last_log >= dist.WAIT_LOG_SECONDS:
                log.info("waiting for confidence shard %d in %s (%s)", shard_index, self.conf_dir, progress)
                last_log = waited
            next_poll = time.monotonic() + min(self.poll_seconds, max(self.wait_seconds - waited, 0.0))
            while True:
                if self.stop():
                    raise StopWhileWaiting(f"stop requested while waiting for confidence shard {shard_index} in "
                                           f"{self.conf_dir} ({progress})")
                left = next_poll - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(left, STOP_CHECK_SECONDS))

    def wait_all(self) -> None:
        """Wait until every shard of the plan is finished (StopWhileWaiting, ContractError as ``logprobs``)."""
        for index in range(len(self.prepared.manifest.shards)):
            if self._manifest is None or index not in self._manifest.shards:
                self._wait_for(index)

    def _shard(self, shard_index: int) -> conf_contract.ConfidenceShard:
        if shard_index in self._cache:
            self._cache.move_to_end(shard_index)
            return self._cache[shard_index]
        manifest = self._manifest
        if manifest is None or shard_index not in manifest.shards:
            manifest = self._wait_for(shard_index)
        spec = self.prepared.manifest.shards[shard_index]
        try:
            shard = conf_contract.read_shard(self.conf_dir, manifest, shard_index)
            conf_contract.check_shard_against_plan(
                shard,
                spec.start,
                spec.end,
                self._target_counts[spec.start : spec.end].tolist(),
                f"confidence shard {self.conf_dir / conf_contract.shard_filename(shard_index)}",
            )
        except ContractError as exc:
            raise ContractError(f"{exc}. To recover: `gift-dist score --rescore-corrupt` with this run's config "
                                f"scores it again, then `gift-dist train --resume` continues") from exc
        self._cache[shard_index] = shard
        while len(self._cache) > SHARD_CACHE_SIZE:
            self._cache.popitem(last=False)
        return shard


@dataclass
class MicroBatch:
    """One micro-batch, ready for ``TrainEngine.target_token_ce``: one call runs the decoder and the CE of the
    target tokens at ``target_positions`` (computed here, on the host).

    Packed micro-batches carry ``attention_mask=None``, per-sample ``position_ids`` and the sample boundaries
    (``cu_seq_lens``, ``max_length``): a varlen attention kernel takes the boundaries (``attention_kwargs``); with
    any other kernel transformers builds a block-diagonal causal mask from the position ids, provided the forward
    runs with ``use_cache=False`` (a cache disables that detection).
    """

    input_ids: Tensor
    labels: Tensor
    attention_mask: Optional[Tensor]
    position_ids: Tensor
    inst_logprobs: Optional[Tensor]
    is_eos: Tensor
    sample_lengths: Tensor
    sample_indices: list[int]
    # Flat indices into the [B*T] hidden states of the positions that predict a target, and the target ids ([N],
    # row-major): computed here on the host so the training step never syncs with the device to find them.
    target_positions: Tensor
    target_ids: Tensor
    # Packed rows only: cumulative sample lengths (int32, [samples + 1]) and the longest sample, what varlen
    # attention kernels take instead of a mask (``train.attn_implementation``).
    cu_seq_lens: Optional[Tensor] = None
    max_length: Optional[int] = None

    def attention_kwargs(self) -> dict:
        """The packed row's sample boundaries in transformers' flash-attention keyword names ({} when padded)."""
        if self.cu_seq_lens is None:
            return {}
        return {"cu_seq_lens_q": self.cu_seq_lens, "cu_seq_lens_k": self.cu_seq_lens,
                "max_length_q": self.max_length, "max_length_k": self.max_length}

    @property
    def num_target_tokens(self) -> int:
        return int(self.sample_lengths.sum())

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask.sum()) if self.attention_mask is not None else self.input_ids.numel()

    def to(self, device: torch.device | str) -> "MicroBatch":
        moved = {
            f.name: (value.to(device, non_blocking=True) if isinstance(value := getattr(self, f.name), Tensor)
                     else value)
            for f in fields(self)
        }
        return MicroBatch(**moved)


def _sample_tensors(sample_index: int, input_ids: list[int], labels: list[int], expected_targets: int):
    ids = torch.tensor(input_ids, dtype=torch.long)
    lab = torch.tensor(labels, dtype=torch.long)
    if ids.numel() != lab.numel() or ids.numel() == 0:
        raise ContractError(
            f"prepared sample {sample_index}: {ids.numel()} input ids but {lab.numel()} labels (must be equal, > 0)"
        )
    # The first token has no predecessor: it can never be a target (and must not become one when packed).
    targets = int((lab[1:] != IGNORE_INDEX).sum())
    if lab[0] != IGNORE_INDEX or targets != expected_targets:
        raise ContractError(
            f"prepared sample {sample_index}: labels hold {targets} predictable targets (first label "
            f"{int(lab[0])}) but num_target_tokens says {expected_targets}"
        )
    return ids, lab


class TrainBatches:
    """Deterministic, stateless split of the prepared dataset into steps, ranks and micro-batches."""

    def __init__(
        self,
        prepared: Prepared,
        cfg: TrainConfig,
        rank: int,
        world: int,
        confidence: Optional[ConfidenceReader],
        seed: int,
    ):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.needs_confidence = weighting.needs_confidence(cfg)
        if self.needs_confidence and confidence is None:
            raise ConfigError(f"weighting '{cfg.weighting}' needs the scorer's confidence, but no reader was given")
        self.prepared = prepared
        self.cfg = cfg
        self.rank = rank
        self.world = world
        self.confidence = confidence if self.needs_confidence else None
        self.seed = seed
        self.eos_token_ids = torch.tensor(sorted(prepared.manifest.eos_token_ids), dtype=torch.long)
        self.pad_token_id = prepared.manifest.pad_token_id
        self.packing = cfg.packs(on_gpu=torch.cuda.is_available())
        self._rows = prepared.dataset.select_columns(["input_ids", "labels", "num_target_tokens"])

        self._order_epoch: Optional[int] = None
        self._order: Optional[np.ndarray] = None
        self._plan_epoch: Optional[int] = None
        self._plan: list[np.ndarray] = []
        num_samples = len(prepared)
        self.micro_batch_size = cfg.micro_batch_size
        self.grad_accum = cfg.gradient_accumulation_steps
        self.per_step = cfg.micro_batches_per_step(world)
        self.global_batch = cfg.global_batch(world)  # samples per step (nominal under a token budget)
        self.token_budget = cfg.micro_batch_tokens
        if self.token_budget:
            self._lengths = [int(n) for n in prepared.dataset["num_tokens"]]
            longest = max(range(num_samples), key=self._lengths.__getitem__)
            if self._lengths[longest] > self.token_budget:
                raise ConfigError(
                    f"sample {longest} of {prepared.path} has {self._lengths[longest]} tokens, more than "
                    f"train.micro_batch_tokens={self.token_budget}; raise the budget to at least "
                    f"{self._lengths[longest]} or prepare with a lower prepare.max_length"
                )
            self._epoch_steps = [len(self.epoch_micro_batches(e)) // self.per_step for e in range(cfg.epochs)]
            unit = (f"global batch of {self.per_step} micro-batches of at most {self.token_budget} tokens "
                    f"(train.gradient_accumulation_steps {cfg.gradient_accumulation_steps} x world {world})")
        else:
            self._epoch_steps = [num_samples // (self.per_step * self.micro_batch_size)] * cfg.epochs
            unit = (f"global batch of {self.per_step * self.micro_batch_size} (train.micro_batch_size "
                    f"{cfg.micro_batch_size} x train.gradient_accumulation_steps {cfg.gradient_accumulation_steps} x "
                    f"world {world})")
        if self._epoch_steps[0] == 0:
            raise ConfigError(f"the prepared dataset {prepared.path} has {num_samples} samples, fewer than one "
                              f"{unit}; lower them")
        self.steps_per_epoch = self._epoch_steps[0]
        used = self.epoch_micro_batches(0)[: self.steps_per_epoch * self.per_step]
        dropped = num_samples - sum(len(mb) for mb in used)
        if dropped:
            log.info("%d samples per epoch fall in a last partial step and are skipped (a different subset each "
                     "epoch, drawn by train.seed)", dropped)
        self._epoch_starts = np.cumsum([0] + self._epoch_steps)
        self.total_steps = int(self._epoch_starts[-1])
        if cfg.max_steps > 0:
            self.total_steps = min(self.total_steps, cfg.max_steps)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sample indices in the order epoch ``epoch`` visits them: a function of (seed, epoch) and the shard plan.
        Epoch 0 keeps the shards in prepared order (the order the scorer writes them) and shuffles the samples
        within each one; later epochs permute all samples."""
        if self._order_epoch != epoch:
            num_samples = len(self.prepared)
            if epoch == 0:
                self._order = np.arange(num_samples)
                for shard in self.prepared.manifest.shards:
                    rng = np.random.default_rng([self.seed, 0, shard.index])
                    self._order[shard.start : shard.end] = shard.start + rng.permutation(shard.num_samples)
            else:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(num_samples)
            self._order_epoch = epoch
        return self._order

    def _token_budget_plan(self, order: np.ndarray) -> list[np.ndarray]:
        """Micro-batches of consecutive samples of ``order`` within ``train.micro_batch_tokens``: summed lengths
        when packed, samples x the longest when padded."""
        plan, start, count, longest, total = [], 0, 0, 0, 0
        for position, index in enumerate(order.tolist()):
            length = self._lengths[index]
            over = (total + length if self.packing else (count + 1) * max(longest, length)) > self.token_budget
            if count and over:
                plan.append(order[start:position])
                start, count, longest, total = position, 0, 0, 0
            count, longest, total = count + 1, max(longest, length), total + length
        if count:
            plan.append(order[start:])
        return plan

    def epoch_micro_batches(self, epoch: int) -> list[np.ndarray]:
        """Every micro-batch of epoch ``epoch`` (sample indices), in order; a step takes the next ``per_step``."""
        if self._plan_epoch != epoch:
            order = self.epoch_order(epoch)
            if self.token_budget:
                self._plan = self._token_budget_plan(order)
            else:
                size = self.micro_batch_size
                self._plan = [order[i : i + size] for i in range(0, self._epoch_steps[epoch] * self.per_step * size,
                                                                 size)]
            self._plan_epoch = epoch
        return self._plan

    def _step_micro_batches(self, step: int) -> list[np.ndarray]:
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside the run's 0..{self.total_steps - 1}")
        epoch = self.epoch_of(step)
        within = step - int(self._epoch_starts[epoch])
        return self.epoch_micro_batches(epoch)[within * self.per_step : (within + 1) * self.per_step]

    def epoch_of(self, step: int) -> int:
        """The epoch optimizer step ``step`` (0-based) belongs to."""
        return int(np.searchsorted(self._epoch_starts, step, side="right")) - 1

    def global_batch_indices(self, step: int) -> np.ndarray:
        """All ranks' samples of optimizer step ``step``."""
        return np.concatenate(self._step_micro_batches(step))

    def rank_indices(self, step: int) -> list[list[int]]:
        """This rank's micro-batches of step ``step``: a contiguous slice of the step's micro-batches, in order."""
        mine = self._step_micro_batches(step)[self.rank * self.grad_accum : (self.rank + 1) * self.grad_accum]
        return [[int(i) for i in mb] for mb in mine]

    def micro_batches(self, step: int) -> list[MicroBatch]:
        """This rank's ``gradient_accumulation_steps`` micro-batches of optimizer step ``step``."""
        return [self.build(indices) for indices in self.rank_indices(step)]

    def build(self, indices: list[int]) -> MicroBatch:
        """The micro-batch of these sample indices (padded or packed as configured)."""
        rows = self._rows[indices]
        samples = [
            _sample_tensors(i, ids, lab, int(n))
            for i, ids, lab, n in zip(indices, rows["input_ids"], rows["labels"], rows["num_target_tokens"])
        ]
        sample_lengths = torch.tensor([int(n) for n in rows["num_target_tokens"]], dtype=torch.long)
        if self.packing:
            input_ids, labels, attention_mask, position_ids = self._pack(samples)
        else:
            input_ids, labels, attention_mask, position_ids = self._pad(samples)
        target_positions, target_ids = loss.target_positions(labels)
        is_eos = torch.isin(target_ids, self.eos_token_ids)
        cu_seq_lens, max_length = None, None
        if self.packing:
            cu_seq_lens, max_length = attention.cumulative_lengths([ids.numel() for ids, _ in samples])
        inst_logprobs = None
        if self.confidence is not None:
            inst_logprobs = torch.cat([self.confidence.logprobs(i) for i in indices]).float()
        return MicroBatch(
            input_ids=input_ids,
            labels=labels,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inst_logprobs=inst_logprobs,
            is_eos=is_eos,
            sample_lengths=sample_lengths,
            sample_indices=list(indices),
            target_positions=target_positions,
            target_ids=target_ids,
            cu_seq_lens=cu_seq_lens,
            max_length=max_length,
        )

    def _pad(self, samples: list[tuple[Tensor, Tensor]]):
        """Right-pad to the longest sample of the micro-batch."""
        input_ids, attention_mask, labels = collate([ids for ids, _ in samples], [lab for _, lab in samples],
                                                    self.pad_token_id)
        length = input_ids.shape[1]
        position_ids = torch.arange(length).unsqueeze(0).expand(len(samples), -1).contiguous()
        return input_ids, labels, attention_mask, position_ids

    def _pack(self, samples: list[tuple[Tensor, Tensor]]):
        """All samples of the micro-batch back to back in one row, positions restarting at 0 per sample.

        Every sample's first label is IGNORE_INDEX (checked on read), so no target is predicted across a boundary.
        """
        input_ids = torch.cat([ids for ids, _ in samples]).unsqueeze(0)
        labels = torch.cat([lab for _, lab in samples]).unsqueeze(0)
        position_ids = torch.cat([torch.arange(ids.numel()) for ids, _ in samples]).unsqueeze(0)
        return input_ids, labels, None, position_ids


class HeldOutBatches:
    """The held-out split (``prepared/eval``) in micro-batches, dealt round-robin to the ranks. Every rank runs the
    same number of forwards (under ZeRO-3 each is a collective): a rank short of a batch repeats one and does not
    count it."""

    def __init__(self, held_out: Prepared, cfg: TrainConfig, rank: int, world: int,
                 confidence: Optional[ConfidenceReader] = None):
        size = min(cfg.micro_batch_size, len(held_out))
        build_cfg = replace(cfg, micro_batch_size=size, micro_batch_tokens=0, gradient_accumulation_steps=1, epochs=1,
                            max_steps=-1)
        self._batches = TrainBatches(held_out, build_cfg, 0, 1, confidence, seed=0)
        groups = [list(range(start, min(start + size, len(held_out)))) for start in range(0, len(held_out), size)]
        per_rank = -(-len(groups) // world)
        self._mine = [(groups[i], True) if i < len(groups) else (groups[0], False)
                      for i in range(rank, per_rank * world, world)]

    def wait_ready(self) -> bool:
        """Wait until the held-out split's confidence shards are all finished (at once without a confidence reader);
        False when a stop was requested meanwhile, so the evaluation that follows never waits inside a forward."""
        reader = self._batches.confidence
        if reader is None:
            return True
        try:
            reader.wait_all()
        except StopWhileWaiting:
            return False
        return True

    def __iter__(self):
        """(micro-batch, counts) pairs; ``counts`` is False for a rank's padding forward."""
        for indices, counts in self._mine:
            yield self._batches.build(indices), counts
