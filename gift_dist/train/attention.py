"""Padding-free attention for packed micro-batches: each sample attends only to itself, with no [T, T] mask.

A packed micro-batch is one row of samples back to back. transformers' sdpa path keeps samples apart with a dense
block-diagonal [T, T] mask built from the position ids, so attention costs T^2 whatever the samples' lengths (an
8k-token row of 500-token samples does ~16x the work it needs) and the mask kernel cannot use flash attention.
flash-attention's varlen kernel does it right but is built from source only; torch ships the same kernel as
``torch.nn.attention.varlen.varlen_attn`` (CUDA), which transformers does not wire in. So this module registers one
attention function, ``gift_varlen``, with transformers' attention interface: it takes the packed row's cumulative
sample lengths (``cu_seq_lens_q`` / ``max_length_q``, computed on the host with the batch, so nothing syncs) and
runs torch's varlen kernel, or a per-sample sdpa loop where that kernel does not exist (CPU): the same result.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F

NAME = "gift_varlen"


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_kernel_available() -> bool:
    """torch's varlen attention exists and a CUDA device is there to run it."""
    return torch.cuda.is_available() and _torch_varlen() is not None


def cumulative_lengths(sample_lengths: list[int]) -> tuple[torch.Tensor, int]:
    """``cu_seq_lens`` (int32, [samples + 1]) and the longest sample of a packed row, from the token counts."""
    cumulative = torch.zeros(len(sample_lengths) + 1, dtype=torch.int32)
    cumulative[1:] = torch.cumsum(torch.tensor(sample_lengths, dtype=torch.int32), 0)
    return cumulative, max(sample_lengths)


def _per_sample_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cumulative: torch.Tensor,
                     scale: Optional[float]) -> torch.Tensor:
    """The reference: causal sdpa sample by sample; [T, H, D] in and out."""
    bounds = cumulative.tolist()
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        # [L, H, D] -> [1, H, L, D]
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                             enable_gqa=ks.shape[1] != qs.shape[1])
        pieces.append(out.squeeze(0).transpose(0, 1))
    return torch.cat(pieces)


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cumulative: torch.Tensor, longest: int,
            scale: Optional[float]) -> torch.Tensor:
    kernel = _torch_varlen()
    params = inspect.signature(kernel).parameters
    # The causal flag is spelled differently across torch releases.
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            causal["enable_gqa"] = True
        else:
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    cumulative = cumulative.to(q.device, torch.int32)
    return kernel(q, k, v, cumulative, cumulative, longest, longest, scale=scale, **causal)


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                             dropout: float = 0.0, cu_seq_lens_q: Optional[torch.Tensor] = None,
                             max_length_q: Optional[int] = None, **_kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query [1, H, T, D], key/value [1, H_kv, T, D] in, output
    [1, T, H, D] out. Samples are delimited by ``cu_seq_lens_q`` (the packed row's cumulative lengths)."""
    if cu_seq_lens_q is None or max_length_q is None:
        raise ValueError(f"attention '{NAME}' needs a packed batch (cu_seq_lens_q, max_length_q); use it with "
                         f"train.packing=true, or set train.attn_implementation=sdpa")
    if query.shape[0] != 1:
        raise ValueError(f"attention '{NAME}' takes one packed row, got a batch of {query.shape[0]}")
    if dropout:
        raise ValueError(f"attention '{NAME}' has no attention dropout; the model asks for {dropout}")
    q, k, v = (t.squeeze(0).transpose(0, 1) for t in (query, key, value))
    if varlen_kernel_available() and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = _varlen(q, k, v, cu_seq_lens_q, int(max_length_q), scaling)
    else:
        out = _per_sample_sdpa(q, k, v, cu_seq_lens_q, scaling)
    return out.unsqueeze(0), None


def register() -> str:
    """Make ``attn_implementation="gift_varlen"`` known to transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(NAME, varlen_attention_forward)
    # Like flash attention, it needs no mask: the cumulative lengths say everything.
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, flash_attention_mask)
    return NAME
