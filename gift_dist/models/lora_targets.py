"""Which linear layers of a model ``train.lora.target_modules`` names, per family.

The names are module names (``q_proj``, ``gate_proj``, ...). Some families fuse projections into one linear layer:
Phi-3's ``qkv_proj`` (q, k and v) and ``gate_up_proj`` (gate and up). A list that names every part of a fused layer
the model has (the default list names them all) targets the fused layer, so the default adapts every linear layer
of attention and MLP in those families too; a list naming only some parts cannot adapt part of a fused matrix and
leaves it out, with a warning. Mixture-of-experts families (Qwen3-MoE, Mixtral) hold their experts as 3-D
parameters, not linear layers, in the transformers this project runs: LoRA adapts their attention (and any dense
MLP layers) and leaves the experts and the router alone. The output layer (``lm_head``) is never a target.
"""

from __future__ import annotations

import logging

import torch

from gift_dist.errors import ConfigError

log = logging.getLogger(__name__)

# A fused linear layer -> the separate layers it stands for in other families.
FUSED_LAYERS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
NEVER_TARGETED = ("lm_head",)


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (``q_proj``, ``qkv_proj``, ``lm_head``, ...)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear)})


def resolve_target_modules(model: torch.nn.Module, wanted: list[str], warn: bool = True) -> list[str]:
    """The configured LoRA targets as names of the model's linear layers: fused layers stand in for their parts
    (see the module docstring); names the model lacks are skipped with a warning; none matching is an error
    listing the model's linear layers."""
    linear_names = linear_layer_names(model)
    present = [name for name in wanted if name in linear_names and name not in NEVER_TARGETED]
    covered: set[str] = set()
    for fused, parts in FUSED_LAYERS.items():
        if fused in linear_names and fused not in present and not any(p in linear_names for p in parts):
            if all(part in wanted for part in parts):
                present.append(fused)
                covered.update(parts)
            elif any(part in wanted for part in parts):
                if warn:
                    log.warning("LoRA targets %s name only part of this model's fused %s (%s): it is not "
                                "adapted; name %s or all of %s", [p for p in parts if p in wanted], fused, "+".join(parts),
                                fused, list(parts))
                covered.update(p for p in parts if p in wanted)
    missing = [name for name in wanted if name not in present and name not in covered]
    if not present:
        raise ConfigError(
            f"train.lora.target_modules={wanted} match no linear layer of the model; its linear layers are "
            f"{linear_names}"
        )
    if missing and warn:
        log.warning("LoRA targets %s do not exist in this model and are skipped (linear layers: %s)",
                    missing, linear_names)
    return present
