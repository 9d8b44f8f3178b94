"""Chunked target-token logprobs equal the straightforward full-vocab log_softmax + gather."""

from __future__ import annotations

import pytest
import torch

from gift_dist.contracts.prepared import IGNORE_INDEX
from gift_dist.models.batch import collate
from gift_dist.score.logprobs import length_batches, reference_logprobs, score_batch


def _load(pair):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(pair.instruct), dtype=torch.float32).eval()


def _random_examples(vocab: int, lengths: list[int], seed: int):
    """Rows of different lengths whose labels hide a random prefix (the prompt) and a random hole."""
    gen = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        prompt = int(torch.randint(1, n - 1, (1,), generator=gen))
        lab = [IGNORE_INDEX] * prompt + ids[prompt:]
        if n > prompt + 4:
            lab[prompt + 2] = IGNORE_INDEX
        rows.append(ids)
        labels.append(lab)
    return rows, labels


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunked_logprobs_match_reference_on_padded_batches(request, fixture, chunk):
    model = _load(request.getfixturevalue(fixture))
    rows, labels = _random_examples(model.config.vocab_size, [37, 5, 20, 64, 12], seed=3)
    ids, mask, lab = collate(rows, labels, pad_token_id=0, device="cpu")
    scores = score_batch(model, ids, mask, lab, chunk_tokens=chunk, with_entropy=True)
    for values, row, label in zip(scores.logprobs.split(scores.counts), rows, labels):
        # Each row alone, unpadded, through the plain HF forward: padding must not change any value.
        single = collate([row], [label], 0, "cpu")
        expected = reference_logprobs(model, *single)[0]
        assert values.shape == expected.shape
        torch.testing.assert_close(values, expected, rtol=0, atol=1e-5)
    batched_reference = torch.cat(reference_logprobs(model, ids, mask, lab))
    torch.testing.assert_close(scores.logprobs, batched_reference, rtol=0, atol=1e-5)
    assert scores.counts == [sum(1 for t in label[1:] if t != IGNORE_INDEX) for label in labels]


def test_collate_pads_on_the_right_by_default_and_on_the_left_for_generation():
    rows, labels = [[5, 6, 7], [8]], [[IGNORE_INDEX, 6, 7], [8]]
    ids, mask, lab = collate(rows, labels, pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert lab.tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    ids, mask, lab = collate(rows, labels, pad_token_id=0, padding_side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert lab.tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 8]]
    with pytest.raises(ValueError, match="padding_side must be 'right' or 'left'"):
        collate(rows, labels, 0, padding_side="middle")


def test_entropy_matches_full_distribution(tiny_llama):
    model = _load(tiny_llama)
    rows, labels = _random_examples(model.config.vocab_size, [30, 18], seed=5)
    ids, mask, lab = collate(rows, labels, 0, "cpu")
    scores = score_batch(model, ids, mask, lab, chunk_tokens=8, with_entropy=True)
    log_p = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)[:, :-1]
    keep = lab[:, 1:] != IGNORE_INDEX
    expected = -(log_p.exp() * log_p).sum(-1)[keep]
    torch.testing.assert_close(scores.entropy, expected.detach(), rtol=0, atol=1e-5)
    assert bool((scores.entropy > 0).all())


def test_length_batches_respect_limits_and_cover_every_sample_once():
    lengths = [50, 3, 900, 17, 17, 200, 64, 1, 300, 45]
    batches = length_batches(lengths, max_batch_tokens=400, max_batch_size=3)
    flat = sorted(i for batch in batches for i in batch)
    assert flat == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) <= 3
        assert longest * len(batch) <= 400 or len(batch) == 1  # an over-long sample is alone
    assert batches[0] == [2]  # longest first
    assert batches == length_batches(lengths, 400, 3)  # deterministic


def test_length_batches_reject_bad_limits():
    with pytest.raises(ValueError, match="max_batch_tokens"):
        length_batches([3, 4], 0, 4)
