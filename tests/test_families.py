"""The family matrix: every tiny family of ``tiny_pairs.FAMILIES`` through the pipeline's checks.

For each family: the pair check, prepare's labels under a template of the family's shape (Gemma's refuses a
system turn: its text is folded into the first user turn), scoring == a full fp32 log_softmax of the model's own
logits, the evaluation's CE the same, one LoRA training step's weighted loss and gradients == an independent
computation through ``model(...).logits``, and the trained adapter merged by the streaming merge == peft's
``merge_and_unload``, the merged folder loading and generating in transformers. One family (qwen2_tied: tied
embeddings and biases) in the quick loop; the rest slow-marked.
"""

from __future__ import annotations

import pytest
import torch

from gift_dist.chat import TemplateError, fold_system_turns, render_conversation
from gift_dist.config import TrainConfig
from gift_dist.contracts.prepared import IGNORE_INDEX
from gift_dist.models.batch import collate
from gift_dist.models.logprob import softcap_of
from gift_dist.models.lora_targets import resolve_target_modules
from gift_dist.models.pair import check_pair
from gift_dist.models.weights import confidence_weights
from gift_dist.score.logprobs import reference_logprobs, score_batch
from gift_dist.tiny_pairs import FAMILIES, GEMMA_SHAPED
from tests.merge_helpers import logits, merge_config, peft_merged

QUICK = "qwen2_tied"
MATRIX = [pytest.param(arch, marks=() if arch == QUICK else pytest.mark.slow) for arch in FAMILIES]
DEFAULT_TARGETS = TrainConfig().lora.target_modules  # auto
ATTENTION_AND_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RECORD = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "There are 3 boxes with 2 apples each. How many apples?"},
    {"role": "assistant", "content": "3 * 2 = 6. The answer is 6."},
    {"role": "user", "content": "And with 4 boxes?"},
    {"role": "assistant", "content": "4 * 2 = 8. The answer is 8."},
]


@pytest.fixture(scope="module")
def family(tiny_pair):
    def make(arch):
        return tiny_pair(arch=arch, seed=3, base_steps=8, instruct_steps=8, max_shard_size="100KB")
    return make


def _load(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs).eval()


def _batch(tokenizer):
    from gift_dist.bundled import bundled_data_path, read_jsonl

    records = read_jsonl(bundled_data_path())[:4] + [{"messages": RECORD}]
    rendered = [render_conversation(tokenizer, r["messages"], "all_assistant") for r in records]
    return collate([r.input_ids for r in rendered], [r.labels for r in rendered], tokenizer.pad_token_id, "cpu")


@pytest.mark.parametrize("arch", MATRIX)
def test_pair_check_labels_scoring_and_evaluation(arch, family):
    from gift_dist.evaluate.stage import Sample, teacher_forced_ce
    from gift_dist.models.pair import load_tokenizer

    pair = family(arch)
    report = check_pair(str(pair.base), str(pair.instruct))
    tokenizer = load_tokenizer(str(pair.instruct))

    # prepare's labels: exactly the assistant replies (and their end-of-turn token), under the family's template.
    rendered = render_conversation(tokenizer, RECORD, "all_assistant")
    labelled = [t for t in rendered.labels if t != IGNORE_INDEX]
    text = tokenizer.decode(labelled)
    assert text == "3 * 2 = 6. The answer is 6.<|im_end|>4 * 2 = 8. The answer is 8.<|im_end|>"
    full = tokenizer.decode(rendered.input_ids)
    if arch in GEMMA_SHAPED:  # no system turn: its text opens the first user turn
        assert "system" not in full and "user\nYou answer in one sentence.\n\nThere are 3 boxes" in full
        assert "<|im_start|>model\n" in full
    else:
        assert "<|im_start|>system\nYou answer in one sentence." in full

    # scoring and the evaluation == a full fp32 log_softmax of the model's own logits (soft-cap included).
    model = _load(pair.instruct)
    assert (softcap_of(model) is not None) == (arch == "gemma2")
    ids, mask, lab = _batch(tokenizer)
    expected = torch.cat(reference_logprobs(model, ids, mask, lab))
    for chunk in (5, 4096):
        scores = score_batch(model, ids, mask, lab, chunk_tokens=chunk)
        torch.testing.assert_close(scores.logprobs, expected, rtol=0, atol=1e-5)
    samples = [Sample(r[m.bool()].tolist(), l[m.bool()].tolist()) for r, l, m in zip(ids, lab, mask)]
    task_ce, count = teacher_forced_ce(model, samples, batch_size=2, pad=tokenizer.pad_token_id)
    assert count == expected.numel() and task_ce == pytest.approx(float(-expected.mean()), abs=1e-5)
    assert report.vocab_size == model.config.get_text_config().vocab_size


def _peft_model(path, arch):
    from peft import LoraConfig, get_peft_model

    model = _load(path)
    targets = resolve_target_modules(model, DEFAULT_TARGETS)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config, autocast_adapter_dtype=False), targets


@pytest.mark.parametrize("arch", MATRIX)
def test_one_training_step_and_the_merge(arch, family, tmp_path):
    from gift_dist.merge.stage import merge
    from gift_dist.models.pair import load_tokenizer
    from gift_dist.train.engine import TargetTokenCE
    from gift_dist.train.loss import normalizer_local, target_positions, weighted_ce_sum

    pair = family(arch)
    tokenizer = load_tokenizer(str(pair.instruct))
    ids, mask, lab = _batch(tokenizer)
    inst_logprobs = score_batch(_load(pair.instruct), ids, mask, lab).logprobs
    positions, target_ids = target_positions(lab)
    is_eos = target_ids == tokenizer.eos_token_id
    cfg = TrainConfig()
    weights = confidence_weights(cfg, inst_logprobs, is_eos)

    # The trainer's path: decoder -> TargetTokenCE (chunked, fused frozen-head gradient) -> sum w CE / sum w.
    peft_model, targets = _peft_model(pair.base, arch)
    if arch == "phi3":
        assert sorted(targets) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    elif arch in ("qwen3_moe", "mixtral"):  # experts (3-D parameters) and router left alone
        assert sorted(targets) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    else:
        assert targets == ATTENTION_AND_MLP
    with torch.no_grad():  # B = 0 at init: give the adapter a value so its gradients differ per path
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    module = TargetTokenCE(peft_model, chunk_tokens=7)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    ce = module(ids, position_ids, positions, target_ids, attention_mask=mask)
    loss = weighted_ce_sum(ce, weights) / normalizer_local(cfg, weights)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    peft_model.zero_grad()

    # Independently: the model's own logits, GIFT's weight by hand (max(p, 1e-4)^1; end of turn weighs 1).
    log_p = peft_model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits.float()
    log_p = log_p.log_softmax(-1)[:, :-1]
    keep = lab[:, 1:] != IGNORE_INDEX
    ref_ce = -log_p[keep].gather(1, lab[:, 1:][keep][:, None]).squeeze(1)
    hand = torch.where(is_eos, torch.ones_like(inst_logprobs), inst_logprobs.exp().clamp_min(1e-4))
    ref_loss = (hand * ref_ce).sum() / hand.sum()
    torch.testing.assert_close(ce.detach(), ref_ce.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-6, atol=1e-6)
    ref_loss.backward()
    assert grads and all("lora_" in n for n in grads)
    assert not any("experts" in n or ".gate." in n or "router" in n or "lm_head" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dict(peft_model.named_parameters())[name].grad, rtol=1e-4, atol=1e-6,
                                   msg=name)

    # One step, the adapter saved by peft, merged into the instruct model by the streaming merge.
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                param -= 0.5 * grads[name] / (grads[name].abs().max() + 1e-12) * 0.05
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    out = merge(merge_config(tmp_path, pair), adapter_dir=str(adapter))
    probe = ids[:2, :24]
    expected = logits(peft_merged(pair.instruct, adapter), probe)
    assert (expected - logits(pair.instruct, probe)).abs().max() > 1e-3  # the merge changes the model
    merged = _load(out)
    torch.testing.assert_close(logits(merged, probe), expected, rtol=1e-5, atol=1e-5)
    generated = merged.generate(input_ids=probe[:1, :8], max_new_tokens=4, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    assert generated.shape == (1, 12)


def test_system_text_folds_into_the_first_user_turn_or_is_refused_clearly():
    folded = fold_system_turns(RECORD)
    assert [m["role"] for m in folded] == ["user", "assistant", "user", "assistant"]
    assert folded[0]["content"] == "You answer in one sentence.\n\nThere are 3 boxes with 2 apples each. How many apples?"
    with pytest.raises(TemplateError, match="refuses a system turn.*drop the system turn"):
        fold_system_turns([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}])


def test_fused_targets_stand_for_their_parts_and_unknown_names_list_the_layers():
    from transformers import AutoModelForCausalLM

    from gift_dist.errors import ConfigError
    from gift_dist.tiny_pairs import tiny_config

    phi3 = AutoModelForCausalLM.from_config(tiny_config("phi3", 128, hidden_size=32, num_layers=1))
    assert resolve_target_modules(phi3, ["q_proj", "k_proj", "v_proj"]) == ["qkv_proj"]
    with pytest.raises(ConfigError, match=r"only part of this model's fused qkv_proj.*linear layers are \["):
        resolve_target_modules(phi3, ["q_proj", "v_proj", "o_proj"])
    with pytest.raises(ConfigError, match="qkv_proj"):
        resolve_target_modules(phi3, ["q_proj"])
    with pytest.raises(ConfigError, match="lm_head is the output layer, never a LoRA target"):
        resolve_target_modules(phi3, ["lm_head", "o_proj"])


def test_readme_lists_every_family_of_the_matrix():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = ["| tiny family (`gift-dist make-tiny --arch`) | stands for and exercises |", "|---|---|"]
    rows += [f"| `{arch}` | {what} |" for arch, what in FAMILIES.items()]
    assert "\n".join(rows) + "\n\n" in readme, "regenerate the README's families table from tiny_pairs.FAMILIES"
