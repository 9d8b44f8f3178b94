"""Weighting functions, the chunked target-token CE and the loss normalisation, against hand-computed references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gift_dist.config import ConfigError, TrainConfig
from gift_dist.train import weighting
from gift_dist.train.loss import (
    ChunkedTargetCE,
    micro_batch_loss,
    normalizer_local,
    target_positions,
    target_token_ce,
    weighted_ce_sum,
)

VOCAB, HIDDEN = 37, 16


def _batch(seed: int = 0, batch: int = 3, length: int = 11):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, HIDDEN, generator=gen)
    labels = torch.randint(0, VOCAB, (batch, length), generator=gen)
    labels[:, :3] = -100  # prompts
    labels[1, 7:] = -100  # right padding
    labels[2, 5] = -100  # a masked turn in the middle
    return hidden, labels


def _full_logits_ce(hidden, head, labels):
    logits = head(hidden[:, :-1]).float()
    targets = labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="none", ignore_index=-100)
    return ce[targets.reshape(-1) != -100]


@pytest.mark.parametrize("chunk_tokens", [1, 4, 7, 1000])
def test_target_token_ce_matches_full_logits_with_gradients(chunk_tokens):
    hidden, labels = _batch()
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    ref_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    ref_head.load_state_dict(head.state_dict())
    h1 = hidden.clone().requires_grad_(True)
    h2 = hidden.clone().requires_grad_(True)
    upstream = torch.linspace(0.5, 2.0, int((labels[:, 1:] != -100).sum()))

    ce = target_token_ce(h1, head, labels, chunk_tokens)
    ref = _full_logits_ce(h2, ref_head, labels)
    assert ce.dtype == torch.float32 and ce.shape == ref.shape
    torch.testing.assert_close(ce, ref, rtol=1e-5, atol=1e-5)
    (ce * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, ref_head.weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_tokens", [1, 4, 1000])
def test_frozen_head_ce_gives_the_full_logits_gradient_without_rerunning_the_head(chunk_tokens):
    """LoRA's output layer is frozen: the hidden states' gradient is computed in the forward, and the backward
    never runs the output layer again (one F.linear per chunk in total, not two)."""
    hidden, labels = _batch(seed=3)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=True).requires_grad_(False)
    h1 = hidden.clone().requires_grad_(True)
    h2 = hidden.clone().requires_grad_(True)
    upstream = torch.linspace(-1.0, 3.0, int((labels[:, 1:] != -100).sum()))
    calls = []
    original = F.linear

    def counting_linear(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    positions, target_ids = target_positions(labels)
    try:
        F.linear = counting_linear
        ce = ChunkedTargetCE(head, chunk_tokens)(h1, positions, target_ids)
        (ce * upstream).sum().backward()
    finally:
        F.linear = original
    assert len(calls) == math.ceil(len(target_ids) / chunk_tokens)
    ref = _full_logits_ce(h2, head, labels)
    torch.testing.assert_close(ce, ref, rtol=1e-5, atol=1e-5)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)


def test_frozen_head_ce_in_bf16_matches_the_checkpointed_chunks():
    hidden, labels = _batch(seed=4, batch=4, length=40)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False).to(torch.bfloat16)
    positions, target_ids = target_positions(labels)
    upstream = torch.rand(len(target_ids)) * 1e-3  # weights over a large normaliser: small, but no underflow
    grads = []
    for trainable in (False, True):
        head.weight.requires_grad_(trainable)
        h = hidden.to(torch.bfloat16).requires_grad_(True)
        ce = ChunkedTargetCE(head, 16)(h, positions, target_ids)
        (ce * upstream).sum().backward()
        grads.append(h.grad.float())
        assert ce.dtype == torch.float32 and torch.isfinite(ce).all()
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-2, atol=1e-6)
    assert grads[0].abs().sum() > 0


def test_frozen_head_ce_without_gradients_is_the_plain_ce():
    hidden, labels = _batch(seed=5)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False).requires_grad_(False)
    positions, target_ids = target_positions(labels)
    with torch.no_grad():
        ce = ChunkedTargetCE(head, 4)(hidden.requires_grad_(True), positions, target_ids)
    torch.testing.assert_close(ce, _full_logits_ce(hidden.detach(), head, labels), rtol=1e-5, atol=1e-5)


def test_chunked_ce_reads_the_head_weight_in_one_module_call_per_micro_batch():
    """Under ZeRO-3 the CE head is a leaf module: one call gathers the lm_head once however many chunks there are,
    so the lm_head module itself must never be called (its own hooks would gather it again, chunk by chunk)."""
    hidden, labels = _batch()
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    head_calls, ce_calls = [], []
    head.register_forward_pre_hook(lambda module, args: head_calls.append(1))
    ce_head = ChunkedTargetCE(head, chunk_tokens=3)
    ce_head.register_forward_pre_hook(lambda module, args: ce_calls.append(1))
    positions, target_ids = target_positions(labels)
    hidden = hidden.requires_grad_(True)
    ce = ce_head(hidden, positions, target_ids)
    ce.sum().backward()
    assert ce_calls == [1] and head_calls == []
    assert ce.shape == (int((labels[:, 1:] != -100).sum()),)
    torch.testing.assert_close(ce, _full_logits_ce(hidden.detach(), head, labels), rtol=1e-5, atol=1e-5)


def test_target_positions_are_the_predicting_positions_in_row_major_order():
    labels = torch.tensor([[-100, 5, -100, 7], [-100, -100, 9, 2]])
    positions, target_ids = target_positions(labels)
    # Row 0 predicts labels 5 and 7 from positions 0 and 2; row 1 predicts 9 and 2 from positions 1 and 2.
    assert positions.tolist() == [0, 2, 4 + 1, 4 + 2] and target_ids.tolist() == [5, 7, 9, 2]
    with pytest.raises(ValueError, match="negative token id"):
        target_positions(torch.tensor([[-100, -5]]))


def test_target_token_ce_without_targets_is_empty_but_differentiable():
    hidden = torch.randn(1, 4, HIDDEN, requires_grad=True)
    labels = torch.full((1, 4), -100)
    head = torch.nn.Linear(HIDDEN, VOCAB)
    ce = target_token_ce(hidden, head, labels, 8)
    assert ce.shape == (0,)
    ce.sum().backward()
    assert torch.count_nonzero(hidden.grad) == 0


def test_target_token_ce_rejects_bad_shapes():
    head = torch.nn.Linear(HIDDEN, VOCAB)
    with pytest.raises(ValueError, match="must be"):
        target_token_ce(torch.randn(2, 5, HIDDEN), head, torch.zeros(2, 4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="chunk_tokens"):
        target_token_ce(torch.randn(2, 5, HIDDEN), head, torch.zeros(2, 5, dtype=torch.long), 0)


# A tiny batch of 2 samples (3 + 4 targets); the EOS is the last target of each sample.
LOGPROBS = [math.log(0.5), math.log(0.2), -20.0, math.log(0.9), math.log(0.6), math.log(0.05), math.log(0.8)]
IS_EOS = [False, False, True, False, False, False, True]
OWN_LOGPROBS = [math.log(0.3), math.log(0.7), math.log(0.1), math.log(0.4), math.log(0.5), math.log(0.25), -1.0]
SAMPLE_LENGTHS = [3, 4]
CE = [1.5, 0.25, 2.0, 0.75, 3.0, 0.5, 1.25]


def _reference_weights(cfg: TrainConfig) -> list[float]:
    """Weights written out from the definitions, one token at a time."""
    q = [max(math.exp(lp), cfg.prob_floor) for lp in LOGPROBS]
    if cfg.weighting == "gift":
        raw = [x**cfg.gamma for x in q]
    elif cfg.weighting == "clipped":
        raw = [min(max(x**cfg.gamma, cfg.weight_min), cfg.weight_max) for x in q]
    elif cfg.weighting == "uniform":
        raw = [1.0] * len(q)
    elif cfg.weighting == "dft":
        raw = [math.exp(lp) for lp in OWN_LOGPROBS]
    else:
        raw, start = [], 0
        for length in SAMPLE_LENGTHS:
            scored = [
                q[t] ** cfg.gamma for t in range(start, start + length) if cfg.eos_weight == "scored" or not IS_EOS[t]
            ]
            mean = sum(scored) / len(scored)
            raw += [q[t] ** cfg.gamma / mean for t in range(start, start + length)]
            start += length
    if cfg.eos_weight == "scored":
        return raw
    return [cfg.eos_weight if eos else w for w, eos in zip(raw, IS_EOS)]


WEIGHTING_CASES = [
    dict(weighting="gift"),
    dict(weighting="gift", gamma=2.0, prob_floor=0.01),
    dict(weighting="gift", eos_weight="scored"),
    dict(weighting="gift", eos_weight=0.3),
    dict(weighting="clipped", weight_min=0.1, weight_max=0.55),
    dict(weighting="mean_normalized"),
    dict(weighting="mean_normalized", gamma=0.5, eos_weight="scored"),
    dict(weighting="uniform"),
    dict(weighting="uniform", eos_weight=2.0),
    dict(weighting="dft", normalizer="token_count"),
    dict(weighting="dft", eos_weight="scored", normalize_over="per_micro_batch"),
]


def _weights(cfg: TrainConfig) -> torch.Tensor:
    return weighting.token_weights(
        cfg,
        torch.tensor(LOGPROBS) if weighting.needs_confidence(cfg) else None,
        torch.tensor(OWN_LOGPROBS) if weighting.needs_own_logprobs(cfg) else None,
        torch.tensor(IS_EOS),
        torch.tensor(SAMPLE_LENGTHS),
    )


@pytest.mark.parametrize("case", WEIGHTING_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("normalizer", ["sum_weights", "token_count"])
def test_weighted_loss_matches_hand_computed_reference(case, normalizer):
    cfg = TrainConfig(**{"normalizer": normalizer, **case})
    if case["weighting"] == "dft" and cfg.normalizer == "sum_weights" and cfg.normalize_over == "global_batch":
        pytest.skip("refused by validate (tested separately)")
    weighting.validate(cfg)
    weights = _weights(cfg)
    expected_weights = _reference_weights(cfg)
    assert weights.dtype == torch.float32 and not weights.requires_grad
    torch.testing.assert_close(weights, torch.tensor(expected_weights), rtol=1e-5, atol=1e-7)

    ce = torch.tensor(CE, requires_grad=True)
    weighted = weighted_ce_sum(ce, weights)
    expected_sum = sum(w * c for w, c in zip(expected_weights, CE))
    expected_norm = sum(expected_weights) if cfg.normalizer == "sum_weights" else len(CE)
    local = normalizer_local(cfg, weights)
    assert float(local) == pytest.approx(expected_norm, rel=1e-5)
    if cfg.normalize_over == "per_micro_batch":
        loss = micro_batch_loss(cfg, weighted, local, None, grad_accum=3, world=2)
        assert float(loss.detach()) == pytest.approx(expected_sum / expected_norm, rel=1e-5)
    else:
        global_norm = torch.tensor(expected_norm * 4.0)  # this micro-batch is a quarter of the global batch's Z
        loss = micro_batch_loss(cfg, weighted, local, global_norm, grad_accum=3, world=2)
        assert float(loss.detach()) == pytest.approx(expected_sum * 6 / (expected_norm * 4.0), rel=1e-5)
    loss.backward()
    assert ce.grad is not None and torch.count_nonzero(ce.grad) > 0


def test_mean_normalized_keeps_each_samples_total_weight():
    cfg = TrainConfig(weighting="mean_normalized", eos_weight="scored")
    weights = _weights(cfg)
    assert float(weights[:3].sum()) == pytest.approx(3.0, rel=1e-5)
    assert float(weights[3:].sum()) == pytest.approx(4.0, rel=1e-5)


def test_mean_normalized_needs_sample_lengths():
    cfg = TrainConfig(weighting="mean_normalized")
    with pytest.raises(ValueError, match="sample_lengths"):
        weighting.token_weights(cfg, torch.tensor(LOGPROBS), None, torch.tensor(IS_EOS))


def _split_loss_gradient(cfg: TrainConfig, grad_accum: int, world: int, seed: int = 1) -> torch.Tensor:
    """The gradient DeepSpeed would apply: mean over ranks and GA steps of each micro-batch's loss gradient."""
    hidden, labels = _batch(seed=seed, batch=4, length=9)
    torch.manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    micro_batch_size = 4 // (grad_accum * world)
    micro_batches = []
    # Each sample's instruct logprobs depend on the sample only, never on the split.
    inst_per_sample = [-torch.linspace(0.1, 3.0, int((labels[r, 1:] != -100).sum())) * (1 + r) for r in range(4)]
    for start in range(0, 4, micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        inst = torch.cat(inst_per_sample[rows])
        weights = weighting.token_weights(cfg, inst, None, torch.zeros(inst.numel(), dtype=torch.bool))
        micro_batches.append((hidden[rows], labels[rows], weights))
    global_norm = sum(normalizer_local(cfg, w) for _, _, w in micro_batches)
    for h, lab, w in micro_batches:
        ce = target_token_ce(h, head, lab, chunk_tokens=5)
        loss = micro_batch_loss(cfg, weighted_ce_sum(ce, w), normalizer_local(cfg, w), global_norm, grad_accum, world)
        (loss / (grad_accum * world)).backward()
    return head.weight.grad


@pytest.mark.parametrize("normalizer", ["sum_weights", "token_count"])
def test_global_normalisation_gives_the_same_gradient_for_any_split(normalizer):
    cfg = TrainConfig(weighting="gift", normalizer=normalizer, normalize_over="global_batch")
    one_micro_batch_of_4 = _split_loss_gradient(cfg, grad_accum=1, world=1)
    two_micro_batches_of_2 = _split_loss_gradient(cfg, grad_accum=2, world=1)
    two_ranks_of_2 = _split_loss_gradient(cfg, grad_accum=1, world=2)
    four_of_1 = _split_loss_gradient(cfg, grad_accum=2, world=2)
    torch.testing.assert_close(two_micro_batches_of_2, one_micro_batch_of_4, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(two_ranks_of_2, one_micro_batch_of_4, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(four_of_1, one_micro_batch_of_4, rtol=1e-5, atol=1e-7)
    per_micro_batch = _split_loss_gradient(
        TrainConfig(weighting="gift", normalizer=normalizer, normalize_over="per_micro_batch"), grad_accum=2, world=1
    )
    assert not torch.allclose(per_micro_batch, one_micro_batch_of_4, rtol=1e-3)


def test_micro_batch_loss_edge_cases():
    cfg = TrainConfig(normalize_over="global_batch")
    with pytest.raises(ValueError, match="all-reduced normaliser"):
        micro_batch_loss(cfg, torch.tensor(1.0), torch.tensor(1.0), None, 1, 1)
    with pytest.raises(ValueError, match="no weighted target"):
        micro_batch_loss(cfg, torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0), 1, 1)
    per_micro = TrainConfig(normalize_over="per_micro_batch")
    zero = micro_batch_loss(per_micro, torch.tensor(0.0, requires_grad=True), torch.tensor(0.0), None, 1, 1)
    assert float(zero.detach()) == 0.0 and zero.requires_grad


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(weighting="dft"), "token_count"),
        (dict(weight_min=0.6, weight_max=0.5), "weight_min"),
        (dict(weighting="clipped", weight_min=0.0, weight_max=0.0), "clipped"),
        (dict(weighting="entropy"), "unknown weighting"),
    ],
)
def test_validate_refuses_inconsistent_settings(changes, message):
    with pytest.raises(ConfigError, match=message):
        weighting.validate(TrainConfig(**changes))


def test_validate_accepts_dft_with_its_supported_normalisations():
    weighting.validate(TrainConfig(weighting="dft", normalizer="token_count"))
    weighting.validate(TrainConfig(weighting="dft", normalize_over="per_micro_batch"))
    weighting.validate(TrainConfig())


def test_only_confidence_weightings_need_the_scorer():
    assert {name for name in weighting.WEIGHTINGS if weighting.needs_confidence(TrainConfig(weighting=name))} == {
        "gift",
        "clipped",
        "mean_normalized",
    }


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_token_weights_reject_non_finite_inputs_naming_the_position(bad):
    logprobs = torch.tensor(LOGPROBS)
    logprobs[4] = bad
    with pytest.raises(ValueError, match="instruct logprobs .* at target position 4"):
        weighting.token_weights(TrainConfig(), logprobs, None, torch.tensor(IS_EOS))
    own = torch.tensor(OWN_LOGPROBS)
    own[2] = bad
    with pytest.raises(ValueError, match="own logprobs .* at target position 2"):
        weighting.token_weights(TrainConfig(weighting="dft"), None, own, torch.tensor(IS_EOS))


def test_token_weights_reject_missing_or_misaligned_inputs():
    with pytest.raises(ValueError, match="needs the instruct model's logprobs"):
        weighting.token_weights(TrainConfig(), None, None, torch.tensor(IS_EOS))
    with pytest.raises(ValueError, match="needs the model's own logprobs"):
        weighting.token_weights(TrainConfig(weighting="dft"), None, None, torch.tensor(IS_EOS))
    with pytest.raises(ValueError, match="6 values for 7 target tokens"):
        weighting.token_weights(TrainConfig(), torch.tensor(LOGPROBS[:6]), None, torch.tensor(IS_EOS))
    with pytest.raises(ValueError, match="sample_lengths sum to 6"):
        weighting.token_weights(TrainConfig(), torch.tensor(LOGPROBS), None, torch.tensor(IS_EOS), torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="CE has shape"):
        weighted_ce_sum(torch.zeros(3), torch.zeros(4))
