"""Per-token loss weights w_t = f(q_t): a small registry from ``train.weighting`` to a weight function.

``q_t`` is the instruct model's probability of the target token (from the confidence shards), floored at
``train.prob_floor``; the formulas of the weightings that read it live in ``models/weights.py``, where the
scorer's token view reads them too. Weights are constants of the loss (detached), so the trainer can compute the
normaliser ``sum_t w_t`` of a whole global batch before any forward pass, except for ``dft`` whose weights are the
model's own probabilities and therefore only exist after the forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from gift_dist.contracts import first_non_finite
from gift_dist.config import ConfigError, TrainConfig
from gift_dist.models import weights


@dataclass(frozen=True)
class Weighting:
    """One registered weighting: its weight function and what it reads."""

    # (cfg, inst_logprobs, own_logprobs, sample_lengths, scored_mask) -> float32 [N]
    weigh: Callable[[TrainConfig, Optional[Tensor], Optional[Tensor], Optional[Tensor], Tensor], Tensor]
    needs_confidence: bool
    needs_own_logprobs: bool = False


def _confidence(formula: weights.ConfidenceFormula):
    """A weighting of the instruct confidence, from its formula in models/weights.py (shared with score's view)."""

    def weigh(cfg, inst_logprobs, own_logprobs, sample_lengths, scored_mask):
        return formula(cfg, inst_logprobs, sample_lengths, scored_mask)

    return weigh


def _uniform(cfg, inst_logprobs, own_logprobs, sample_lengths, scored_mask):
    return torch.ones(scored_mask.numel(), device=scored_mask.device)


def _dft(cfg, inst_logprobs, own_logprobs, sample_lengths, scored_mask):
    """Dynamic Fine-Tuning: the model's own (detached) probability of the target."""
    return own_logprobs.detach().float().exp()


WEIGHTINGS: dict[str, Weighting] = {
    **{name: Weighting(_confidence(formula), needs_confidence=True)
       for name, formula in weights.CONFIDENCE_FORMULAS.items()},
    "uniform": Weighting(_uniform, needs_confidence=False),
    "dft": Weighting(_dft, needs_confidence=False, needs_own_logprobs=True),
}


def _registered(cfg: TrainConfig) -> Weighting:
    try:
        return WEIGHTINGS[cfg.weighting]
    except KeyError:
        raise ConfigError(
            f"config key 'train.weighting': unknown weighting {cfg.weighting!r}; known: {', '.join(WEIGHTINGS)}"
        ) from None


def needs_confidence(cfg: TrainConfig) -> bool:
    """Whether the trainer must read the scorer's confidence directory (False for uniform and dft)."""
    return _registered(cfg).needs_confidence


def needs_own_logprobs(cfg: TrainConfig) -> bool:
    """Whether weights depend on the model's own forward (dft): they are then only known after the forward."""
    return _registered(cfg).needs_own_logprobs


def validate(cfg: TrainConfig) -> None:
    """Refuse inconsistent weighting / normalisation settings before any model is loaded (the ranges of gamma,
    prob_floor and eos_weight are checked when the config loads: TrainConfig.__post_init__)."""
    weighting = _registered(cfg)
    if cfg.weight_min > cfg.weight_max:
        raise ConfigError(
            f"config keys 'train.weight_min' ({cfg.weight_min}) > 'train.weight_max' ({cfg.weight_max})"
        )
    if cfg.weighting == "clipped" and (cfg.weight_max <= 0 or cfg.weight_min < 0):
        raise ConfigError(
            f"weighting 'clipped' needs 0 <= train.weight_min <= train.weight_max and weight_max > 0, got "
            f"[{cfg.weight_min}, {cfg.weight_max}]"
        )
    if weighting.needs_own_logprobs and cfg.normalizer == "sum_weights" and cfg.normalize_over == "global_batch":
        raise ConfigError(
            f"weighting '{cfg.weighting}' uses the model's own probabilities, known only after the forward, so "
            "normalizer=sum_weights cannot be summed over the global batch beforehand. Use train.normalizer="
            "token_count (the DFT paper's choice) or train.normalize_over=per_micro_batch."
        )


def _check_finite(name: str, values: Tensor) -> None:
    """Host tensors (the scorer's shards) are checked here. A device tensor (the model's own logprobs) is not read
    back mid-step: a non-finite value there makes the step's loss non-finite, which the recipe refuses."""
    if values.device.type != "cpu":
        return
    position = first_non_finite(values)
    if position is not None:
        raise ValueError(f"{name} has a non-finite value {values[position].item()} at target position {position[0]}")


def token_weights(
    cfg: TrainConfig,
    inst_logprobs: Optional[Tensor],
    own_logprobs: Optional[Tensor],
    is_eos: Tensor,
    sample_lengths: Optional[Tensor] = None,
) -> Tensor:
    """Weights [N] (float32, detached, on ``is_eos``'s device) for the N target tokens of a micro-batch.

    ``eos_weight`` (a number) overrides the weight of end-of-sequence targets, as the authors' reference keeps it
    at 1; ``"scored"`` weighs them like any token. With ``mean_normalized`` the per-sample mean is taken over the
    tokens that keep their scored weight, so the override does not shift the others. For ``dft``,
    ``own_logprobs`` is ``-target_token_ce(...)`` of the forward being weighted (detached here).
    """
    weighting = _registered(cfg)
    num_targets = is_eos.numel()
    device = is_eos.device
    if weighting.needs_confidence:
        if inst_logprobs is None:
            raise ValueError(f"weighting '{cfg.weighting}' needs the instruct model's logprobs, got None")
        _check_finite("instruct logprobs", inst_logprobs.detach().float())
    if weighting.needs_own_logprobs:
        if own_logprobs is None:
            raise ValueError(f"weighting '{cfg.weighting}' needs the model's own logprobs, got None")
        _check_finite("own logprobs", own_logprobs.detach().float())
    for name, values in (("instruct logprobs", inst_logprobs), ("own logprobs", own_logprobs)):
        if values is not None and values.numel() != num_targets:
            raise ValueError(f"{name} has {values.numel()} values for {num_targets} target tokens")
    if sample_lengths is not None and int(sample_lengths.sum()) != num_targets:
        raise ValueError(f"sample_lengths sum to {int(sample_lengths.sum())}, not the {num_targets} target tokens")

    scored_mask = weights.scored_mask(cfg, is_eos)
    values = weighting.weigh(
        cfg,
        None if inst_logprobs is None else inst_logprobs.detach().to(device),
        None if own_logprobs is None else own_logprobs.detach().to(device),
        None if sample_lengths is None else sample_lengths.to(device),
        scored_mask,
    ).float()
    return weights.with_eos_weight(cfg, values, scored_mask)
