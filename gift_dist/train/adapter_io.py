"""Getting the LoRA weights out of (and back into) DeepSpeed's optimizer partitions.

What the adapter holds is the optimizer's fp32 master copy of each LoRA tensor, not the bf16 copy the forward
computes with. Under ZeRO-3 every rank holds a slice of it, under ZeRO-1 (``replicate``) each rank owns a part of
the master copy: ``gather_lora`` gathers them on all ranks (a collective: every rank must call it) and returns
peft's state dict (``get_peft_model_state_dict`` names, the ones ``PeftModel.from_pretrained`` reads), checked
against the shapes the LoRA layers must have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gift_dist import dist
from gift_dist.contracts import ContractError
from gift_dist.contracts.adapter import AdapterProvenance, read_adapter, write_adapter


def expected_lora_shapes(peft_model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """The shape each LoRA matrix must have, from the layers' in/out features (known even when partitioned)."""
    from peft.tuners.lora import LoraLayer

    shapes = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            r = module.r["default"]
            shapes[f"{name}.lora_A.weight"] = (r, module.in_features)
            shapes[f"{name}.lora_B.weight"] = (module.out_features, r)
    return shapes


def gather_lora(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full LoRA tensors (fp32, CPU) on every rank, in peft's state-dict naming; wrong shapes are an error."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in _state_names(peft_model).items():
        master = safe_get_full_fp32_param(param)
        # No optimizer partition (a model outside a DeepSpeed engine): the parameter is the whole tensor.
        state[name] = (param if master is None else master).detach().float().cpu().clone()
    expected = expected_lora_shapes(peft_model)
    if not state:
        raise ContractError(f"rank {dist.rank()}: gathering the LoRA parameters gave no tensors")
    for name, tensor in state.items():
        want = expected.get(name)
        if want is None:
            raise ContractError(f"rank {dist.rank()}: gathered tensor {name} belongs to no LoRA layer of the model")
        if tuple(tensor.shape) != want:
            raise ContractError(
                f"rank {dist.rank()}: gathered LoRA tensor {name} has shape {tuple(tensor.shape)}, expected {want} "
                f"(an incomplete gather from the ZeRO-3 partitions)"
            )
    return state


def save_adapter(peft_model: torch.nn.Module, peft_config: Any, out_dir: str | Path,
                 provenance: AdapterProvenance) -> Path:
    """Gather on all ranks, then rank 0 writes a standard PEFT adapter dir (atomically) via the adapter contract."""
    tensors = gather_lora(peft_model)
    config = adapter_config(peft_model, peft_config)
    return dist.rank0_call(write_adapter, out_dir, config, tensors, provenance)


def adapter_config(peft_model: torch.nn.Module, peft_config: Any) -> Any:
    """peft's own config of the wrapped model (it records the base model path and resolved target modules)."""
    return getattr(peft_model, "peft_config", {}).get("default", peft_config)


def load_lora_into(peft_model: torch.nn.Module, adapter_dir: str | Path) -> int:
    """Set the (partitioned) LoRA weights, and the optimizer's fp32 master copies, from a saved adapter dir.

    Used to resume on a different number of ranks, where DeepSpeed's own partitioned checkpoint does not fit.
    Every rank must call it. Returns the number of tensors loaded.
    """
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    adapter = read_adapter(adapter_dir)
    by_state_name = _state_names(peft_model)
    missing = sorted(set(by_state_name) - set(adapter.tensors))
    if missing:
        raise ContractError(f"adapter {adapter_dir} lacks LoRA tensors {missing[:5]} that the model has")
    for state_name, param in by_state_name.items():
        value = adapter.tensors[state_name]
        shape = tuple(getattr(param, "ds_shape", param.shape))
        if tuple(value.shape) != shape:
            raise ContractError(
                f"adapter {adapter_dir}: {state_name} has shape {tuple(value.shape)}, the model expects {shape}"
            )
    # The module's (partitioned) weights: modified on rank 0 while gathered, re-partitioned on exit...
    with deepspeed.zero.GatheredParameters(list(by_state_name.values()), modifier_rank=0):
        if dist.is_rank0():
            with torch.no_grad():
                for state_name, param in by_state_name.items():
                    param.copy_(adapter.tensors[state_name].to(param.dtype))
    # ...and the optimizer's fp32 master partitions, which the next optimizer step starts from.
    for state_name, param in by_state_name.items():
        safe_set_full_fp32_param(param, adapter.tensors[state_name].to(torch.float32))
    return len(by_state_name)


def _state_names(peft_model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """peft state-dict name -> parameter: peft's names drop the adapter name (``.default``) from the module path."""
    out = {}
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            out[name.replace(".default.", ".")] = param
    return out
