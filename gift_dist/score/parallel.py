"""Scoring replicas that span several devices: tensor parallelism and a vocabulary-parallel target log-prob.

A replica of k ranks (``score.parallel: tensor``) holds one copy of the instruct model cut by transformers'
tensor-parallel plan: q/k/v/gate/up by output rows, o/down by input columns, so every rank works on every batch
with 1/k of the weights and FLOPs and two all-reduces per decoder layer. ``device_map`` (``pipeline``) instead puts
whole layers on each device and runs them one after another: k devices, one busy at a time.

The output layer is cut by vocabulary rows. transformers' plan would all-gather the full [tokens, vocab] logits on
every rank; here each rank keeps its slice V_r of the vocabulary and the ranks combine per-token statistics only.
With z the (soft-capped) fp32 logits of one position and y its target token:

    M        = max_r max_{v in V_r} z_v                                  (all-reduce MAX)
    lse      = M + log sum_r sum_{v in V_r} exp(z_v - M)                 (all-reduce SUM)
    z_y      = sum_r [y in V_r] z_y        exactly one rank owns y       (same all-reduce SUM)
    log p(y) = z_y - lse
    H        = -sum_r sum_{v in V_r} exp(z_v - lse) (z_v - lse)          (all-reduce SUM, with entropy only)

so per chunk of ``logprob_chunk_tokens`` positions the ranks exchange 3 (4) floats per position instead of a
vocabulary's worth. Soft-capping is elementwise and applied to each slice first, as on one rank.

Written by hand because transformers has no vocabulary-parallel cross-entropy/log-prob (Megatron's
``vocab_parallel_cross_entropy`` is the same maths for training).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as torch_dist

from gift_dist import dist
from gift_dist.config import ScoreConfig
from gift_dist.errors import ConfigError
from gift_dist.launchers import env_local_world_size

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass
class Replica:
    """This process's place among the scoring ranks.

    ``size`` ranks hold one copy of the model; the replica's rank 0 (its leader) claims shards, refreshes their
    leases and writes them, and every decision it takes reaches the other ranks through ``lead``, so all ranks of
    a replica run the same batches in the same order. A replica of size 1 has no process group at all."""

    size: int = 1
    rank: int = 0
    # This replica's number among those of the launch (the worker's global rank when size is 1).
    index: int = 0
    # The replica's process group (the default group of this process: a replica is a world of its own).
    group: Any = None

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def lead(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the leader only and hand its result, or its exception, to every rank of the replica.

        An exception is re-raised on every rank as itself (a ContractError stays one, so every rank exits 2 with
        the same message), so an error on the leader never leaves the others waiting in the next collective."""
        if self.group is None:
            return fn(*args, **kwargs)
        result: Any = None
        error: Optional[BaseException] = None
        if self.is_leader:
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:  # handed to every rank below, then raised everywhere
                error = exc
        box = [(result, error)]
        torch_dist.broadcast_object_list(box, src=0, group=self.group)
        result, error = box[0]
        if error is not None:
            raise error
        return result


def tensor_parallel_problem(config, ranks: int) -> Optional[str]:
    """Why this model cannot be split over ``ranks`` tensor-parallel ranks, or None when it can."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text, "base_model_tp_plan", None):
        return f"transformers has no tensor-parallel plan for {type(text).__name__}"
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads is None or heads % ranks or kv_heads % ranks:
        return (f"its {heads} attention heads and {kv_heads} key/value heads are not all divisible by "
                f"{ranks} ranks")
    return None


def resolve_parallel(score_cfg: ScoreConfig, model_config) -> str:
    """``score.parallel`` for this model: ``auto`` made concrete, an impossible ``tensor`` refused with the fix."""
    k = score_cfg.gpus_per_replica
    if score_cfg.parallel == "auto":
        if k == 1:
            return "replica"
        problem = tensor_parallel_problem(model_config, k)
        if problem:
            log.warning("score.parallel=auto: %s; a replica of %d GPUs runs its layers one after another "
                        "(pipeline, one GPU busy at a time)", problem, k)
            return "pipeline"
        return "tensor"
    if score_cfg.parallel == "tensor":
        problem = tensor_parallel_problem(model_config, k)
        if problem:
            raise ConfigError(f"score.parallel=tensor with score.gpus_per_replica={k}: {problem}; choose a "
                              f"gpus_per_replica that divides the heads, or score.parallel=pipeline")
    return score_cfg.parallel


def join_replica(score_cfg: ScoreConfig, parallel: str) -> Replica:
    """This process's replica; for ``tensor`` the launch's processes are grouped k by k, consecutive ranks
    together (k consecutive local ranks are k GPUs of one node).

    Each replica is a process group world of its own (its own prefix in the launcher's rendezvous store), not a
    subgroup of the launch: transformers' tensor-parallel loader spans the whole default group, and a replica that
    dies or finishes early cannot disturb another one's collectives."""
    if parallel != "tensor":
        return Replica(index=dist.env_rank())
    k = score_cfg.gpus_per_replica
    world = dist.env_world_size()
    local = env_local_world_size()
    if world % k or (local is not None and local % k):
        raise ConfigError(
            f"score.parallel=tensor with score.gpus_per_replica={k} needs a multiple of {k} processes on every "
            f"node (one per GPU), got {world} in all, {local} on this node: launch e.g. `torchrun --nproc_per_node "
            f"{k} -m gift_dist score ...`"
        )
    index, rank = divmod(dist.env_rank(), k)
    # A replica whose peer died must not wait longer than its lease lives: by then another replica retakes the
    # shard. At least 5 minutes, so loading a large model is never cut short.
    dist.init_replica_group(f"gift_score_replica_{index}", rank, k,
                            timeout_minutes=max(score_cfg.lease_seconds, 300.0) / 60.0)
    return Replica(size=k, rank=rank, index=index, group=torch_dist.group.WORLD)


@dataclass
class VocabSlice:
    """This rank's rows of the output layer: vocabulary ids ``[start, start + weight.shape[0])``."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    start: int
    group: Any

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden.to(self.weight.dtype), self.weight, self.bias)


def _local_rows(param: torch.Tensor, replica: Replica) -> tuple[torch.Tensor, int]:
    """(this rank's rows of an output-layer parameter, the first row's vocabulary id).

    The tensor-parallel plan leaves the rows sharded (a DTensor on Shard(0)): the local piece is taken as it is
    and the ranks' row counts give the offsets. A head the plan leaves whole (replicated) is cut here, evenly."""
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(param, DTensor) and tuple(param.placements) == (Shard(0),):
        local = param.to_local()
        counts = [torch.zeros(1, dtype=torch.long) for _ in range(replica.size)]
        torch_dist.all_gather(counts, torch.tensor([local.shape[0]], dtype=torch.long), group=replica.group)
        return local, int(sum(int(c) for c in counts[: replica.rank]))
    full = param.full_tensor() if isinstance(param, DTensor) else param
    bounds = torch.linspace(0, full.shape[0], replica.size + 1).round().long().tolist()
    start, end = bounds[replica.rank], bounds[replica.rank + 1]
    return full[start:end].detach().clone(), start


def vocab_slice(model, replica: Replica) -> VocabSlice:
    """This rank's share of ``model``'s output layer for a vocabulary-parallel log-prob."""
    head = model.get_output_embeddings()
    weight, start = _local_rows(head.weight, replica)
    bias = _local_rows(head.bias, replica)[0] if getattr(head, "bias", None) is not None else None
    if replica.is_leader:
        log.info("scoring replica %d: output layer split over %d ranks (%d vocabulary rows on rank 0)",
                 replica.index, replica.size, weight.shape[0])
    return VocabSlice(weight, bias, start, replica.group)


def combine_max(values: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        torch_dist.all_reduce(values, op=torch_dist.ReduceOp.MAX, group=group)
    return values


def combine_sum(values: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        torch_dist.all_reduce(values, op=torch_dist.ReduceOp.SUM, group=group)
    return values
