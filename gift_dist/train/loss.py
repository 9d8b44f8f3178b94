"""The weighted cross-entropy: per-target-token CE computed chunk by chunk, then weighted and normalised.

A long sequence times a 150k vocabulary is gigabytes of fp32 logits; computing the CE of the target positions in
checkpointed chunks keeps at most one chunk's logits alive in forward and in backward. Neither transformers' loss
functions nor DeepSpeed offer a per-token, chunked, ZeRO-3-safe CE, hence this module.

Normalisation (``train.normalize_over``):

- ``global_batch``: ``Z = all_reduce_sum(sum over this rank's micro-batches of normalizer_local)``, computed before
  the forward (weights are constants). Each micro-batch's loss is ``weighted_ce_sum * grad_accum * world / Z``
  because DeepSpeed averages gradients over gradient-accumulation steps and ranks; the step's gradient is then
  exactly that of ``sum_t w_t CE_t / Z`` over the whole global batch, whatever the rank / micro-batch split.
- ``per_micro_batch``: ``weighted_ce_sum / normalizer_local`` (the reference implementation's behaviour).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from gift_dist.config import TrainConfig
from gift_dist.contracts.prepared import IGNORE_INDEX


def num_ce_chunks(labels: Tensor, chunk_tokens: int) -> int:
    """How many output-layer calls ``target_token_ce`` makes for ``labels`` (at least one)."""
    num_targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return max(1, math.ceil(num_targets / chunk_tokens))


def _chunk_ce(hidden: Tensor, targets: Tensor, lm_head: torch.nn.Module) -> Tensor:
    # cross_entropy's fused log-softmax + NLL keeps about 3 chunk-sized [chunk, vocab] buffers alive in backward,
    # half of what a logsumexp - gather composition needs.
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="none")


def target_token_ce(
    hidden: Tensor, lm_head: torch.nn.Module, labels: Tensor, chunk_tokens: int, min_chunks: int = 1
) -> Tensor:
    """CE [N] (fp32, differentiable) of every target token, row-major (the confidence shards' order).

    ``hidden`` [B, T, H] are the decoder's last hidden states; the hidden state at t-1 predicts the label at t.
    ``lm_head`` is called as a module (never via ``.weight``) so ZeRO-3's hooks gather its partitioned weight.
    ``min_chunks`` pads with empty chunks so every rank calls ``lm_head`` equally often: under ZeRO-3 each call
    all-gathers the weight, a collective that must match across ranks (agree on it with ``num_ce_chunks`` and an
    all-reduce max when ranks hold different token counts).
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} must be [B, T, H] and [B, T]")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    target_hidden = hidden[:, :-1][mask]
    target_ids = targets[mask].long()
    if target_ids.numel() and int(target_ids.min()) < 0:
        raise ValueError(f"labels hold a negative token id {int(target_ids.min())} other than {IGNORE_INDEX}")
    num_chunks = max(min_chunks, math.ceil(target_ids.numel() / chunk_tokens), 1)
    pieces = []
    for index in range(num_chunks):
        rows = slice(index * chunk_tokens, (index + 1) * chunk_tokens)
        pieces.append(checkpoint(_chunk_ce, target_hidden[rows], target_ids[rows], lm_head, use_reentrant=False))
    return torch.cat(pieces)


def weighted_ce_sum(ce: Tensor, weights: Tensor) -> Tensor:
    """sum_t w_t CE_t (scalar, differentiable through ``ce`` only)."""
    if ce.shape != weights.shape:
        raise ValueError(f"CE has shape {tuple(ce.shape)} but the weights {tuple(weights.shape)}")
    return (ce * weights.detach().to(ce.dtype)).sum()


def normalizer_local(cfg: TrainConfig, weights: Tensor) -> Tensor:
    """This micro-batch's contribution to the normaliser Z (fp32 scalar)."""
    if cfg.normalizer == "sum_weights":
        return weights.detach().float().sum()
    if cfg.normalizer == "token_count":
        return torch.tensor(float(weights.numel()), device=weights.device)
    raise ValueError(f"unknown train.normalizer {cfg.normalizer!r}")


def micro_batch_loss(
    cfg: TrainConfig,
    weighted_sum: Tensor,
    local_norm: Tensor,
    global_norm: Optional[Tensor],
    grad_accum: int,
    world: int,
) -> Tensor:
    """The loss to hand to ``engine.backward`` for one micro-batch (see the module docstring)."""
    if cfg.normalize_over == "per_micro_batch":
        if float(local_norm) <= 0:
            # No weight in this micro-batch: it contributes no gradient (and no NaN).
            return weighted_sum * 0.0
        return weighted_sum / local_norm.to(weighted_sum.dtype)
    if cfg.normalize_over == "global_batch":
        if global_norm is None:
            raise ValueError("normalize_over=global_batch needs the all-reduced normaliser of the global batch")
        if float(global_norm) <= 0:
            raise ValueError(f"the global batch's normaliser is {float(global_norm)}: it holds no weighted target")
        return weighted_sum * (grad_accum * world) / global_norm.to(weighted_sum.dtype)
    raise ValueError(f"unknown train.normalize_over {cfg.normalize_over!r}")
