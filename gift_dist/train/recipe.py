"""`gift-dist train`: LoRA on the base model with DeepSpeed (base replicated, or ZeRO-3) and the weighted loss.

The recipe, top-down::

    pair check, output folders writable, prepared data (+ the scorer's confidence shards, streamed)
        ->  TrainBatches: this rank's micro-batches
    for each step:
        weights w_t = f(p_inst)  (constants)      ->  Z = sum of w over the global batch (one all-reduce)
        for each micro-batch: decoder -> hidden   ->  chunked CE through lm_head  ->  sum w CE * GA * ranks / Z
        DeepSpeed averages the gradients over micro-batches and ranks, clips, steps the optimizer and LR schedule
        metrics summed on the device, read once per step (with the stop flag)
        every eval_every_steps: held-out CE and weighted CE
        every save_every_steps (and on SIGTERM/SIGINT): an atomic checkpoint
    gather the LoRA's fp32 masters from the ranks -> PEFT adapter dir (cfg.paths.adapter)

Run it inside a launched job (``deepspeed`` launcher, ``torchrun``) or as a single process.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from gift_dist import dist
from gift_dist.config import (
    RunConfig,
    TrainConfig,
    add_config_arguments,
    config_from_args,
    config_to_dict,
    result_settings as config_result_settings,
)
from gift_dist.contracts import ContractError, require_writable
from gift_dist.contracts import confidence as conf_contract
from gift_dist.contracts.adapter import AdapterProvenance
from gift_dist.contracts.checkpoint import LATEST_NAME, RECORD_NAME, CheckpointRecord, read_checkpoint_record
from gift_dist.contracts.model_folder import model_identity, require_model
from gift_dist.contracts.prepared import load_eval_split, load_prepared
from gift_dist.models.pair import check_pair
from gift_dist.models.prepared_inputs import check_prepared_inputs
from gift_dist.train import adapter_io, weighting
from gift_dist.train.checkpointing import Checkpoints
from gift_dist.train.data import (
    DATA_ORDER,
    ConfidenceReader,
    HeldOutBatches,
    MicroBatch,
    StopWhileWaiting,
    TrainBatches,
)
from gift_dist.train.engine import TrainEngine, build_engine, check_liger_kernels, training_model_path
from gift_dist.train.loss import micro_batch_loss, normalizer_local, weighted_ce_sum
from gift_dist.train.metrics import MetricsLogger, check_trackers, open_trackers

log = logging.getLogger(__name__)



def mark_preempted(step: int, checkpoint: Optional[Path]) -> None:
    """Each node's local rank 0 writes the marker named by $GIFT_PREEMPT_MARKER (if set) once the checkpoint is
    saved."""
    marker = os.environ.get(dist.PREEMPT_MARKER_ENV)
    if marker and dist.env_local_rank() == 0:
        Path(marker).parent.mkdir(parents=True, exist_ok=True)
        Path(marker).write_text(f"step {step} checkpoint {checkpoint}\n")


@dataclass
class TrainResult:
    adapter: Optional[Path]  # None when the run was preempted before finishing
    steps: int  # optimizer steps done, resumed ones included
    total_steps: int
    final_loss: Optional[float]  # None when no step ran (resumed from a checkpoint of the last step)
    preempted: bool
    checkpoint: Optional[Path]


class StopRequest:
    """SIGTERM/SIGINT set a flag; ranks agree on it at step boundaries, so all of them save and stop together."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        log.warning("rank %d received %s: will save a checkpoint and stop after this step (at once when waiting "
                    "for the scorer)", dist.rank(), self.signal_name)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class ChosenCheckpoint(Checkpoints):
    """The checkpoint folder named by ``train --resume PATH``, resumed as the latest one would be (same checks);
    new checkpoints still go to the run's own checkpoints folder."""

    def __init__(self, path: str | Path):
        folder = Path(path).absolute()
        if not (folder / RECORD_NAME).is_file():
            hint = (f"; {folder / LATEST_NAME} names {(folder / LATEST_NAME).read_text().strip()}, use "
                    f"{folder / (folder / LATEST_NAME).read_text().strip()}" if (folder / LATEST_NAME).is_file()
                    else "")
            raise ContractError(f"--resume {path}: not a checkpoint folder (no {RECORD_NAME} in {folder}); a run's "
                                f"checkpoints are <output_dir>/checkpoints/step-NNNNNNNN{hint}")
        super().__init__(folder.parent, keep=1)
        self.folder = folder

    def latest(self) -> Optional[tuple[Path, CheckpointRecord]]:
        return self.folder, read_checkpoint_record(self.folder / RECORD_NAME)


def train(cfg: RunConfig, resume: bool | str | Path = False, resume_if_exists: bool = False,
          grad_dump_dir: Optional[str | Path] = None, resume_anyway: bool = False) -> TrainResult:
    """Train the LoRA and write the adapter; ``grad_dump_dir`` saves each step's full LoRA gradients (debugging).
    ``resume``: True for the latest checkpoint, or a checkpoint folder (``train --resume PATH``).
    ``resume_anyway``: resume although max_steps/epochs changed since the checkpoint."""
    if not isinstance(resume, bool):
        ChosenCheckpoint(resume)  # a wrong path is refused before any model is loaded
    weighting.validate(cfg.train)
    check_liger_kernels(cfg.train)
    check_trackers(cfg.train)
    for folder in (cfg.paths.checkpoints, cfg.paths.logs, cfg.paths.adapter.parent):
        require_writable(folder, "the training output directory")
    if cfg.base_model and cfg.instruct_model:
        # The adapter is merged into the instruct model: a base it does not pair with is refused before any work.
        check_pair(cfg.base_model, cfg.instruct_model, cfg.trust_remote_code)
    if training_model_path(cfg):
        require_model(training_model_path(cfg), f"the {cfg.train.train_model} model to train")
    set_single_process_env()
    dist.init(use_deepspeed=True)
    # One trainer per run folder: rank 0 holds the lock, its refusal reaches every rank (no collective left hanging).
    with dist.rank0_stage_lock(cfg.paths.root, "train"):
        return _train(cfg, resume, resume_if_exists, grad_dump_dir, resume_anyway)


def _train(cfg: RunConfig, resume: bool | str | Path, resume_if_exists: bool,
           grad_dump_dir: Optional[str | Path], resume_anyway: bool) -> TrainResult:
    rank, world = dist.rank(), dist.world_size()
    # Installed once the engine is built; read meanwhile by the waits for the scorer's shards.
    stop = StopRequest()
    prepared = load_prepared(cfg.paths.prepared)
    check_prepared_inputs(cfg, prepared.manifest, str(cfg.paths.prepared))
    fingerprint = prepared.manifest.fingerprint
    confidence = instruct_identity = None
    if weighting.needs_confidence(cfg.train):
        instruct_identity = model_identity(cfg.instruct_model)
        confidence = ConfidenceReader(cfg.paths.confidence, prepared, cfg.train.confidence_wait_seconds,
                                      cfg.train.confidence_poll_seconds, instruct_identity=instruct_identity,
                                      stop=lambda: stop.requested)
    batches = TrainBatches(prepared, cfg.train, rank, world, confidence, seed=cfg.train.seed)
    te = build_engine(cfg, world, batches.total_steps)
    identity = model_identity(te.model_path)
    record = CheckpointRecord(
        step=0, world_size=world, global_batch_size=cfg.train.global_batch(world), model_identity=identity,
        prepared_fingerprint=fingerprint, train_model=cfg.train.train_model,
        train_settings=adapter_result_settings(cfg.train),
    )
    checkpoints = Checkpoints(cfg.paths.checkpoints, cfg.train.keep_checkpoints)
    start_step, resumed_from = 0, checkpoints
    if not isinstance(resume, bool):
        resumed_from = ChosenCheckpoint(resume)
        start_step = resumed_from.resume(te.engine, te.peft_model, record, anyway=resume_anyway)
    elif resume or resume_anyway or (resume_if_exists and checkpoints.latest() is not None):
        start_step = checkpoints.resume(te.engine, te.peft_model, record, anyway=resume_anyway)
    metrics = MetricsLogger(cfg.paths.logs, batches.total_steps, start_step, enabled=dist.is_rank0(),
                            progress=cfg.train.progress, log_every=cfg.train.log_every_steps,
                            trackers=open_trackers(cfg) if dist.is_rank0() else [])
    stop.install()
    dist.stop_when_launcher_exits()
    log.info("training %s (%s weighting) for steps %d..%d on %d rank(s), global batch %d samples",
             te.model_path, cfg.train.weighting, start_step + 1, batches.total_steps, world,
             record.global_batch_size)
    held_out = load_eval_split(cfg.paths.prepared)
    held_out_batches = held_out_confidence = None
    if held_out is not None:
        if confidence is not None:
            # The scorer scores the held-out split too (confidence/eval), after the training split.
            held_out_confidence = ConfidenceReader(cfg.paths.confidence / conf_contract.EVAL_DIR, held_out,
                                                   cfg.train.confidence_wait_seconds,
                                                   cfg.train.confidence_poll_seconds,
                                                   instruct_identity=instruct_identity, stop=lambda: stop.requested)
        held_out_batches = HeldOutBatches(held_out, cfg.train, rank, world, held_out_confidence)
    step, final_loss, checkpoint, saved_step = start_step, None, None, None

    def preempted(waiting: bool) -> TrainResult:
        """Save what there is to save (nothing when no step ran here, or this step is saved already) and stop."""
        nonlocal checkpoint
        if step > start_step and saved_step != step:
            checkpoint = save_checkpoint(te, checkpoints, record, step, cfg)
        elif step == start_step:
            latest = resumed_from.latest() if start_step else None
            checkpoint = latest[0] if latest is not None else None
        by = stop.signal_name or "a signal on another rank"
        where = " while waiting for the scorer's confidence shards" if waiting else ""
        saved = (f"saved checkpoint {checkpoint} at step {step}/{batches.total_steps}; rerun with --resume to "
                 f"continue" if checkpoint is not None else "no step had run, nothing to save; rerun to start")
        log.warning("preempted by %s%s: %s", by, where, saved)
        mark_preempted(step, checkpoint)
        return TrainResult(None, step, batches.total_steps, final_loss, True, checkpoint)

    try:
        while step < batches.total_steps:
            try:
                micro_batches, stopped = batches.micro_batches(step), False
            except StopWhileWaiting:
                micro_batches, stopped = None, True
            if confidence is not None and world > 1 and batches.epoch_of(step) == 0:
                # Ranks may wait for different shards: all leave the wait together (epoch 0 is where it waits).
                stopped = dist.any_rank(stopped, te.device)
            if stopped:
                return preempted(waiting=True)
            values = train_step(te, cfg, micro_batches, world, grad_dump_dir, step + 1,
                                stop_requested=stop.requested)
            step += 1
            stopping = values.pop("stop")
            final_loss = values["loss"]
            every = cfg.train.eval_every_steps
            if held_out_batches is not None and (step == batches.total_steps or (every and step % every == 0)):
                # Every rank waits for all held-out shards first, so no rank waits inside the evaluation's forwards.
                stopped = not held_out_batches.wait_ready()
                if world > 1 and held_out_confidence is not None:
                    stopped = dist.any_rank(stopped, te.device)
                if not stopped:
                    values.update(evaluate(te, cfg, held_out_batches, world))
            metrics.log(step, values)
            if not (stopping or stopped) and step % cfg.train.save_every_steps == 0:
                checkpoint, saved_step = save_checkpoint(te, checkpoints, record, step, cfg), step
            if stopping or stopped:
                return preempted(waiting=stopped)
    finally:
        stop.uninstall()
        metrics.close(summary=confidence_summary(cfg) if dist.is_rank0() else None)
    adapter = adapter_io.save_adapter(te.peft_model, te.peft_config, cfg.paths.adapter,
                                      provenance(cfg, identity, fingerprint, step, world, complete=True))
    log.info("wrote adapter %s after %d steps", adapter, step)
    return TrainResult(Path(adapter), step, batches.total_steps, final_loss, False, checkpoint)


def confidence_summary(cfg: RunConfig) -> Optional[dict]:
    """The scorer's totals (mean confidence, share below 0.1, tokens) for the trackers, when scoring is done."""
    if not weighting.needs_confidence(cfg.train):
        return None
    try:
        data = conf_contract.read_summary(cfg.paths.confidence)
    except (OSError, ContractError) as exc:
        log.warning("cannot read the confidence summary for the trackers: %s", exc)
        return None
    return None if data is None else {f"confidence/{key}": data[key] for key in conf_contract.SUMMARY_KEYS}


def adapter_result_settings(train: TrainConfig) -> dict:
    """The train settings that shape the trained adapter (``config.result_settings``: all but those marked
    operational, the same list `run` compares), and the scheme that draws the data order from the seed
    (``data.DATA_ORDER``)."""
    return {**config_result_settings(TrainConfig, train), "data_order": DATA_ORDER}


def set_single_process_env() -> None:
    """Started without a launcher: describe a one-rank job, as torchrun would, so DeepSpeed can initialise."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)


# The step's totals, in the order of the one tensor that carries them to the host: summed on the device per
# micro-batch (the loss objective, sum w CE, sum CE, sum w), then counted on the host (target and real tokens, the
# stop flag), all summed over ranks by one all-reduce.
DEVICE_SUMS = ("objective", "weighted_ce", "ce", "weight")
STEP_TOTALS = DEVICE_SUMS + ("targets", "tokens", "stop")


def train_step(te: TrainEngine, cfg: RunConfig, micro_batches: list[MicroBatch], world: int,
               grad_dump_dir: Optional[str | Path], step: int, stop_requested: bool = False) -> dict:
    """One optimizer step over this rank's micro-batches; returns the step's metrics (summed over ranks) and
    ``stop``, true on every rank when any rank was asked to stop.

    The device is read back once, at the end: the metrics are summed on the device, the stop flag rides in the
    same all-reduce, the targets' positions come with the batch. A host sync per micro-batch would stall the GPU
    behind the CPU's launch queue, which on a small model is most of the step.
    """
    train = cfg.train
    started = time.monotonic()
    device = te.device
    # Dropout masks depend only on (seed, step, rank), so a resumed run draws the same ones.
    torch.manual_seed(train.seed + 1_000_003 * step + dist.rank())
    grad_accum = len(micro_batches)
    own_weights = weighting.needs_own_logprobs(train)
    # Constant weights are computed and checked on the host, from the batch; DFT's need the forward.
    weights = [None if own_weights else batch_weights(train, mb) for mb in micro_batches]
    global_norm = None
    if train.normalize_over == "global_batch":
        # Weights are constants, so the normaliser of the whole global batch is known before any forward.
        local = sum(normalizer_local(train, w if w is not None else torch.ones(mb.num_target_tokens))
                    for w, mb in zip(weights, micro_batches))
        global_norm = torch.as_tensor(local, dtype=torch.float32).reshape(())
        if world > 1:
            # On the accelerator (NCCL reduces device tensors only); not read back.
            global_norm = dist.all_reduce_sum(global_norm.to(device, torch.float64)).float()
    sums = torch.zeros(len(DEVICE_SUMS), dtype=torch.float64, device=device)
    targets = tokens = 0
    for host_mb, w in zip(micro_batches, weights):
        mb = host_mb.to(device)
        ce = te.target_token_ce(mb)
        w = weights_on_device(train, w, ce, mb, host_mb)
        weighted = weighted_ce_sum(ce, w)
        loss = micro_batch_loss(train, weighted, normalizer_local(train, w), global_norm, grad_accum, world)
        te.backward(loss)
        sums += torch.stack([loss.detach() / (grad_accum * world), weighted.detach(), ce.detach().sum(),
                             w.sum()]).double()
        targets += host_mb.num_target_tokens
        tokens += host_mb.num_tokens
        if grad_dump_dir is not None and te.at_accumulation_boundary():
            dump_gradients(te, Path(grad_dump_dir), step)
        te.step()
    reduced = torch.cat([sums, torch.tensor([targets, tokens, float(stop_requested)], dtype=torch.float64,
                                            device=device)])
    if world > 1:
        reduced = dist.all_reduce_sum(reduced)
    norm = te.grad_norm()
    if isinstance(norm, torch.Tensor):  # read with the rest, not on its own
        reduced = torch.cat([reduced, norm.detach().reshape(1).to(reduced)])
    # The one host read of the step.
    values = reduced.tolist()
    t = dict(zip(STEP_TOTALS, values))
    norm = values[len(STEP_TOTALS)] if len(values) > len(STEP_TOTALS) else (None if norm is None else float(norm))
    seconds = time.monotonic() - started
    if not math.isfinite(t["objective"]):
        raise FloatingPointError(
            f"step {step}: the loss is {t['objective']} (weighted CE {t['weighted_ce']}, CE {t['ce']}); training "
            f"diverged. Lower train.learning_rate or resume from an earlier checkpoint"
        )
    if train.normalize_over == "global_batch" and train.normalizer == "sum_weights" and t["weight"] <= 0:
        raise ValueError(f"step {step}: the global batch's normaliser is {t['weight']}: it holds no weighted target")
    return {
        "loss": t["objective"],
        "weighted_ce": t["weighted_ce"] / max(t["weight"], 1e-12),
        "ce": t["ce"] / max(t["targets"], 1.0),
        "mean_weight": t["weight"] / max(t["targets"], 1.0),
        "lr": te.learning_rate(),
        "grad_norm": norm,
        "target_tokens": int(t["targets"]),
        "tokens_per_second": t["tokens"] / max(seconds, 1e-9),
        "seconds": seconds,
        "stop": t["stop"] > 0,
    }


def evaluate(te: TrainEngine, cfg: RunConfig, held_out: HeldOutBatches, world: int) -> dict:
    """The held-out split's CE and weighted CE (the training weighting's sum w CE / sum w, with the instruct
    model's confidence of the held-out split from confidence/eval) under the current weights; every rank
    evaluates its share, one all-reduce, one host read."""
    train = cfg.train
    own_weights = weighting.needs_own_logprobs(train)
    sums = torch.zeros(4, dtype=torch.float64, device=te.device)
    with te.evaluating(), torch.no_grad():
        for mb, counts in held_out:
            on_device = mb.to(te.device)
            ce = te.target_token_ce(on_device)
            w = weights_on_device(train, None if own_weights else batch_weights(train, mb), ce, on_device, mb)
            if counts:
                sums += torch.stack([ce.sum(), torch.tensor(float(ce.numel()), device=te.device),
                                     weighted_ce_sum(ce, w), w.sum()]).double()
    if world > 1:
        sums = dist.all_reduce_sum(sums)
    ce_sum, targets, weighted_sum, weight_sum = sums.tolist()
    return {"eval_ce": ce_sum / max(targets, 1.0), "eval_weighted_ce": weighted_sum / max(weight_sum, 1e-12),
            "eval_target_tokens": int(targets)}


def weights_on_device(train, constant: Optional[torch.Tensor], ce: torch.Tensor, mb: MicroBatch,
                      host_mb: MicroBatch) -> torch.Tensor:
    """A micro-batch's weights on the device of its CE: the constant ones (``batch_weights``, computed on the
    host before the forward), or, for DFT (``constant`` None), the model's own detached probability from ``ce``."""
    if constant is None:
        constant = weighting.token_weights(train, None, -ce.detach(), mb.is_eos, host_mb.sample_lengths)
    return constant.to(ce.device, non_blocking=True)


def batch_weights(train, mb: MicroBatch) -> torch.Tensor:
    """The constant per-token weights of a micro-batch (everything but DFT, whose weights need the forward)."""
    try:
        return weighting.token_weights(train, mb.inst_logprobs, None, mb.is_eos, mb.sample_lengths)
    except ValueError as exc:
        raise ContractError(f"invalid token weights for samples {mb.sample_indices}: {exc}") from exc


def dump_gradients(te: TrainEngine, folder: Path, step: int) -> None:
    """Save the full (gathered) LoRA gradients of this step before the optimizer uses them: a debugging aid
    that makes "2 ranks x GA 1 == 1 rank x GA 2" checkable. Collective: every rank gathers, rank 0 writes."""
    from deepspeed.utils import safe_get_full_grad
    from safetensors.torch import save_file

    grads = {}
    for name, param in te.lora_parameters:
        grad = safe_get_full_grad(param)
        if grad is None:
            raise RuntimeError(f"rank {dist.rank()}: no gradient for LoRA parameter {name} at step {step}")
        grads[name] = grad.detach().float().cpu().clone()

    def write() -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(grads, str(folder / f"grads-step-{step:06d}.safetensors"))

    dist.rank0_call(write)


def provenance(cfg: RunConfig, identity: dict, fingerprint: str, step: int, world: int,
               complete: bool) -> AdapterProvenance:
    """What the adapter records about how it was made (merge and the pipeline read it)."""
    train = config_to_dict(cfg.train)
    return AdapterProvenance(
        train_model=cfg.train.train_model,
        model_identity=identity,
        base_model=model_identity(cfg.base_model) if cfg.train.train_model == "instruct" else identity,
        instruct_model=model_identity(cfg.instruct_model) if cfg.instruct_model else None,
        prepared_fingerprint=fingerprint,
        weighting={key: train[key] for key in ("weighting", "gamma", "prob_floor", "weight_min", "weight_max",
                                               "eos_weight", "normalizer", "normalize_over")},
        lora=train["lora"],
        train_config=train,
        steps=step,
        world_size=world,
        global_batch_size=cfg.train.global_batch(world),
        complete=complete,
        # build_ds_config makes the ds_config agree with this setting (or refuses to start).
        quantized_frozen_weights=cfg.train.quantized_frozen_weights,
        quantize_base=cfg.train.quantize_base,
    )


def save_checkpoint(te: TrainEngine, checkpoints: Checkpoints, record: CheckpointRecord, step: int,
                    cfg: RunConfig) -> Path:
    at_step = replace(record, step=step)
    return checkpoints.save(
        te.engine, te.peft_model, te.peft_config, at_step,
        provenance(cfg, record.model_identity, record.prepared_fingerprint, step, record.world_size,
                   complete=False),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, sections=("train",))
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                       help="continue from the latest checkpoint in <output_dir>/checkpoints (an error if none), or "
                            "from the checkpoint folder CHECKPOINT (e.g. <output_dir>/checkpoints/step-00000400)")
    group.add_argument("--resume-if-exists", action="store_true",
                       help="continue from the latest checkpoint when there is one, else start fresh")
    group.add_argument("--resume-anyway", action="store_true",
                       help="like --resume, also when train.max_steps or train.epochs changed since the checkpoint")
    parser.add_argument("--dump-grads", metavar="DIR",
                        help="debugging: save each step's full LoRA gradients to DIR as safetensors")


def resume_argument(args: argparse.Namespace) -> bool | str:
    """``--resume`` alone (True) or its checkpoint folder; a ``section.key=value`` override written right after a
    bare ``--resume`` is an override, not a folder."""
    value = args.resume
    if isinstance(value, str) and "=" in value and not Path(value).exists():
        args.overrides = [value, *(args.overrides or [])]
        return True
    return value


def run(args: argparse.Namespace) -> int:
    args.resume = resume_argument(args)
    result = train(config_from_args(args), resume=args.resume, resume_if_exists=args.resume_if_exists,
                   grad_dump_dir=args.dump_grads, resume_anyway=args.resume_anyway)
    dist.shutdown()
    if result.preempted:
        if dist.is_rank0():
            saved = (f"checkpoint {result.checkpoint}; rerun with --resume to continue" if result.checkpoint
                     else "no step had run, nothing to save; rerun to start")
            print(f"gift-dist train: PREEMPTED at step {result.steps}/{result.total_steps}; {saved}")
        return dist.PREEMPTED_EXIT_CODE
    if dist.is_rank0():
        if result.final_loss is None:
            # Resumed from a checkpoint of the last step: no step ran, the adapter was written from it.
            print(f"gift-dist train: already complete at step {result.steps}/{result.total_steps}, nothing to "
                  f"train; adapter {result.adapter}")
        else:
            print(f"gift-dist train: done, {result.steps} steps, final loss {result.final_loss:.4f}, adapter "
                  f"{result.adapter}")
    return 0
