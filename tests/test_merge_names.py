"""peft key -> checkpoint name mapping across prefix conventions and architectures, and per-module scaling."""

from __future__ import annotations

import pytest
import torch
from tests.merge_helpers import logits, merge_config, peft_merged

from gift_dist.contracts import ContractError
from gift_dist.merge.names import base_model_prefix, lora_scaling, map_adapter

KEY = "base_model.model.model.layers.0.self_attn.q_proj"


def lora(out_features: int = 8, in_features: int = 6, r: int = 2) -> dict[str, torch.Tensor]:
    return {f"{KEY}.lora_A.weight": torch.randn(r, in_features), f"{KEY}.lora_B.weight": torch.randn(out_features, r)}


CONFIG = {"r": 2, "lora_alpha": 4}


@pytest.mark.parametrize("checkpoint_name", [
    "model.layers.0.self_attn.q_proj.weight",                  # same module tree
    "layers.0.self_attn.q_proj.weight",                        # saved from the bare backbone (LlamaModel)
    "model.language_model.layers.0.self_attn.q_proj.weight",   # language model nested in a multimodal wrapper
])
def test_prefix_conventions(checkpoint_name):
    targets = map_adapter(CONFIG, lora(), {checkpoint_name: (8, 6), "lm_head.weight": (10, 6)}, "llama", 1.0)
    assert set(targets.lora) == {checkpoint_name}


def test_base_model_prefix_comes_from_transformers():
    assert base_model_prefix("llama") == "model"
    assert base_model_prefix("gpt2") == "transformer"
    assert base_model_prefix("no-such-model") is None


def test_shape_mismatch_and_missing_factor_name_the_key():
    with pytest.raises(ContractError, match=r"q_proj\.lora_A\.weight gives a delta of shape \(8, 6\).*\(8, 7\)"):
        map_adapter(CONFIG, lora(), {"model.layers.0.self_attn.q_proj.weight": (8, 7)}, "llama", 1.0)
    only_a = {k: v for k, v in lora().items() if "lora_A" in k}
    with pytest.raises(ContractError, match=r"q_proj\.lora_A\.weight has no matching lora_B"):
        map_adapter(CONFIG, only_a, {"model.layers.0.self_attn.q_proj.weight": (8, 6)}, "llama", 1.0)


def test_rank_and_alpha_patterns_and_rslora():
    config = {"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4},
              "alpha_pattern": {"layers.0.self_attn.q_proj": 2}}
    assert lora_scaling(config, "model.layers.0.self_attn.q_proj", 1.0) == pytest.approx(2 / 4)
    assert lora_scaling(config, "model.layers.1.self_attn.q_proj", 1.0) == pytest.approx(16 / 4)
    assert lora_scaling(config, "model.layers.0.self_attn.v_proj", 0.5) == pytest.approx(0.5 * 16 / 8)
    assert lora_scaling({**config, "use_rslora": True}, "model.layers.0.mlp.up_proj", 1.0) == pytest.approx(16 / 8**0.5)


def test_gpt2_conv1d_fan_in_fan_out_matches_peft(tmp_path):
    """A third architecture with another module tree and transposed (Conv1D) weights, end to end."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64))
    model.save_pretrained(str(tmp_path / "gpt2"), max_shard_size="40KB")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                  fan_in_fan_out=True))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    peft_model.save_pretrained(str(tmp_path / "adapter"))

    class Pair:
        base = instruct = tmp_path / "gpt2"

    from gift_dist.merge.stage import merge

    out = merge(merge_config(tmp_path, Pair), adapter_dir=str(tmp_path / "adapter"))
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = logits(peft_merged(Pair.instruct, tmp_path / "adapter"), ids)
    assert (expected - logits(Pair.instruct, ids)).abs().max() > 1e-3
    torch.testing.assert_close(logits(out, ids), expected, rtol=1e-5, atol=1e-5)
