"""`gift-dist score`: the instruct model's log p(y_t | x, y<t) for every target token, as confidence shards.

Reads like the algorithm:
  1. check the base/instruct pair, open the prepared dataset, create or check confidence/manifest.json;
  2. load one scoring replica (bf16 on its GPU subset, fp32 on CPU) with the fastest attention available;
  3. until every shard is finished: claim the lowest unfinished, unleased shard; score it in length-bucketed
     batches (refreshing the lease after each batch); write it atomically and record it in the manifest;
  4. write summary.json and the confidence histogram from all finished shards.

Any number of workers can run this at once against one output directory: under torchrun / the deepspeed
launcher, or as independent jobs; workers coordinate only through lease files. A worker is one replica of the
instruct model: one process on one GPU (``score.parallel: replica``), k processes on k GPUs of a node holding one
tensor-parallel copy (``tensor``: the only process group scoring creates is each replica's own, and its rank 0
claims and writes), or one process over k GPUs with the layers spread by ``device_map`` (``pipeline``).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Optional

import torch

from gift_dist import dist
from gift_dist.config import RunConfig, ScoreConfig, add_config_arguments, config_from_args, require
from gift_dist.contracts import ContractError, first_non_finite, require_writable
from gift_dist.contracts import confidence as contract
from gift_dist.contracts.model_folder import model_identity
from gift_dist.contracts.prepared import IGNORE_INDEX, Prepared, ShardSpec, load_eval_split, load_prepared
from gift_dist.models.batch import choose_attention, collate
from gift_dist.models.pair import check_pair, load_model_config, load_tokenizer
from gift_dist.models.prepared_inputs import check_prepared_inputs
from gift_dist.score.logprobs import length_batches, score_batch
from gift_dist.score.parallel import Replica, VocabSlice, join_replica, resolve_parallel, vocab_slice
from gift_dist.score.pool import LeaseLost, ShardLease, ShardPool, worker_id
from gift_dist.score.report import ScoreSummary, summarize, write_confidence_report, write_token_view

log = logging.getLogger(__name__)
# How long a worker waits for another one's short hold of the run folder's score lock (dist.stage_lock).
SCORE_LOCK_WAIT_SECONDS = 300.0


class NonFiniteLogprob(ContractError):
    """The instruct model produced NaN/inf for a target token (broken weights or an fp16 overflow)."""


def choose_devices(score_cfg: ScoreConfig, parallel: str) -> list[int]:
    """The GPUs of this process: one (LOCAL_RANK) for ``replica`` and ``tensor``; for ``pipeline`` LOCAL_RANK r
    uses [r*k, (r+1)*k) with k = gpus_per_replica. [] on CPU."""
    if not torch.cuda.is_available():
        return []
    k = score_cfg.gpus_per_replica if parallel == "pipeline" else 1
    local_rank = dist.env_local_rank()
    devices = list(range(local_rank * k, (local_rank + 1) * k))
    if devices[-1] >= torch.cuda.device_count():
        per_node = "one process per GPU" if k == 1 else f"(GPUs per node) / {k} processes per node"
        raise ContractError(
            f"scoring worker LOCAL_RANK={local_rank} needs GPUs {devices} (score.parallel={parallel}, "
            f"score.gpus_per_replica={score_cfg.gpus_per_replica}) but only {torch.cuda.device_count()} are "
            f"visible; launch {per_node}"
        )
    return devices


def load_scoring_model(cfg: RunConfig, parallel: str = "replica", replica: Optional[Replica] = None):
    """This process's part of one scoring replica, in eval mode: bf16 on GPUs, fp32 on CPU. ``tensor``: this
    rank's slice of every layer (transformers' tensor-parallel plan over the replica's ranks)."""
    from transformers import AutoModelForCausalLM

    devices = choose_devices(cfg.score, parallel)
    kwargs: dict = {
        "dtype": torch.bfloat16 if devices else torch.float32,
        "attn_implementation": choose_attention(cfg.score.attn_implementation, bool(devices)),
        "trust_remote_code": cfg.trust_remote_code,
    }
    if parallel == "tensor":  # over the whole default group, which is this replica (parallel.join_replica)
        kwargs["tp_plan"] = "auto"
        kwargs["tp_size"] = replica.size
    elif len(devices) == 1:
        kwargs["device_map"] = {"": devices[0]}
    elif devices:
        # device_map="auto" restricted to this replica's GPUs: accelerate only places layers where max_memory allows.
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = {
            i: (torch.cuda.get_device_properties(i).total_memory if i in devices else 0)
            for i in range(torch.cuda.device_count())
        }
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.instruct_model, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise ContractError(f"cannot load the instruct model {cfg.instruct_model} for scoring: {exc}") from exc
    model.eval()
    input_device = torch.device(f"cuda:{devices[0]}") if devices else torch.device("cpu")
    return model, input_device


def open_confidence_dir(cfg: RunConfig, prepared: Prepared, instruct_identity: dict,
                        conf_dir: Optional[Path] = None) -> contract.ConfidenceManifest:
    """Create confidence/manifest.json, or refuse one made for other data, another model or another dtype."""
    conf_dir = conf_dir or cfg.paths.confidence
    template = contract.ConfidenceManifest(
        prepared_fingerprint=prepared.manifest.fingerprint,
        instruct_model=instruct_identity,
        logprob_dtype=cfg.score.logprob_dtype,
        num_shards=len(prepared.manifest.shards),
        record_entropy=cfg.score.record_entropy,
    )
    manifest = contract.init_manifest(conf_dir, template)
    if manifest.record_entropy != template.record_entropy:
        raise ContractError(
            f"{conf_dir} was started with score.record_entropy={manifest.record_entropy}; this job asks "
            f"for {template.record_entropy}. Use the same setting or a fresh directory."
        )
    return manifest


def check_scores_finite(values: torch.Tensor, counts: list[int], sample_indices: list[int], shard: int,
                        what: str) -> None:
    """Fail naming the sample and target position of the first NaN/inf value of a batch."""
    bad = first_non_finite(values)
    if bad is None:
        return
    position = bad[0]
    value = float(values[position])
    for sample, count in zip(sample_indices, counts):
        if position < count:
            raise NonFiniteLogprob(
                f"shard {shard}: non-finite {what} ({value}) for prepared sample {sample} at target position "
                f"{position}; the instruct model's output is broken for this input"
            )
        position -= count


class Progress:
    """This worker's tqdm bar: samples of the whole dataset (finished shards included) and target tokens/s."""

    def __init__(self, total: int, done: int, worker: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=done, unit="sample", desc=f"score {worker}",
                        position=dist.env_local_rank(), dynamic_ncols=True)
        self.tokens = 0
        self.started = time.perf_counter()

    def advance(self, samples: int, tokens: int) -> None:
        self.tokens += tokens
        self.bar.update(samples)
        self.bar.set_postfix(tok_s=f"{self.tokens / max(time.perf_counter() - self.started, 1e-9):.0f}")

    def close(self) -> None:
        self.bar.close()


def score_shard(
    model, input_device, prepared: Prepared, spec: ShardSpec, cfg: ScoreConfig, lease: Optional[ShardLease],
    progress: Optional[Progress], replica: Optional[Replica] = None, vocab_part: Optional[VocabSlice] = None,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Offsets, logprobs (and entropy) of one shard, in sample-index order whatever the batching.

    Every rank of a tensor-parallel replica runs this with the same shard; only the leader holds the ``lease``,
    and its refresh after each batch (or the LeaseLost it raises) reaches every rank."""
    replica = replica or Replica()
    rows = prepared.dataset.select(range(spec.start, spec.end))
    input_ids, labels = rows["input_ids"], rows["labels"]
    expected = rows["num_target_tokens"]
    per_sample: list[Optional[torch.Tensor]] = [None] * spec.num_samples
    per_sample_entropy: list[Optional[torch.Tensor]] = [None] * spec.num_samples
    for batch in length_batches([len(r) for r in input_ids], cfg.max_batch_tokens, cfg.max_batch_size):
        started = time.perf_counter()
        ids, mask, lab = collate([input_ids[i] for i in batch], [labels[i] for i in batch],
                                 prepared.manifest.pad_token_id, input_device)
        scores = score_batch(model, ids, mask, lab, cfg.logprob_chunk_tokens, cfg.record_entropy, vocab_part)
        samples = [spec.start + i for i in batch]
        check_scores_finite(scores.logprobs, scores.counts, samples, spec.index, "logprob")
        if scores.entropy is not None:
            check_scores_finite(scores.entropy, scores.counts, samples, spec.index, "entropy")
        logprob_parts = scores.logprobs.split(scores.counts)
        entropy_parts = scores.entropy.split(scores.counts) if scores.entropy is not None else [None] * len(batch)
        for local, values, ent in zip(batch, logprob_parts, entropy_parts):
            if values.numel() != expected[local]:
                starts_with_target = bool(labels[local]) and labels[local][0] != IGNORE_INDEX
                why = " (its first token is a target, which no position predicts)" if starts_with_target else ""
                raise ContractError(
                    f"prepared sample {spec.start + local} has {expected[local]} target tokens but {values.numel()} "
                    f"were scored{why}"
                )
            per_sample[local], per_sample_entropy[local] = values, ent
        if cfg.throttle_seconds > 0:
            time.sleep(max(0.0, cfg.throttle_seconds - (time.perf_counter() - started)))
        replica.lead(lambda: lease.refresh())
        if progress is not None:
            progress.advance(len(batch), int(sum(scores.counts)))
    counts = torch.tensor([0] + [v.numel() for v in per_sample], dtype=torch.int64)
    offsets = counts.cumsum(0)
    logprobs = torch.cat(per_sample) if per_sample else torch.empty(0)
    entropy = torch.cat(per_sample_entropy) if cfg.record_entropy else None
    return offsets, logprobs, entropy


def score(cfg: RunConfig, rescore_corrupt: bool = False) -> ScoreSummary:
    """Score every prepared sample (as one worker among any number); returns when all shards are finished.

    The training split goes to ``confidence/``; a held-out split (``prepared/eval``), when prepare made one, to
    ``confidence/eval/`` under the same contract, so the trainer can report its held-out loss with the very
    weights it trains with. ``rescore_corrupt``: first verify every finished shard and score again those that fail
    (a flipped byte, a deleted file), instead of refusing the folder."""
    require(cfg, "instruct_model")
    require_writable(cfg.paths.confidence, "the confidence directory")
    if cfg.base_model:
        check_pair(cfg.base_model, cfg.instruct_model, cfg.trust_remote_code)
    identity = model_identity(cfg.instruct_model)
    prepared = load_prepared(cfg.paths.prepared)
    check_prepared_inputs(cfg, prepared.manifest, str(cfg.paths.prepared))
    held_out = load_eval_split(cfg.paths.prepared)
    scorer = _Scorer(cfg)
    if rescore_corrupt:
        scorer.replica.lead(scorer.locked, forget_corrupt_shards, cfg.paths.confidence, prepared)
        if held_out is not None:
            scorer.replica.lead(scorer.locked, forget_corrupt_shards, cfg.paths.confidence / contract.EVAL_DIR,
                                held_out)
    summary = scorer.score_split(prepared, cfg.paths.confidence, identity)
    if summary.complete:
        scorer.replica.lead(scorer.locked, _write_token_view, cfg, prepared)
    if held_out is not None:
        scorer.score_split(held_out, cfg.paths.confidence / contract.EVAL_DIR, identity)
    return summary


def _write_token_view(cfg: RunConfig, prepared: Prepared) -> None:
    try:
        write_token_view(cfg.paths.confidence, contract.read_manifest(cfg.paths.confidence), prepared,
                         load_tokenizer(cfg.instruct_model, cfg.trust_remote_code), train=cfg.train)
    except OSError as exc:
        raise ContractError(f"cannot write the token view into {cfg.paths.confidence}: {exc}") from exc


def forget_corrupt_shards(conf_dir: Path, prepared: Prepared) -> None:
    """Verify the finished shards of ``conf_dir`` and take those that fail out of the manifest (logged, with why),
    so this run scores them again. Nothing to do before the first shard exists."""
    from gift_dist.score.verify import verify_confidence

    if contract.read_manifest(conf_dir) is None:
        return
    report = verify_confidence(conf_dir, prepared.path, prepared)
    for problem in report.problems:
        log.warning("--rescore-corrupt: %s", problem)
    if report.bad_shards:
        contract.forget_shards(conf_dir, report.bad_shards)
        log.warning("--rescore-corrupt: shards %s of %s will be scored again", report.bad_shards, conf_dir)


class _Scorer:
    """One worker, i.e. one replica: the model is loaded once, on the first shard it gets, and scores every split
    it is given. In a tensor-parallel replica every rank runs this loop; the leader decides (finished, wait,
    which shard) and ``Replica.lead`` hands each decision to the others, so they run the same batches."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.parallel = resolve_parallel(cfg.score, load_model_config(cfg.instruct_model, cfg.trust_remote_code))
        self.replica = join_replica(cfg.score, self.parallel)
        self.model = self.input_device = self.vocab_part = None
        self.lease: Optional[ShardLease] = None

    def locked(self, fn, *args):
        """``fn(*args)`` under the run folder's score lock: the writes no shard lease covers (forgetting corrupt
        shards, the summary and the reports) are made by one worker at a time; the others wait their turn (workers
        on one folder are intended, so the lock is held only for these writes)."""
        with dist.stage_lock(self.cfg.paths.root, "score", wait_seconds=SCORE_LOCK_WAIT_SECONDS):
            return fn(*args)

    def _load(self) -> None:
        if self.model is not None:
            return
        self.model, self.input_device = load_scoring_model(self.cfg, self.parallel, self.replica)
        if self.parallel == "tensor":
            self.vocab_part = vocab_slice(self.model, self.replica)

    def _open(self, prepared: Prepared, conf_dir: Path, identity: dict) -> ShardPool:
        """Leader: create or check the manifest, set up the lease pool."""
        open_confidence_dir(self.cfg, prepared, identity, conf_dir)
        try:
            pool = ShardPool(conf_dir, len(prepared.manifest.shards), self.cfg.score.lease_seconds,
                             worker=self.worker_name())
            pool.remove_stale_temporaries()
        except OSError as exc:
            raise ContractError(f"cannot write leases in the confidence output directory {conf_dir}: {exc}") from exc
        return pool

    def worker_name(self) -> Optional[str]:
        """The lease owner's name: the default (host:pid:rank), with the replica's size when it spans ranks."""
        if self.replica.size == 1:
            return None
        return f"{worker_id()}x{self.replica.size}"

    def _next(self, pool: ShardPool, conf_dir: Path, state: dict) -> tuple[str, Optional[int]]:
        """Leader: ("done", None), ("wait", None) or ("shard", index) with ``self.lease`` held."""
        manifest = contract.read_manifest(conf_dir)
        if manifest.complete:
            return "done", None
        lease = pool.claim(manifest.shards)
        if lease is None:  # every unfinished shard is held by a live worker: wait for it or its lease
            if time.monotonic() >= state["next_wait_log"]:
                log.info("%s: waiting for %s shards held by other workers: %s", pool.worker, conf_dir.name,
                         pool.holders(manifest.shards))
                state["next_wait_log"] = time.monotonic() + dist.WAIT_LOG_SECONDS
            return "wait", None
        if lease.shard_index in contract.read_manifest(conf_dir).shards:
            lease.release()  # finished between our manifest read and our claim
            return "wait", None
        self.lease = lease
        state["done_samples"] = sum(r.num_samples for r in manifest.shards.values())
        return "shard", lease.shard_index

    def _release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def score_split(self, prepared: Prepared, conf_dir: Path, identity: dict) -> ScoreSummary:
        cfg, replica = self.cfg, self.replica
        pool = replica.lead(self._open, prepared, conf_dir, identity)
        plan = prepared.manifest.shards
        poll_seconds = min(5.0, max(0.1, cfg.score.lease_seconds / 4))

        progress = None
        mine = {"shards": 0, "tokens": 0, "seconds": 0.0}
        state = {"next_wait_log": time.monotonic(), "done_samples": 0}
        try:
            while True:
                action, index = replica.lead(self._next, pool, conf_dir, state)
                if action == "done":
                    break
                if action == "wait":
                    time.sleep(poll_seconds)
                    continue
                try:
                    self._load()
                    if progress is None and cfg.score.progress and replica.is_leader:
                        progress = Progress(prepared.manifest.num_samples, state["done_samples"], pool.worker)
                    spec = plan[index]
                    started = time.perf_counter()
                    offsets, logprobs, entropy = score_shard(self.model, self.input_device, prepared, spec,
                                                             cfg.score, self.lease, progress, replica,
                                                             self.vocab_part)
                    seconds = time.perf_counter() - started
                    replica.lead(lambda: contract.write_shard(
                        conf_dir, contract.read_manifest(conf_dir), spec.index, torch.arange(spec.start, spec.end),
                        offsets, logprobs, entropy, seconds=seconds, worker=pool.worker))
                    mine["shards"] += 1
                    mine["tokens"] += logprobs.numel()
                    mine["seconds"] += seconds
                    if replica.is_leader:
                        log.info("%s: %s shard %d done (%d tokens, %.0f tokens/s)", pool.worker, conf_dir.name,
                                 spec.index, logprobs.numel(), logprobs.numel() / max(seconds, 1e-9))
                except LeaseLost as exc:
                    if replica.is_leader:
                        log.warning("%s: %s; moving on", pool.worker, exc)
                finally:
                    self._release()
        finally:
            if progress is not None:
                progress.close()

        summary = replica.lead(self.locked, self._summarize, conf_dir)
        summary.worker = pool.worker
        summary.worker_shards, summary.worker_tokens = mine["shards"], mine["tokens"]
        summary.worker_tokens_per_second = mine["tokens"] / mine["seconds"] if mine["seconds"] else 0.0
        return summary

    @staticmethod
    def _summarize(conf_dir: Path) -> ScoreSummary:
        summary = summarize(conf_dir, contract.read_manifest(conf_dir))
        try:
            write_confidence_report(conf_dir, summary)
        except OSError as exc:
            raise ContractError(f"cannot write the scoring summary into {conf_dir}: {exc}") from exc
        return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, sections=("score",))
    parser.add_argument(
        "--rescore-corrupt", action="store_true",
        help="verify the finished shards first and score again those that fail (corrupt or missing files), "
             "instead of refusing the folder; then train with --resume",
    )
    parser.add_argument(
        "--throttle-seconds", type=float, default=None,
        help="debugging/testing only: make every batch take at least this long (sets score.throttle_seconds)",
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.throttle_seconds is not None:
        cfg.score.throttle_seconds = args.throttle_seconds
    summary = score(cfg, rescore_corrupt=args.rescore_corrupt)
    leader = not dist.is_initialized() or dist.is_rank0()  # one line per replica
    dist.shutdown()  # a tensor-parallel replica's group, torn down by all its ranks together
    if leader:
        print(
            f"score: {summary.shards_finished}/{summary.shards_total} shards, {summary.tokens} target tokens, "
            f"{summary.tokens_per_second:.0f} tokens/s per replica, mean confidence {summary.mean_confidence:.4f}, "
            f"p<0.1 for {summary.low_confidence_share:.1%} of tokens; this worker scored {summary.worker_shards} "
            f"shards -> {Path(cfg.paths.confidence)}"
        )
    return 0
