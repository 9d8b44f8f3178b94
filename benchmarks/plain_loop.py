"""The plain peft + torch AdamW model both training benchmarks compare against (the single-device limit).

A module beside the scripts (they run from benchmarks/, which is then on sys.path), so the reference the
ratios are measured against is one piece of code.
"""

from __future__ import annotations

from typing import Optional

import torch


def plain_lora_model(cfg, device: str = "cpu", attention: Optional[str] = None):
    """(model, trainable params, optimizer): the base model in its training dtype (bf16 on CUDA), gradient
    checkpointing as the run config says, peft LoRA with the config's settings and torch AdamW (fused on CUDA).

    The adapters stay in the model's dtype (no fp32 master copy): peft's default fp32 adapters make it upcast every
    LoRA layer's input, which on the 1.33B padded run of 2026-11-26 made such a loop 4x slower than the HF Trainer
    on the same batches."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    extra = {"attn_implementation": attention} if attention else {}
    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=dtype, device_map={"": device}, **extra)
    model.config.use_cache = False
    if cfg.train.liger_kernels:
        from gift_dist.train.engine import apply_liger_kernels

        apply_liger_kernels(model)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    from gift_dist.models.lora_targets import resolve_target_modules

    lora = cfg.train.lora
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=resolve_target_modules(model, lora.target_modules),
                                             task_type="CAUSAL_LM"),
                           autocast_adapter_dtype=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay,
                                  fused=device == "cuda")
    return model, params, optimizer
