import json
import os
import shutil

import pytest
from transformers import AutoModelForCausalLM

from gift_dist.cli import main
from gift_dist.models.pair import PairMismatch, check_pair


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


def test_shape_mismatch_is_named(tiny_llama, tiny_pair):
    wide = tiny_pair(arch="llama", hidden_size=96, base_steps=1, instruct_steps=1)
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


def test_identity_sees_the_weights_and_caches_their_digests(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    from gift_dist.contracts.model_folder import DIGEST_CACHE_NAME, model_identity

    # Same config and tensor shapes, different weights: a base and its instruct sibling are two models.
    assert model_identity(str(tiny_llama.base))["hash"] != model_identity(str(tiny_llama.instruct))["hash"]
    copy = tmp_path / "v1"
    shutil.copytree(tiny_llama.instruct, copy)
    before = model_identity(str(copy))["hash"]
    assert (copy / DIGEST_CACHE_NAME).is_file()
    weights = copy / "model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name][0] += 1e-3  # a "v2" of the same fine-tune: one value, same size on disk
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert model_identity(str(copy))["hash"] != before


def test_base_and_instruct_with_the_same_weights_are_refused(tiny_llama, capsys):
    with pytest.raises(PairMismatch, match="hold the same weights"):
        check_pair(str(tiny_llama.instruct), str(tiny_llama.instruct))


def test_check_reports_how_far_instruct_is_from_base(tiny_llama, capsys):
    from gift_dist.models.pair import relative_weight_difference

    assert main(["check", f"base_model={tiny_llama.base}", f"instruct_model={tiny_llama.instruct}"]) == 0
    difference = relative_weight_difference(str(tiny_llama.base), str(tiny_llama.instruct))
    assert 0 < difference < 10
    assert f"instruct differs from base by {difference:.1%}" in capsys.readouterr().out


def test_a_model_path_that_does_not_exist_is_named_not_taken_for_a_hub_id(tiny_llama, tmp_path, capsys):
    """`train` with a mistyped base_model: one line naming the folder, exit 2 (transformers alone answers with an
    error about repository ids)."""
    from gift_dist.cli import main

    missing = tmp_path / "no-such-model"
    assert main(["train", f"base_model={missing}", f"instruct_model={tiny_llama.instruct}",
                 f"output_dir={tmp_path / 'run'}"]) == 2
    assert f"model directory {missing} does not exist" in capsys.readouterr().err


def _model_with_one_tensor(folder):
    import torch
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": torch.arange(300_000, dtype=torch.float32)}, str(folder / "model.safetensors"))
    return folder / "model.safetensors"


def _rewrite_keeping_times(path, offset, data):
    """Change bytes of ``path`` in place (same size, same inode) and put its atime and mtime back."""
    import time

    before = path.stat()
    time.sleep(0.05)  # past the file system clock's tick, as a rewrite some time later would be
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)


@pytest.mark.parametrize("where", ["whole file", "outside the sampled bytes"])
def test_identity_sees_a_rewrite_whose_mtime_was_put_back(tmp_path, where):
    from gift_dist.contracts.model_folder import DIGEST_SAMPLE_BYTES, model_identity

    weights = _model_with_one_tensor(tmp_path / "instruct")
    before = model_identity(str(tmp_path / "instruct"))["hash"]
    size = weights.stat().st_size
    if where == "whole file":
        _rewrite_keeping_times(weights, 0, bytes(b ^ 0xFF for b in weights.read_bytes()))
    else:
        offset = DIGEST_SAMPLE_BYTES + 4096  # between the start sample and the middle one
        assert offset < size // 2 - DIGEST_SAMPLE_BYTES // 2
        _rewrite_keeping_times(weights, offset, b"\x01\x02\x03\x04")
    assert model_identity(str(tmp_path / "instruct"))["hash"] != before
