"""One target log-prob (gift_dist/models/logprob.py) for the scorer, the training loss and the evaluation: on a
tiny Gemma-2 with final logit soft-capping the three equal a full fp32 log_softmax of the model's own logits
(``model(...).logits`` includes the cap in transformers), and the loss's gradient, fused frozen-head path included,
equals autograd through those logits."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from gift_dist.contracts.prepared import IGNORE_INDEX
from gift_dist.evaluate.stage import Sample, ce_and_kl, teacher_forced_ce
from gift_dist.models.batch import collate
from gift_dist.models.logprob import softcap_of, unsupported_output_transform
from gift_dist.score.logprobs import score_batch
from gift_dist.train.loss import ChunkedTargetCE, target_positions, target_token_ce

VOCAB = 97
CAP = 2.0


def _gemma2(seed: int, cap=CAP):
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                          sliding_window=4, final_logit_softcapping=cap, pad_token_id=0)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # logits large enough that the cap bends them (random tiny logits would sit near 0)
        model.get_output_embeddings().weight.mul_(40.0)
    return model


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for n in (19, 7, 13):
        ids = torch.randint(1, VOCAB, (n,), generator=gen).tolist()
        lab = [IGNORE_INDEX] * 3 + ids[3:]
        if n > 9:
            lab[6] = IGNORE_INDEX
        rows.append(ids)
        labels.append(lab)
    return rows, labels


def _reference(model, ids, mask, lab, grad: bool = False):
    """Target log-probs from a full fp32 log_softmax of the model's own (capped) logits, row-major."""
    with torch.set_grad_enabled(grad):
        log_p = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)[:, :-1]
    shifted = lab[:, 1:]
    keep = shifted != IGNORE_INDEX
    return log_p[keep].gather(1, shifted[keep][:, None]).squeeze(1), log_p[keep]


def test_the_cap_matters_on_this_model():
    """Guard for the tests below: the capped distribution is far from the uncapped one here."""
    model = _gemma2(0)
    assert softcap_of(model) == CAP and softcap_of(model.config) == CAP
    rows, labels = _batch()
    ids, mask, lab = collate(rows, labels, 0, "cpu")
    capped, _ = _reference(model, ids, mask, lab)
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        uncapped = model.get_output_embeddings()(hidden).float().log_softmax(-1)[:, :-1]
    keep = lab[:, 1:] != IGNORE_INDEX
    uncapped = uncapped[keep].gather(1, lab[:, 1:][keep][:, None]).squeeze(1)
    assert (capped - uncapped).abs().max() > 0.5


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_scorer_equals_the_models_own_log_softmax(chunk):
    model = _gemma2(0)
    rows, labels = _batch()
    ids, mask, lab = collate(rows, labels, 0, "cpu")
    scores = score_batch(model, ids, mask, lab, chunk_tokens=chunk, with_entropy=True)
    expected, log_p = _reference(model, ids, mask, lab)
    torch.testing.assert_close(scores.logprobs, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(scores.entropy, -(log_p.exp() * log_p).sum(-1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("frozen_head", [True, False])
@pytest.mark.parametrize("chunk", [1, 4, 4096])
def test_training_loss_and_its_gradient_equal_autograd_through_the_models_logits(frozen_head, chunk):
    """CE from the decoder's hidden states through ChunkedTargetCE (the fused frozen-head gradient, or checkpointed
    chunks with a trainable head) == -log_softmax of model(...).logits, and so are the gradients of every trainable
    parameter under the same weighted sum."""
    rows, labels = _batch(1)
    ids, mask, lab = collate(rows, labels, 0, "cpu")
    n = int((lab[:, 1:] != IGNORE_INDEX).sum())
    upstream = torch.linspace(0.2, 1.7, n)
    grads, values = [], []
    for path in ("loss", "reference"):
        model = _gemma2(0)
        model.get_output_embeddings().weight.requires_grad_(not frozen_head)  # tied: the embedding too
        if path == "loss":
            hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            ce = target_token_ce(hidden, model.get_output_embeddings(), lab, chunk, softcap_of(model))
        else:
            ce = -_reference(model, ids, mask, lab, grad=True)[0]
        (ce * upstream).sum().backward()
        values.append(ce.detach())
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_fused_frozen_head_gradient_with_a_cap_on_random_logits():
    """The fused gradient's tanh derivative, without a model: against autograd through c * tanh(z / c)."""
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 9, 16, generator=gen)
    labels = torch.randint(0, 41, (2, 9), generator=gen)
    labels[:, :2] = IGNORE_INDEX
    head = torch.nn.Linear(16, 41, bias=True).requires_grad_(False)
    with torch.no_grad():
        head.weight.mul_(8.0)
    positions, target_ids = target_positions(labels)
    h1 = hidden.clone().requires_grad_(True)
    ce = ChunkedTargetCE(head, 3, softcap=1.5)(h1, positions, target_ids)
    h2 = hidden.clone().requires_grad_(True)
    logits = torch.tanh(head(h2[:, :-1]) / 1.5) * 1.5
    keep = labels[:, 1:] != IGNORE_INDEX
    ref = torch.nn.functional.cross_entropy(logits[keep], labels[:, 1:][keep], reduction="none")
    torch.testing.assert_close(ce, ref, rtol=0, atol=1e-5)
    upstream = torch.rand(ce.shape, generator=gen)
    (ce * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)


def test_evaluation_equals_the_models_own_log_softmax():
    model, other = _gemma2(0), _gemma2(1)
    rows, labels = _batch(2)
    samples = [Sample(r, l) for r, l in zip(rows, labels)]
    ids, mask, lab = collate(rows, labels, 0, "cpu")
    expected, log_p = _reference(model, ids, mask, lab)
    task_ce, count = teacher_forced_ce(model, samples, batch_size=2, pad=0)
    assert count == expected.numel()
    assert task_ce == pytest.approx(float(-expected.mean()), abs=1e-5)
    _, ref_log_p = _reference(other, ids, mask, lab)
    general_ce, kl, count = ce_and_kl(model, other, samples, batch_size=3, pad=0)
    assert general_ce == pytest.approx(float(-expected.mean()), abs=1e-5)
    assert kl == pytest.approx(float((ref_log_p.exp() * (ref_log_p - log_p)).sum(-1).mean()), abs=1e-5)
    assert ce_and_kl(model, model, samples, 3, 0)[1] == 0.0


def test_an_output_transform_the_log_prob_does_not_apply_is_named():
    from transformers import CohereConfig, LlamaConfig

    assert unsupported_output_transform(LlamaConfig()) is None
    message = unsupported_output_transform(CohereConfig(logit_scale=0.125))
    assert "logit_scale" in message and "final_logit_softcapping" in message


PACKAGE = Path(__file__).resolve().parents[1] / "gift_dist"
SHARED = PACKAGE / "models" / "logprob.py"


def test_one_copy_of_the_target_log_prob_in_the_package():
    """The soft-cap, the log-softmax normaliser and the CE of target tokens are computed in models/logprob.py
    only (the scorer's vocabulary-parallel combination of per-rank sums is the one other place a normaliser is
    formed, from logits capped by models/logprob.py's ``capped``); the weight formulas live in models/weights.py."""
    calls = {"logsumexp", "log_softmax", "cross_entropy", "tanh", "softmax"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == SHARED:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            if name in calls:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {name}")
            if isinstance(node, ast.Constant) and node.value == "final_logit_softcapping":
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} final_logit_softcapping")
    # score/logprobs.reference_logprobs: the plain full log_softmax the tests and the benchmark compare against.
    allowed = {"score/logprobs.py"}
    leftovers = [f for f in found if f.split(":")[0] not in allowed]
    assert not leftovers, leftovers
    score_lines = [f for f in found if f.startswith("score/logprobs.py")]
    assert len(score_lines) == 1 and "log_softmax" in score_lines[0], score_lines
    formulas = sorted({p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if _weight_formula(p)})
    assert formulas == ["models/weights.py"], formulas


def _weight_formula(path: Path) -> bool:
    """Code (not text) that raises to ``.gamma`` or floors at ``.prob_floor``: GIFT's weight formula."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow) and \
                isinstance(node.right, ast.Attribute) and node.right.attr == "gamma":
            return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("clamp_min", "clamp", "maximum") and \
                any(isinstance(a, ast.Attribute) and a.attr == "prob_floor" for a in node.args):
            return True
    return False
