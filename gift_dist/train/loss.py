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
from gift_dist.models.logprob import target_ce, target_ce_and_grad


def target_positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Where the targets are: flat indices into ``hidden.reshape(-1, H)`` of the positions that predict a target
    (position t-1 predicts the label at t), and the target ids, both [N] and row-major (the confidence shards'
    order). Computed on the host with the batch, so the device never syncs to learn how many targets there are."""
    if labels.dim() != 2:
        raise ValueError(f"labels {tuple(labels.shape)} must be [B, T]")
    batch, length = labels.shape
    mask = labels[:, 1:] != IGNORE_INDEX
    rows, cols = mask.nonzero(as_tuple=True)
    target_ids = labels[:, 1:][mask].long()
    if target_ids.numel() and int(target_ids.min()) < 0:
        raise ValueError(f"labels hold a negative token id {int(target_ids.min())} other than {IGNORE_INDEX}")
    return rows * length + cols, target_ids


class _FrozenHeadTargetCE(torch.autograd.Function):
    """CE of the target tokens through a frozen output layer, with d CE_t / d hidden_t computed in the forward.

    For one token, CE_t = logsumexp(s_t) - s_t[y_t] with s_t = cap(z_t), z_t = W h_t (+ b), so

        d CE_t / d h_t = W^T [(softmax(s_t) - onehot(y_t)) * cap'(z_t)],   cap'(z) = 1 - tanh(z / c)^2 (1 uncapped)

    (``gift_dist.models.logprob.target_ce_and_grad``, the log-prob the scorer and the evaluation use too), which
    depends on neither the weighting nor the normalisation. The loss is sum_t c_t CE_t with c_t the detached
    weight over the normaliser (whatever the weighting, DFT included: its weights are detached too), so backward
    only scales row t of the stored gradient by the incoming c_t. Computing it while the chunk's logits are at hand
    costs one [chunk, V] x [V, H] product per chunk and saves re-running the output layer in backward (what a
    checkpointed chunk does): a third fewer output-layer FLOPs and no logits recomputed. The weight must be frozen
    (its own gradient is not computed here); ``ChunkedTargetCE`` checks.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                chunk_tokens: int, cap: Optional[float] = None) -> Tensor:
        ce, grad_hidden = target_ce_and_grad(hidden, weight, bias, targets, cap, chunk_tokens)
        ctx.save_for_backward(grad_hidden)
        return ce

    @staticmethod
    def backward(ctx, grad_ce: Tensor):
        (grad_hidden,) = ctx.saved_tensors
        scaled = (grad_hidden.float() * grad_ce.unsqueeze(1)).to(grad_hidden.dtype)
        return scaled, None, None, None, None, None


def _drop_aliased_head(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """The head is the model's own lm_head, saved under the model's name: its alias here would put a second copy
    of the output layer (a vocabulary x hidden matrix) into every state dict, and so into every checkpoint."""
    for key in [k for k in state_dict if k.startswith(prefix + "lm_head.")]:
        del state_dict[key]


class ChunkedTargetCE(torch.nn.Module):
    """CE [N] (fp32, differentiable) of the target tokens, through the output layer ``chunk_tokens`` rows at a time.

    One module call per micro-batch: under ZeRO-3 it is registered as a leaf module, so the partitioned lm_head
    weight is gathered once for the forward and once for the backward, however many chunks there are (calling the
    lm_head module per chunk would all-gather it per chunk, and ranks with different token counts would then have
    to agree on a chunk count). Only one chunk's logits live at a time, in forward and in backward.

    A frozen output layer (LoRA never trains it) takes ``_FrozenHeadTargetCE``, which computes the hidden states'
    gradient in the forward; a trainable one (or a forward without gradients) goes through checkpointed chunks.
    transformers' loss and Liger's fused linear cross-entropy take no per-token weights, hence this module.
    """

    def __init__(self, lm_head: torch.nn.Module, chunk_tokens: int, softcap: Optional[float] = None):
        super().__init__()
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.lm_head = lm_head
        self.chunk_tokens = chunk_tokens
        # The model's final logit soft-cap (Gemma 2/3: ``models.logprob.softcap_of``), None for most models.
        self.softcap = softcap
        self.register_state_dict_post_hook(_drop_aliased_head)

    def _linear(self, hidden: Tensor) -> Tensor:
        # The weight is read, not the module called: the lm_head's own ZeRO-3 hooks would gather it again.
        return F.linear(hidden, self.lm_head.weight, getattr(self.lm_head, "bias", None))

    def _chunk_ce(self, hidden: Tensor, targets: Tensor) -> Tensor:
        return target_ce(self._linear, hidden, targets, self.softcap)

    def forward(self, hidden: Tensor, positions: Tensor, target_ids: Tensor) -> Tensor:
        target_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        weight, bias = self.lm_head.weight, getattr(self.lm_head, "bias", None)
        head_frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
        if head_frozen and target_hidden.requires_grad and torch.is_grad_enabled():
            return _FrozenHeadTargetCE.apply(target_hidden, weight, bias, target_ids, self.chunk_tokens,
                                             self.softcap)
        num_chunks = max(1, math.ceil(target_ids.numel() / self.chunk_tokens))
        pieces = []
        for index in range(num_chunks):
            rows = slice(index * self.chunk_tokens, (index + 1) * self.chunk_tokens)
            pieces.append(checkpoint(self._chunk_ce, target_hidden[rows], target_ids[rows], use_reentrant=False))
        return torch.cat(pieces)


def target_token_ce(hidden: Tensor, lm_head: torch.nn.Module, labels: Tensor, chunk_tokens: int,
                    softcap: Optional[float] = None) -> Tensor:
    """CE [N] (fp32, differentiable) of every target token of ``labels``, row-major; ``hidden`` [B, T, H] are the
    decoder's last hidden states, ``softcap`` the model's final logit soft-cap (see ``ChunkedTargetCE``)."""
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} must be [B, T, H] and [B, T]")
    head = ChunkedTargetCE(lm_head, chunk_tokens, softcap)
    positions, target_ids = target_positions(labels.cpu())
    return head(hidden, positions.to(hidden.device), target_ids.to(hidden.device))


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
    """The loss to hand to ``engine.backward`` for one micro-batch (see the module docstring).

    Normalisers on the host (constant weights) are checked here; one on the accelerator (DFT's, or a global one
    all-reduced over ranks) is not read back, which would stall the step: a zero normaliser there gives a zero
    loss, and the recipe refuses the step when the step's totals show no weighted target.
    """
    if cfg.normalize_over == "per_micro_batch":
        if local_norm.device.type == "cpu":
            if float(local_norm) <= 0:
                # No weight in this micro-batch: it contributes no gradient (and no NaN).
                return weighted_sum * 0.0
            return weighted_sum / local_norm.to(weighted_sum)
        norm = local_norm.to(weighted_sum)
        return torch.where(norm > 0, weighted_sum / norm.clamp_min(1e-30), weighted_sum * 0.0)
    if cfg.normalize_over == "global_batch":
        if global_norm is None:
            raise ValueError("normalize_over=global_batch needs the all-reduced normaliser of the global batch")
        if global_norm.device.type == "cpu" and float(global_norm) <= 0:
            raise ValueError(f"the global batch's normaliser is {float(global_norm)}: it holds no weighted target")
        return weighted_sum * (grad_accum * world) / global_norm.to(weighted_sum).clamp_min(1e-30)
    raise ValueError(f"unknown train.normalize_over {cfg.normalize_over!r}")
