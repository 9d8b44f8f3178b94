"""gift_varlen attention: each packed sample attends to itself only, from the cumulative lengths (no mask)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gift_dist.train import attention

LENGTHS = [5, 1, 9, 4]


def _qkv(device: str, dtype: torch.dtype, heads: int = 4, kv_heads: int = 2, dim: int = 16):
    generator = torch.Generator().manual_seed(0)
    total = sum(LENGTHS)
    make = lambda h: torch.randn(1, h, total, dim, generator=generator).to(device, dtype).requires_grad_(True)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


def _block_diagonal_reference(q, k, v, scale):
    """One sdpa call over the whole row with a block-diagonal causal mask: what transformers' sdpa path does."""
    segment = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS)).to(q.device)
    total = segment.numel()
    causal = torch.ones(total, total, dtype=torch.bool, device=q.device).tril()
    mask = causal & (segment[:, None] == segment[None, :])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def _run(q, k, v, scale, cumulative, longest):
    out, weights = attention.varlen_attention_forward(None, q, k, v, None, scaling=scale,
                                                      cu_seq_lens_q=cumulative, max_length_q=longest)
    assert weights is None
    return out


def test_cumulative_lengths_delimit_the_samples():
    cumulative, longest = attention.cumulative_lengths(LENGTHS)
    assert cumulative.dtype == torch.int32 and cumulative.tolist() == [0, 5, 6, 15, 19] and longest == 9


def test_varlen_forward_and_gradients_equal_a_block_diagonal_mask():
    q, k, v = _qkv("cpu", torch.float32)
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    cumulative, longest = attention.cumulative_lengths(LENGTHS)
    out = _run(q, k, v, 0.25, cumulative, longest)
    ref = _block_diagonal_reference(*ref_inputs, 0.25)
    assert out.shape == (1, sum(LENGTHS), 4, 16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    for mine, theirs in zip((q, k, v), ref_inputs):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-5)


def test_varlen_refuses_a_batch_without_boundaries():
    q, k, v = _qkv("cpu", torch.float32)
    with pytest.raises(ValueError, match="needs a packed batch"):
        attention.varlen_attention_forward(None, q, k, v, None)


@pytest.mark.skipif(not attention.varlen_kernel_available(), reason="torch's varlen kernel runs on CUDA only")
def test_torch_varlen_kernel_matches_the_per_sample_reference_on_gpu():
    q, k, v = _qkv("cuda", torch.bfloat16)
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    cumulative, longest = attention.cumulative_lengths(LENGTHS)
    out = _run(q, k, v, 0.25, cumulative, longest)
    ref = _block_diagonal_reference(*[t.float() for t in ref_inputs], 0.25)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    upstream = torch.randn_like(ref)
    (out.float() * upstream).sum().backward()
    (ref * upstream).sum().backward()
    for mine, theirs in zip((q, k, v), ref_inputs):
        torch.testing.assert_close(mine.grad.float(), theirs.grad.float(), rtol=5e-2, atol=5e-2)


def test_one_attention_chooser_for_score_and_train(monkeypatch):
    """``models.batch.choose_attention``: a named implementation is kept; ``auto`` takes flash-attention 2 when the
    caller says the fast kernel pays (a GPU: any rows for score, packed rows for train) and it is installed, else
    the caller's fallback (train's varlen kernel), else sdpa. Both stages resolve through it."""
    import importlib.util

    from gift_dist.config import load_config
    from gift_dist.models import batch
    from gift_dist.train import engine

    installed = {"flash_attn": False}
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(batch.importlib.util, "find_spec",
                        lambda name, *a: object() if installed.get(name) else
                        (None if name in installed else real_find_spec(name, *a)))
    assert batch.choose_attention("eager", True) == "eager"
    assert batch.choose_attention("auto", False, fallback="gift_varlen") == "sdpa"
    assert batch.choose_attention("auto", True) == "sdpa"
    assert batch.choose_attention("auto", True, fallback="gift_varlen") == "gift_varlen"
    installed["flash_attn"] = True
    assert batch.choose_attention("auto", True, fallback="gift_varlen") == "flash_attention_2"
    assert batch.choose_attention("auto", False) == "sdpa"
    # The trainer on CPU: auto is sdpa whatever is installed (padded or packed rows).
    monkeypatch.setattr(engine, "on_gpu", lambda: False)
    assert engine.attention_implementation(load_config(None, ["train.packing=true"]).train) == "sdpa"
    assert engine.attention_implementation(load_config(None, ["train.attn_implementation=eager"]).train) == "eager"
