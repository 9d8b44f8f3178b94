"""Shared helpers for the merge tests: peft adapters made directly with peft, and logits of loaded models."""

from __future__ import annotations

from pathlib import Path

import torch

from gift_dist.config import RunConfig

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(model_dir: Path, out_dir: Path, seed: int = 0, **lora_kwargs) -> Path:
    """get_peft_model on ``model_dir`` with random non-zero lora_B (and perturbed modules_to_save), saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    options = {"r": 4, "lora_alpha": 8, "target_modules": ALL_LINEAR, **lora_kwargs}
    peft_model = get_peft_model(model, LoraConfig(**options))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.normal_(0.0, 0.05)
            elif "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def logits(model_dir_or_model, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = model_dir_or_model
    if isinstance(model, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def peft_merged(model_dir: Path, adapter_dir: Path):
    """The reference: PeftModel.from_pretrained(model, adapter).merge_and_unload(), in fp32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


def merge_config(tmp: Path, pair, **merge_options) -> RunConfig:
    cfg = RunConfig(base_model=str(pair.base), instruct_model=str(pair.instruct), output_dir=str(tmp / "run"))
    cfg.merge.verify = False
    cfg.merge.progress = False
    for key, value in merge_options.items():
        setattr(cfg.merge, key, value)
    return cfg


def sample_ids(vocab: int = 300, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (2, length), generator=torch.Generator().manual_seed(seed))
