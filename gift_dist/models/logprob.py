"""The log-probability of a target token, in one place: the scorer, the training loss and the evaluation use it.

For a position with decoder hidden state ``h`` and target token ``y``, the model's next-token distribution is the
softmax of its output logits ``z = W h (+ b)``, after the model's own transform of the logits. Gemma 2/3 cap them
(``final_logit_softcapping``: ``c * tanh(z / c)``), which ``model(...).logits`` includes in transformers; every
path here applies the same cap, so the instruct model is scored, the base model trained and both evaluated on
one distribution. The maths is fp32 whatever the model's dtype, and runs over chunks of positions so that only
one ``[chunk, vocabulary]`` block of logits is alive at a time:

    log p(y | h) = s_y - logsumexp(s),   s = cap(z) (= z without a cap)

The training loss's fused frozen-head gradient (``target_ce_and_grad``) is derived here too: with
``CE = logsumexp(s) - s_y``, ``dCE/ds = softmax(s) - onehot(y)`` and ``ds/dz = 1 - tanh(z / c)^2 = 1 - (s / c)^2``,
so ``dCE/dh = W^T [(softmax(s) - onehot(y)) * (1 - (s / c)^2)]``.

The vocabulary-parallel variant (each rank holds a slice of W) combines per-position statistics across ranks and
lives with the process groups in ``gift_dist.score.parallel`` / ``score.logprobs.vocab_parallel_chunk``; it caps
through ``capped`` from here.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from gift_dist.contracts.prepared import IGNORE_INDEX

# hidden [n, H] -> logits [n, V] in any dtype: the output layer (a module, or F.linear on its weight).
Project = Callable[[Tensor], Tensor]

# Output-layer transforms of architectures transformers ships that the log-prob here does not apply: refused
# (``unsupported_output_transform``) rather than scored or trained on a different distribution.
UNSUPPORTED_LOGIT_TRANSFORMS = {
    "logit_scale": "Cohere-style logit scaling (config.logit_scale)",
    "logits_scaling": "Granite-style logit scaling (config.logits_scaling)",
}


def text_config(config):
    """The language model's config (a multimodal wrapper's text config, else the config itself)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def softcap_of(model_or_config) -> Optional[float]:
    """The final logit soft-cap ``c`` of a model or config (Gemma 2/3 ``final_logit_softcapping``), else None."""
    config = getattr(model_or_config, "config", model_or_config)
    cap = getattr(text_config(config), "final_logit_softcapping", None)
    return float(cap) if cap else None


def unsupported_output_transform(config) -> Optional[str]:
    """A sentence naming an output-logit transform this module does not apply (None when there is none)."""
    config = text_config(config)
    for key, what in UNSUPPORTED_LOGIT_TRANSFORMS.items():
        value = getattr(config, key, None)
        if value is not None and float(value) != 1.0:
            return (f"{what} = {value} is applied to the output logits by {type(config).__name__}'s model, but "
                    f"gift_dist's target log-prob (models/logprob.py) applies only final_logit_softcapping")
    return None


def capped(logits: Tensor, cap: Optional[float]) -> Tensor:
    """fp32 logits, soft-capped when ``cap`` is set: ``c * tanh(z / c)`` (differentiable)."""
    logits = logits.float()
    if cap:
        return torch.tanh(logits / cap) * cap
    return logits


def output_logits(project: Project, hidden: Tensor, cap: Optional[float]) -> Tensor:
    """The fp32, soft-capped logits [n, V] of hidden states [n, H]: what ``model(...).logits`` holds at them."""
    return capped(project(hidden), cap)


def target_hidden(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The decoder's last hidden states at the positions that predict a target (position t-1 predicts label t),
    [N, H] in row-major order, the targets [N] and each target's row [N]. The decoder runs once; the output layer
    does not run here."""
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
    shifted = labels[:, 1:].to(hidden.device)
    rows, cols = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
    return hidden[rows, cols], shifted[rows, cols], rows


def _chunks(total: int, chunk_tokens: int) -> Iterator[slice]:
    if chunk_tokens < 1:
        raise ValueError(f"the chunk size must be >= 1 position, got {chunk_tokens}")
    for start in range(0, total, chunk_tokens):
        yield slice(start, min(start + chunk_tokens, total))


@torch.no_grad()
def target_logprobs(project: Project, hidden: Tensor, targets: Tensor, cap: Optional[float], chunk_tokens: int,
                    with_entropy: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """``log p(y_i | h_i)`` [N] (fp32) of hidden states [N, H] and targets [N], and the entropy of each position's
    distribution [N] when asked, ``chunk_tokens`` positions at a time. ``hidden`` and ``targets`` are on the
    output layer's device."""
    logprobs = torch.empty(targets.numel(), dtype=torch.float32, device=hidden.device)
    entropy = torch.empty_like(logprobs) if with_entropy else None
    for rows in _chunks(targets.numel(), chunk_tokens):
        logits = output_logits(project, hidden[rows], cap)
        normalizer = torch.logsumexp(logits, dim=-1)
        logprobs[rows] = logits.gather(1, targets[rows][:, None]).squeeze(1) - normalizer
        if entropy is not None:
            log_p = logits.sub_(normalizer[:, None])
            entropy[rows] = -(log_p.exp() * log_p).sum(-1)
        del logits
    return logprobs, entropy


@torch.no_grad()
def log_softmax_chunks(project: Project, hidden: Tensor, cap: Optional[float],
                       chunk_tokens: int) -> Iterator[tuple[slice, Tensor]]:
    """The full fp32 next-token log-distribution [chunk, V] of hidden states [N, H], chunk by chunk (for measures
    that need the whole distribution, as a KL between two models)."""
    for rows in _chunks(hidden.shape[0], chunk_tokens):
        logits = output_logits(project, hidden[rows], cap)
        yield rows, logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


def target_ce(project: Project, hidden: Tensor, targets: Tensor, cap: Optional[float]) -> Tensor:
    """``-log p(y_i | h_i)`` [n] of one chunk, differentiable (through the hidden states and a trainable head).
    cross_entropy's fused log-softmax + NLL keeps fewer [chunk, V] buffers alive in backward than
    logsumexp - gather would."""
    return F.cross_entropy(output_logits(project, hidden, cap), targets, reduction="none")


def target_ce_and_grad(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                       cap: Optional[float], chunk_tokens: int) -> tuple[Tensor, Tensor]:
    """CE [N] (fp32) of the targets through a frozen output layer ``(weight, bias)`` and ``d CE_i / d h_i`` [N, H]
    (``hidden``'s dtype), computed while each chunk's logits are at hand (see the module docstring for the
    soft-capped derivative). Reads the weight (``F.linear``), never calls the layer as a module."""
    ce = torch.empty(targets.numel(), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden)
    with torch.no_grad():
        for rows in _chunks(targets.numel(), chunk_tokens):
            logits = F.linear(hidden[rows], weight, bias).float()
            chunk_targets = targets[rows]
            slope = None
            if cap:
                logits = logits.div_(cap).tanh_()
                slope = 1.0 - logits.square()  # d cap(z) / dz = 1 - tanh(z / c)^2
                logits = logits.mul_(cap)
            log_z = torch.logsumexp(logits, dim=-1)
            ce[rows] = log_z - logits.gather(1, chunk_targets.unsqueeze(1)).squeeze(1)
            # softmax - onehot, in place in the logits buffer: one [chunk, V] fp32 buffer per chunk (two capped).
            probs = logits.sub_(log_z.unsqueeze(1)).exp_()
            probs.scatter_add_(1, chunk_targets.unsqueeze(1), probs.new_full((probs.shape[0], 1), -1.0))
            if slope is not None:
                probs.mul_(slope)
                del slope
            grad_hidden[rows] = probs.to(weight.dtype) @ weight
    return ce, grad_hidden
