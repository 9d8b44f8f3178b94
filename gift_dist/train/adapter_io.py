"""Getting the LoRA weights out of (and back into) DeepSpeed's optimizer partitions.

What the adapter holds is the optimizer's fp32 master copy of each LoRA tensor, not the bf16 copy the forward
computes with. Under ZeRO-3 every rank holds a slice of it, under ZeRO-1 (``replicate``) each rank owns a part of
the master copy: ``gather_lora`` gathers them on all ranks (a collective: every rank must call it) and returns
peft's state dict (``get_peft_model_state_dict`` names, the ones ``PeftModel.from_pretrained`` reads), checked
against the shapes the LoRA layers must have.

``gather_optimizer_state`` / ``load_optimizer_state_into`` do the same for AdamW's moments of the LoRA tensors and
its step count, so that a checkpoint resumed on another number of ranks continues the optimizer exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

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


# AdamW's per-tensor moments, saved with each checkpoint (amsgrad adds its running maximum).
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
OPTIMIZER_STATE_FORMAT = "gift_dist.optimizer_state"
OPTIMIZER_STATE_VERSION = "1"


def _inner_optimizer(engine: Any) -> tuple[Any, Any]:
    """DeepSpeed's optimizer wrapper and the torch optimizer inside it that steps the fp32 master partitions."""
    wrapper = engine.optimizer
    return wrapper, getattr(wrapper, "optimizer", wrapper)


def _moment_keys(inner: Any) -> tuple[str, ...]:
    amsgrad = any(group.get("amsgrad") for group in getattr(inner, "param_groups", ()))
    return MOMENT_KEYS + (("max_exp_avg_sq",) if amsgrad else ())


def optimizer_step_count(engine: Any) -> int:
    """The step count AdamW's bias correction uses: the 'step' of its per-tensor state (DeepSpeed's optimizers
    step one flat fp32 partition per parameter group; they all hold the same count), 0 before the first step."""
    _, inner = _inner_optimizer(engine)
    counts = {int(state["step"]) for state in getattr(inner, "state", {}).values() if "step" in state}
    if len(counts) > 1:
        raise ContractError(f"rank {dist.rank()}: the optimizer's partitions disagree on the step count: {counts}")
    return counts.pop() if counts else 0


def gather_optimizer_state(engine: Any, peft_model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    """Full fp32 AdamW moments of every LoRA tensor (``<peft state name>.<moment>``) and the optimizer's step
    count. A collective: every rank must call it; only rank 0 keeps the tensors (others get an empty dict)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    _, inner = _inner_optimizer(engine)
    keys = _moment_keys(inner)
    expected = expected_lora_shapes(peft_model)
    tensors = {}
    for name, param in _state_names(peft_model).items():
        for key in keys:
            full = safe_get_full_optimizer_state(param, key)
            if full is None:
                raise ContractError(f"rank {dist.rank()}: the optimizer holds no {key} for {name} (not a DeepSpeed "
                                    f"ZeRO optimizer, or no step taken yet)")
            if tuple(full.shape) != expected.get(name):
                raise ContractError(f"rank {dist.rank()}: gathered {key} of {name} has shape {tuple(full.shape)}, "
                                    f"expected {expected.get(name)}")
            if dist.is_rank0():
                tensors[f"{name}.{key}"] = full.detach().float().cpu().clone()
    return tensors, optimizer_step_count(engine)


def write_optimizer_state(path: str | Path, tensors: dict[str, torch.Tensor], optimizer_step: int,
                          train_step: int) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path), metadata={
        "format": OPTIMIZER_STATE_FORMAT, "version": OPTIMIZER_STATE_VERSION,
        "optimizer_step": str(optimizer_step), "train_step": str(train_step),
    })
    return path


def read_optimizer_state(path: str | Path) -> tuple[dict[str, torch.Tensor], int, int]:
    """(tensors, optimizer step count, training step) of a file ``write_optimizer_state`` wrote."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise ContractError(f"optimizer state {path} cannot be read: {exc}") from exc
    if meta.get("format") != OPTIMIZER_STATE_FORMAT or meta.get("version") != OPTIMIZER_STATE_VERSION:
        raise ContractError(f"{path}: not a gift_dist optimizer state of version {OPTIMIZER_STATE_VERSION} "
                            f"(format={meta.get('format')!r}, version={meta.get('version')!r})")
    try:
        return tensors, int(meta["optimizer_step"]), int(meta["train_step"])
    except (KeyError, ValueError) as exc:
        raise ContractError(f"{path}: bad optimizer step metadata {meta}") from exc


def _flat_partitions(wrapper: Any) -> Optional[list[tuple[torch.Tensor, dict]]]:
    """The fp32 flat partitions the inner optimizer steps, each with its parameter group; None when the wrapper
    is none of the DeepSpeed optimizers handled here."""
    inner = wrapper.optimizer
    if hasattr(wrapper, "fp32_partitioned_groups_flat"):  # ZeRO-3 (the group holds its partition only in step)
        return [(flat, inner.param_groups[wrapper.sub_group_to_group_id[i]])
                for i, flat in enumerate(wrapper.fp32_partitioned_groups_flat)]
    for name in ("single_partition_of_fp32_groups",  # ZeRO-1/2
                 "fp32_groups_flat_partition"):  # BF16_Optimizer (ZeRO-1 with bf16 weights, fp32 accumulation)
        if hasattr(wrapper, name):
            return list(zip(getattr(wrapper, name), inner.param_groups))
    return None


def restorable_optimizer(engine: Any) -> Optional[str]:
    """None when ``load_optimizer_state_into`` can set this engine's optimizer state, else why not."""
    wrapper, inner = _inner_optimizer(engine)
    if not isinstance(inner, torch.optim.Adam):  # AdamW is a subclass
        return f"the optimizer is {type(inner).__name__}, not torch's Adam/AdamW (train with torch_adam)"
    if getattr(wrapper, "swap_optimizer", False):
        return "the optimizer state is swapped to NVMe"
    if _flat_partitions(wrapper) is None:
        return f"{type(wrapper).__name__} is not a DeepSpeed ZeRO optimizer this code knows"
    return None


def _ensure_adam_state(wrapper: Any) -> None:
    """Create AdamW's per-tensor state (zero moments, step 0) as torch's first step would, where it is missing:
    torch creates it lazily, and a freshly built engine has taken no step. Then link DeepSpeed's per-parameter
    views into it (ZeRO-1 and bf16 do that after their first step)."""
    inner = wrapper.optimizer
    for flat, group in _flat_partitions(wrapper):
        state = inner.state[flat]
        if len(state) == 0:
            on_device = bool(group.get("capturable") or group.get("fused"))
            # torch.optim.adam's _init_group: the step on the host unless capturable or fused.
            dtype = torch.float32 if group.get("fused") else torch.get_default_dtype()
            state["step"] = (torch.zeros((), dtype=dtype, device=flat.device) if on_device
                             else torch.tensor(0.0, dtype=dtype))
            for key in _moment_keys(inner):
                state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    link = getattr(wrapper, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def load_optimizer_state_into(engine: Any, peft_model: torch.nn.Module, path: str | Path,
                              train_step: Optional[int] = None) -> int:
    """Set AdamW's moments of every LoRA tensor and its step count from a file ``write_optimizer_state`` wrote
    (at training step ``train_step``, when given), into this engine's partitions (any number of ranks). Every
    rank must call it, after ``load_lora_into``. Returns the optimizer step count set."""
    from deepspeed.utils import safe_set_full_optimizer_state

    why_not = restorable_optimizer(engine)
    if why_not is not None:
        raise ContractError(f"cannot restore the optimizer state from {path}: {why_not}")
    tensors, optimizer_step, saved_at = read_optimizer_state(path)
    if train_step is not None and saved_at != train_step:
        raise ContractError(f"optimizer state {path} was saved at step {saved_at}, its checkpoint is of step "
                            f"{train_step}")
    wrapper, inner = _inner_optimizer(engine)
    keys = _moment_keys(inner)
    by_state_name = _state_names(peft_model)
    expected = expected_lora_shapes(peft_model)
    wanted = {f"{name}.{key}" for name in by_state_name for key in keys}
    missing, extra = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
    if missing or extra:
        raise ContractError(f"optimizer state {path} does not match the model's LoRA tensors: missing "
                            f"{missing[:5]}, unexpected {extra[:5]}")
    for name in sorted(wanted):
        want = expected[name.rsplit(".", 1)[0]]
        if tuple(tensors[name].shape) != want:
            raise ContractError(f"optimizer state {path}: {name} has shape {tuple(tensors[name].shape)}, the model "
                                f"expects {want}")
    _ensure_adam_state(wrapper)
    for name, param in by_state_name.items():
        for key in keys:
            safe_set_full_optimizer_state(param, tensors[f"{name}.{key}"].to(torch.float32), key)
    for flat, _ in _flat_partitions(wrapper):
        step = inner.state[flat]["step"]
        if torch.is_tensor(step):
            step.fill_(optimizer_step)
        else:
            inner.state[flat]["step"] = optimizer_step
    return optimizer_step
