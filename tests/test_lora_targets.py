"""``train.lora.target_modules``: ``auto`` per family (every linear layer of the decoder but the output layer and
MoE routers), explicit names checked against the model, and the one resolution shared by the trainer, the memory
model (``gift-dist plan``) and the dry run. Models are built on the meta device (no weights)."""

from __future__ import annotations

import json

import pytest
import torch

from gift_dist.cli import main
from gift_dist.config import LoraConfig, load_config
from gift_dist.errors import ConfigError
from gift_dist.memory_plan import model_shape
from gift_dist.models.lora_targets import resolve_target_modules
from gift_dist.tiny_pairs import tiny_config

ATTENTION_AND_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
AUTO = {
    "llama": ATTENTION_AND_MLP,
    "qwen2_tied": ATTENTION_AND_MLP,
    "gemma2": ATTENTION_AND_MLP,
    "phi3": ["o_proj", "qkv_proj", "gate_up_proj", "down_proj"],
    # experts are 3-D parameters and the router (`gate`) a router module: LoRA on the attention only
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def _meta(arch):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_config(arch, 128, hidden_size=32, num_layers=2))


@pytest.mark.parametrize("arch", list(AUTO))
def test_auto_is_every_decoder_linear_layer_but_the_output_layer_and_routers(arch):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    model = _meta(arch)
    targets = resolve_target_modules(model, "auto")
    assert targets == AUTO[arch]
    decoder = {f"model.{name}" for name, m in model.get_decoder().named_modules() if isinstance(m, torch.nn.Linear)}
    peft_model = get_peft_model(model, PeftLoraConfig(r=2, target_modules=targets))
    adapted = {name.removeprefix("base_model.model.") for name, m in peft_model.named_modules()
               if isinstance(m, LoraLayer)}
    assert adapted == decoder  # every linear layer of the decoder, and only those
    assert not any("lm_head" in n or ".gate." in n or n.endswith(".gate") or "experts" in n for n in adapted)
    if arch in ("qwen3_moe", "mixtral"):
        assert any(type(m).__name__.endswith("Router") for m in model.modules())  # the router exists, left alone


def test_auto_leaves_out_linear_routers_and_experts_and_names_they_share():
    """Layouts where the router and the experts are linear layers (Mixtral and Qwen-MoE before transformers 5,
    Qwen2-MoE's shared expert): never adapted, nor a name one of them carries."""
    linear = torch.nn.Linear

    class Moe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = linear(8, 4)
            self.experts = torch.nn.ModuleList(
                torch.nn.ModuleDict({"w1": linear(8, 8), "gate_proj": linear(8, 8)}) for _ in range(4))
            self.shared_expert = torch.nn.ModuleDict({"gate_proj": linear(8, 8), "down_proj": linear(8, 8)})
            self.shared_expert_gate = linear(8, 1)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"q_proj": linear(8, 8), "mlp": Moe()})
                                              for _ in range(2))
            self.lm_head = linear(8, 16)

    model = Toy()
    assert resolve_target_modules(model, "auto") == ["q_proj", "down_proj"]
    for name, why in (("gate", "router"), ("w1", "expert layer"), ("gate_proj", "expert layer"),
                      ("lm_head", "output layer")):
        with pytest.raises(ConfigError, match=f"{name} is .*{why}, never a LoRA target"):
            resolve_target_modules(model, ["q_proj", name])


def test_an_unknown_explicit_name_is_refused_naming_the_models_linear_layers():
    model = _meta("mixtral")
    with pytest.raises(ConfigError) as info:  # the old default list: Mixtral has no dense MLP projections
        resolve_target_modules(model, ATTENTION_AND_MLP)
    message = str(info.value)
    assert "['gate_proj', 'up_proj', 'down_proj'] name no linear layer of this model" in message
    assert "linear layers are ['k_proj', 'lm_head', 'o_proj', 'q_proj', 'v_proj']" in message
    assert "auto gives ['q_proj', 'k_proj', 'v_proj', 'o_proj']" in message
    # the memory model (plan, the trainer's layout choice) resolves the same way: refused, not counted as zero
    cfg = load_config(None, ["train.lora.target_modules=[q_proj, query_key_value]"])
    with pytest.raises(ConfigError, match=r"\['query_key_value'\] name no linear layer.*'q_proj'"):
        _shape("llama", cfg.train.lora.target_modules)
    # a list written for Llama names Phi-3's fused layers
    assert resolve_target_modules(_meta("phi3"), ATTENTION_AND_MLP) == ["o_proj", "down_proj", "qkv_proj",
                                                                        "gate_up_proj"]


def _shape(arch, target_modules, tmp_path=None):
    import tempfile
    from pathlib import Path

    folder = Path(tmp_path or tempfile.mkdtemp())
    path = folder / f"{arch}.json"
    path.write_text(json.dumps(tiny_config(arch, 128, hidden_size=32, num_layers=2).to_dict()))
    return model_shape(str(path), 4, target_modules)


@pytest.mark.parametrize("arch", ["phi3", "qwen3_moe"])
def test_the_memory_model_counts_the_trainers_targets(arch, tmp_path):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    shape = _shape(arch, "auto", tmp_path)
    assert list(shape.lora_targets) == AUTO[arch]
    peft_model = get_peft_model(_meta(arch), PeftLoraConfig(r=4, target_modules=list(shape.lora_targets)))
    assert shape.lora_params == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_config_default_is_auto_and_values_are_validated():
    assert LoraConfig().target_modules == "auto"
    assert load_config(None, ["train.lora.target_modules=q_proj"]).train.lora.target_modules == ["q_proj"]
    for bad in ("[]", "['']", "3"):
        with pytest.raises(ConfigError, match="train.lora.target_modules"):
            load_config(None, [f"train.lora.target_modules={bad}"])
    with pytest.raises(ConfigError, match="auto or a list"):
        LoraConfig(target_modules="all")


def test_config_shows_auto_and_plan_prints_the_resolved_targets(capsys, tmp_path):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    doc = " ".join(word for word in out.split() if word != "#")
    assert "    target_modules: auto\n" in out and "`gift-dist config` cannot know the model and shows `auto`" in doc
    for arch in ("llama", "phi3", "mixtral"):
        path = tmp_path / f"{arch}.json"
        path.write_text(json.dumps(tiny_config(arch, 128, hidden_size=32, num_layers=2).to_dict()))
        assert main(["plan", "--model", str(path), "--gpus-per-node", "1"]) == 0
        out = capsys.readouterr().out
        assert f"  LoRA targets (train.lora.target_modules: auto): {', '.join(AUTO.get(arch, ATTENTION_AND_MLP))}\n" \
               in out
