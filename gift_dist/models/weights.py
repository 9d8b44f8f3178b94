"""The per-token weight formulas that read the instruct model's confidence, in one place: the trainer weighs its
loss with them (``train/weighting.py``) and the scorer's token view shows them (``score/report.py``), so the view
shows the weights training will use.

``q_t`` is the instruct model's probability of the target token, floored at ``train.prob_floor``. Each formula
takes the train settings, the instruct logprobs [N] of N target tokens, the number of target tokens of each sample
(they add up to N) and the mask of tokens that keep their formula weight (False: end-of-sequence targets whose
weight ``train.eos_weight`` overrides), and returns float32 weights [N].
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from gift_dist.config import TrainConfig

ConfidenceFormula = Callable[[TrainConfig, Tensor, Optional[Tensor], Tensor], Tensor]


def floored_prob(cfg: TrainConfig, inst_logprobs: Tensor) -> Tensor:
    return inst_logprobs.float().exp().clamp_min(cfg.prob_floor)


def gift(cfg: TrainConfig, inst_logprobs: Tensor, sample_lengths: Optional[Tensor], scored_mask: Tensor) -> Tensor:
    """The authors' reference: ``max(q, prob_floor) ** gamma``."""
    return floored_prob(cfg, inst_logprobs) ** cfg.gamma


def clipped(cfg: TrainConfig, inst_logprobs: Tensor, sample_lengths: Optional[Tensor], scored_mask: Tensor) -> Tensor:
    """GIFT's weight clamped to [weight_min, weight_max]."""
    return gift(cfg, inst_logprobs, sample_lengths, scored_mask).clamp(cfg.weight_min, cfg.weight_max)


def mean_normalized(cfg: TrainConfig, inst_logprobs: Tensor, sample_lengths: Optional[Tensor],
                    scored_mask: Tensor) -> Tensor:
    """q^gamma divided by its mean over the sample's scored tokens: a sample keeps its total weight."""
    if sample_lengths is None:
        raise ValueError("weighting 'mean_normalized' needs sample_lengths (target tokens per sample)")
    raw = gift(cfg, inst_logprobs, sample_lengths, scored_mask)
    num_samples = sample_lengths.numel()
    sample_of_token = torch.repeat_interleave(torch.arange(num_samples, device=raw.device), sample_lengths.long())
    scored = scored_mask.float()
    per_sample_sum = raw.new_zeros(num_samples).index_add_(0, sample_of_token, raw * scored)
    per_sample_count = raw.new_zeros(num_samples).index_add_(0, sample_of_token, scored)
    mean = per_sample_sum / per_sample_count.clamp_min(1.0)
    return raw / mean[sample_of_token]


# train.weighting -> its formula, for the weightings whose weights are a function of the instruct confidence.
CONFIDENCE_FORMULAS: dict[str, ConfidenceFormula] = {
    "gift": gift,
    "clipped": clipped,
    "mean_normalized": mean_normalized,
}


def overrides_eos(cfg: TrainConfig) -> bool:
    """Whether end-of-sequence targets get the fixed ``train.eos_weight`` instead of their formula weight."""
    return cfg.eos_weight != "scored"


def scored_mask(cfg: TrainConfig, is_eos: Tensor) -> Tensor:
    """True for the target tokens that keep their formula weight."""
    if overrides_eos(cfg):
        return ~is_eos.bool()
    return torch.ones(is_eos.numel(), dtype=torch.bool, device=is_eos.device)


def with_eos_weight(cfg: TrainConfig, weights: Tensor, mask: Tensor) -> Tensor:
    """``weights`` with the tokens outside ``mask`` set to ``train.eos_weight`` (unchanged with ``scored``)."""
    if not overrides_eos(cfg):
        return weights
    return torch.where(mask, weights, torch.full_like(weights, float(cfg.eos_weight)))


def confidence_weights(cfg: TrainConfig, inst_logprobs: Tensor, is_eos: Tensor,
                       sample_lengths: Optional[Tensor] = None) -> Tensor:
    """The float32 weights [N] of ``cfg.weighting`` (one of CONFIDENCE_FORMULAS) for N target tokens, the
    end-of-sequence override included: what the trainer weighs these tokens by."""
    mask = scored_mask(cfg, is_eos)
    weights = CONFIDENCE_FORMULAS[cfg.weighting](cfg, inst_logprobs, sample_lengths, mask).float()
    return with_eos_weight(cfg, weights, mask)
