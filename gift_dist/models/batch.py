"""What a decoder forward takes, made one way for every stage: the padded token batch (right-padded for score,
train and eval's teacher-forced passes; left-padded for eval's generation, whose new tokens follow every prompt's
last) and the attention implementation ``auto`` resolves to (score and train)."""

from __future__ import annotations

import importlib.util
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from gift_dist.contracts.prepared import IGNORE_INDEX

Tokens = Union[Sequence[int], Tensor]


def collate(rows: Sequence[Tokens], labels: Sequence[Tokens], pad_token_id: int, device=None,
            padding_side: str = "right") -> tuple[Tensor, Tensor, Tensor]:
    """Padded ``input_ids``, ``attention_mask`` and ``labels`` [rows, longest row] (int64), on ``device`` when one
    is given: padding is ``pad_token_id`` in the ids, 0 in the mask and never a target (IGNORE_INDEX). Padded on
    the right, or with ``padding_side="left"`` on the left (each row's labels aligned with its tokens)."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    lab = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (row, label) in enumerate(zip(rows, labels)):
        start = length - len(row) if padding_side == "left" else 0
        ids[i, start: start + len(row)] = torch.as_tensor(row, dtype=torch.long)
        lab[i, start: start + len(label)] = torch.as_tensor(label, dtype=torch.long)
        mask[i, start: start + len(row)] = 1
    if device is None:
        return ids, mask, lab
    return ids.to(device), mask.to(device), lab.to(device)


def choose_attention(requested: str, fast_kernel_pays: bool, fallback: Optional[str] = None) -> str:
    """The attention implementation to load a model with. ``requested`` other than ``auto`` is kept. ``auto``:
    flash-attention 2 when ``fast_kernel_pays`` (the caller's call: a GPU, and rows the kernel suits) and the
    package is installed, else ``fallback`` when the caller has one for that case, else torch's sdpa."""
    if requested != "auto":
        return requested
    if fast_kernel_pays:
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        if fallback is not None:
            return fallback
    return "sdpa"
