"""Which linear layers of a model ``train.lora.target_modules`` names, per family: the one resolution the trainer,
the memory model (``gift-dist plan``) and the dry run use.

The names are module names (``q_proj``, ``gate_proj``, ...), matched as peft matches them: every linear layer of
that name. ``auto`` (the default) is every linear layer of the decoder (``model.get_decoder()``: a multimodal
checkpoint's vision tower is not part of it) except the output layer and the mixture-of-experts routers and
experts: q/k/v/o and gate/up/down in Llama, Qwen, Mistral, Gemma and OLMo; ``qkv_proj``, ``o_proj``,
``gate_up_proj`` and ``down_proj`` in Phi-3; the attention's q/k/v/o in Qwen3-MoE and Mixtral, whose experts are
3-D parameters (not linear layers) in the transformers this project runs and whose routers (``gate``) are left
alone. A name also carried by a layer that is never a target (a router, an expert, the output layer) is left out
of ``auto``, since peft would adapt every layer of that name.

An explicit list is checked against the model: a name the model has no linear layer of, or one that is never a
target (``lm_head``, a router, an expert layer), is an error listing the model's linear layers and what ``auto``
gives. Some families fuse projections into one linear layer: Phi-3's ``qkv_proj`` (q, k and v) and
``gate_up_proj`` (gate and up). A list naming every part of a fused layer the model has targets the fused layer
(so a list written for Llama adapts the same projections in Phi-3); naming only some parts is an error, since LoRA
cannot adapt part of a fused matrix.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from gift_dist.errors import ConfigError

AUTO = "auto"
# A fused linear layer -> the separate layers it stands for in other families.
FUSED_LAYERS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
NEVER_TARGETED = ("lm_head",)
# Last names of mixture-of-experts routers when they are linear layers (Mixtral and Qwen-MoE before transformers
# 5 made them router modules, Qwen2-MoE's shared-expert gate, Granite-MoE's router.layer).
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (``q_proj``, ``qkv_proj``, ``lm_head``, ...)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear)})


def _never_targeted(model: torch.nn.Module) -> dict[str, str]:
    """Last name -> why, for the linear layers LoRA never adapts: the output layer, MoE routers and experts."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    reasons: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        parts = name.split(".")
        if module is output or parts[-1] in NEVER_TARGETED:
            reasons.setdefault(parts[-1], "the output layer")
        elif parts[-1] in ROUTER_NAMES or "router" in parts or "Router" in type(module).__name__:
            reasons.setdefault(parts[-1], "a mixture-of-experts router")
        elif "experts" in parts:
            reasons.setdefault(parts[-1], "a mixture-of-experts expert layer")
    return reasons


def _decoder_prefix(model: torch.nn.Module) -> Optional[str]:
    """The module path of ``model.get_decoder()`` ("" for the model itself), None when there is none."""
    try:
        decoder = model.get_decoder()
    except Exception:  # remote code without one, or a model that is its own decoder  # noqa: BLE001
        return None
    return next((name for name, module in model.named_modules() if module is decoder), None)


def auto_target_modules(model: torch.nn.Module) -> list[str]:
    """``target_modules: auto``: the last names of the decoder's linear layers, in module order, less the ones
    that are never targets (the output layer, MoE routers and experts) and any name one of those also carries."""
    excluded = _never_targeted(model)
    prefix = _decoder_prefix(model)
    names: dict[str, None] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if prefix and not name.startswith(prefix + "."):
            continue
        last = name.rsplit(".", 1)[-1]
        if last not in excluded:
            names.setdefault(last, None)
    if not names:
        raise ConfigError(f"train.lora.target_modules=auto finds no linear layer to adapt in this model (its "
                          f"linear layers: {linear_layer_names(model)}); name the layers in train.lora.target_modules")
    return list(names)


def resolve_target_modules(model: torch.nn.Module, wanted: Union[str, list[str]]) -> list[str]:
    """The configured LoRA targets (``auto`` or a list of names) as names of the model's linear layers (see the
    module docstring): a name the model lacks, one that is never a target, or part of a fused layer is an error
    listing the model's linear layers."""
    if wanted == AUTO:
        return auto_target_modules(model)
    if isinstance(wanted, str):
        wanted = [wanted]
    if not wanted:
        raise ConfigError("train.lora.target_modules is empty: name the layers LoRA adapts, or give auto")
    linear_names = linear_layer_names(model)
    excluded = _never_targeted(model)
    present = [name for name in wanted if name in linear_names and name not in excluded]
    problems = [f"{name} is {excluded[name]}, never a LoRA target" for name in wanted if name in excluded]
    covered: set[str] = set()
    for fused, parts in FUSED_LAYERS.items():
        if fused in linear_names and not any(p in linear_names for p in parts):
            named = [p for p in parts if p in wanted]
            covered.update(named)
            if len(named) == len(parts):
                if fused not in present:
                    present.append(fused)
            elif named:
                problems.append(f"{named} name only part of this model's fused {fused} ({'+'.join(parts)}), which "
                                f"LoRA cannot adapt in part: name {fused} or all of {list(parts)}")
    unknown = [name for name in wanted if name not in linear_names and name not in covered]
    if unknown:
        problems.insert(0, f"{unknown} name no linear layer of this model")
    if problems:
        try:
            auto = f"; target_modules: auto gives {auto_target_modules(model)}"
        except ConfigError:
            auto = ""
        raise ConfigError(f"train.lora.target_modules={list(wanted)}: {'; '.join(problems)}. The model's linear "
                          f"layers are {linear_names}{auto}")
    return present
