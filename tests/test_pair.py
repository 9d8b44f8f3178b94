import json
import shutil

import pytest
from transformers import AutoModelForCausalLM

from gift_dist.cli import main
from gift_dist.models.pair import PairMismatch, check_pair
from gift_dist.models.tiny import build_tiny_pair


def test_tiny_pairs_load_and_pass(tiny_llama, tiny_qwen2):
    for pair, arch in ((tiny_llama, "LlamaForCausalLM"), (tiny_qwen2, "Qwen2ForCausalLM")):
        base = AutoModelForCausalLM.from_pretrained(pair.base)
        inst = AutoModelForCausalLM.from_pretrained(pair.instruct)
        assert type(base).__name__ == arch
        diffs = [(a - b).abs().max().item() for a, b in zip(base.parameters(), inst.parameters())]
        assert all(d < 1.0 for d in diffs) and max(diffs) > 0, "instruct must be close to but not equal to base"
        report = check_pair(str(pair.base), str(pair.instruct))
        assert report.architecture == arch and report.tokenizer_size <= report.vocab_size


def test_cli_check(tiny_llama, capsys):
    assert main(["check", f"base_model={tiny_llama.base}", f"instruct_model={tiny_llama.instruct}"]) == 0
    assert "ok: LlamaForCausalLM" in capsys.readouterr().out


def test_architecture_mismatch_is_named(tiny_llama, tiny_qwen2):
    with pytest.raises(PairMismatch, match="architectures differ.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        check_pair(str(tiny_llama.base), str(tiny_qwen2.instruct))


def test_shape_mismatch_is_named(tiny_llama, tmp_path):
    wide = build_tiny_pair(tmp_path / "wide", arch="llama", hidden_size=96, base_steps=1, instruct_steps=1)
    with pytest.raises(PairMismatch, match="hidden_size: base=64 instruct=96"):
        check_pair(str(tiny_llama.base), str(wide.instruct))


def test_vocab_mismatch_is_named(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    other = tmp_path / "instruct"
    shutil.copytree(tiny_llama.instruct, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tok.save_pretrained(other)
    with pytest.raises(PairMismatch, match=r"tokenizer vocabularies differ.*only in instruct \['<\|tool\|>'\]"):
        check_pair(str(tiny_llama.base), str(other))


def test_embedding_smaller_than_vocab(tiny_llama, tmp_path):
    base, inst = tmp_path / "base", tmp_path / "instruct"
    for src, dst in ((tiny_llama.base, base), (tiny_llama.instruct, inst)):
        shutil.copytree(src, dst)
        cfg = json.loads((dst / "config.json").read_text())
        cfg["vocab_size"] = 100
        (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PairMismatch, match="embedding has 100 rows but the tokenizer has 384 tokens"):
        check_pair(str(base), str(inst))


def test_pickle_only_checkpoint_is_refused(tiny_llama, tmp_path):
    from gift_dist.contracts import ContractError

    inst = tmp_path / "instruct"
    shutil.copytree(tiny_llama.instruct, inst)
    (inst / "model.safetensors").rename(inst / "pytorch_model.bin")
    with pytest.raises(ContractError, match="only pickle"):
        check_pair(str(tiny_llama.base), str(inst))
