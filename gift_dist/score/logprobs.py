"""Teacher-forced target-token log-probabilities without a [batch, seq, vocab] fp32 tensor.

The decoder body runs once over the batch; only the hidden states at positions that predict a target token are
kept, and the output layer + fp32 log-softmax run over chunks of those positions. With a 128k-152k vocabulary
the full fp32 log-softmax of a 16k-token batch would be 8-10 GB; a 1024-position chunk is ~0.6 GB.
Written by hand because transformers' ``logits_to_keep`` selects the same positions for every row of a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from gift_dist.contracts.prepared import IGNORE_INDEX
from gift_dist.models.logprob import capped, softcap_of, target_hidden
from gift_dist.models.logprob import target_logprobs as target_logprobs_of_hidden
from gift_dist.score.parallel import VocabSlice, combine_max, combine_sum


@dataclass
class BatchScores:
    """Per-target-token values of one batch, concatenated row by row in label order."""

    logprobs: torch.Tensor  # float32 [num targets]
    counts: list[int]  # targets per row
    entropy: Optional[torch.Tensor] = None


def length_batches(lengths: Sequence[int], max_batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Group positions ``0..len(lengths)-1`` into batches of similar length (padded size <= max_batch_tokens).

    Longest first (an out-of-memory shows on the first batch, not the last), ties by position, so the batching
    of a shard depends only on its samples and the config: every worker computes identical values.
    A sample longer than ``max_batch_tokens`` forms a batch of its own.
    """
    if max_batch_tokens < 1 or max_batch_size < 1:
        raise ValueError(f"max_batch_tokens and max_batch_size must be >= 1, got {max_batch_tokens}, {max_batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1 > max_batch_size or longest * (len(current) + 1) > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@torch.no_grad()
def score_batch(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = 1024,
    with_entropy: bool = False,
    vocab_part: Optional[VocabSlice] = None,
) -> BatchScores:
    """``log p(y_t | x, y<t)`` for every label != -100, from the logits at position ``t - 1`` (fp32 math, the
    model's final logit soft-cap applied: ``gift_dist.models.logprob``, the computation training and evaluation
    share).

    ``vocab_part``: under tensor parallelism, this rank's rows of the output layer; every rank of the replica
    calls this with the same batch and gets the same values (``gift_dist.score.parallel`` derives the maths)."""
    if chunk_tokens < 1:
        raise ValueError(f"logprob_chunk_tokens must be >= 1, got {chunk_tokens}")
    selected, targets, rows = target_hidden(model, input_ids, attention_mask, labels)
    lm_head = model.get_output_embeddings()
    head_device = vocab_part.weight.device if vocab_part is not None else lm_head.weight.device
    selected, targets = selected.to(head_device), targets.to(head_device)
    cap = softcap_of(model)
    if vocab_part is None:
        logprobs, entropy = target_logprobs_of_hidden(lm_head, selected, targets, cap, chunk_tokens, with_entropy)
    else:
        logprobs = torch.empty(targets.numel(), dtype=torch.float32, device=head_device)
        entropy = torch.empty_like(logprobs) if with_entropy else None
        for start in range(0, targets.numel(), chunk_tokens):
            end = min(start + chunk_tokens, targets.numel())
            values = vocab_parallel_chunk(vocab_part, selected[start:end], targets[start:end], cap, with_entropy)
            logprobs[start:end] = values[0]
            if entropy is not None:
                entropy[start:end] = values[1]
    counts = torch.bincount(rows, minlength=labels.shape[0]).tolist()
    return BatchScores(logprobs.cpu(), counts, entropy.cpu() if entropy is not None else None)


def vocab_parallel_chunk(part: VocabSlice, hidden: torch.Tensor, targets: torch.Tensor, cap: Optional[float],
                         with_entropy: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs (and entropies) of one chunk of positions from this rank's vocabulary rows, combined over the
    replica with one MAX and one SUM all-reduce of per-position values (one more SUM for the entropy)."""
    logits = capped(part.logits(hidden), cap)
    rows = logits.shape[1]
    local_targets = targets - part.start
    owned = (local_targets >= 0) & (local_targets < rows)
    picked = logits.gather(1, local_targets.clamp(0, rows - 1)[:, None]).squeeze(1)
    top = combine_max(logits.amax(-1), part.group)
    sums = torch.stack([(logits - top[:, None]).exp().sum(-1), torch.where(owned, picked, torch.zeros_like(picked))])
    combine_sum(sums, part.group)
    normalizer = top + sums[0].log()
    entropy = None
    if with_entropy:
        log_p = logits.sub_(normalizer[:, None])
        entropy = combine_sum(-(log_p.exp() * log_p).sum(-1), part.group)
    return sums[1] - normalizer, entropy


@torch.no_grad()
def reference_logprobs(model, input_ids, attention_mask, labels) -> list[torch.Tensor]:
    """The straightforward computation (full fp32 log-softmax + gather), for tests and the benchmark."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    log_probs = logits.float().log_softmax(-1)[:, :-1]
    shifted = labels[:, 1:]
    out = []
    for row in range(labels.shape[0]):
        keep = shifted[row] != IGNORE_INDEX
        out.append(log_probs[row, keep].gather(1, shifted[row, keep][:, None]).squeeze(1).cpu())
    return out
