"""From peft adapter keys to checkpoint tensor names, and from LoRA factors to per-tensor weight deltas.

peft names adapter tensors after the module tree of the model it wrapped (``base_model.model.<module path>.lora_A.
weight``); a checkpoint names tensors after the tree of the class that saved it. The two usually agree, but a
checkpoint saved from the bare backbone (``LlamaModel``) lacks the head class's ``base_model_prefix`` (``model.``),
and multimodal wrappers nest the language model one level deeper. Neither peft nor transformers maps a LoRA onto a
checkpoint *without loading the model*, which the streaming merge must avoid, so the mapping is done here from
tensor names and shapes alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from gift_dist.contracts import ContractError

PEFT_PREFIX = "base_model.model."
# Module-path prefixes that checkpoints of the same architecture add or drop (language-model nesting of
# multimodal wrappers, bare-backbone saves). The model class's own base_model_prefix is tried first.
KNOWN_PREFIXES = ("model", "transformer", "language_model", "model.language_model", "language_model.model")
LORA_FACTORS = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "A",
    ".lora_embedding_B": "B",
}
UNSUPPORTED_PARTS = {
    "lora_magnitude_vector": "DoRA magnitude vectors (use_dora) are not a linear delta; merge a DoRA adapter with peft",
    ".lora_A.bias": "LoRA biases (lora_bias=True) are not supported by the streaming merge",
    ".lora_B.bias": "LoRA biases (lora_bias=True) are not supported by the streaming merge",
    "trainable_tokens_delta": "trainable-token adapters (trainable_token_indices) are not supported by the streaming "
    "merge; train with modules_to_save on the embedding instead",
}


@dataclass
class LoraPair:
    """One adapted module: its two factors and the LoRA scaling peft would use for it."""

    module: str
    key_a: str
    key_b: str
    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    # delta = (B @ A).T for embedding LoRA (peft's layout) and for fan_in_fan_out (Conv1D) weights.
    transposed: bool


@dataclass
class FullWeight:
    """A whole tensor the adapter carries (modules_to_save, saved embedding layers): merged as trained - base."""

    key: str
    tensor: torch.Tensor


@dataclass
class MergeTargets:
    """Every checkpoint tensor the adapter changes, by checkpoint tensor name."""

    lora: dict[str, LoraPair] = field(default_factory=dict)
    full: dict[str, FullWeight] = field(default_factory=dict)

    def names(self) -> set[str]:
        return set(self.lora) | set(self.full)


def module_path(adapter_key: str) -> str:
    """``base_model.model.model.layers.0.q_proj.lora_A.weight`` -> ``model.layers.0.q_proj``."""
    key = adapter_key[len(PEFT_PREFIX):] if adapter_key.startswith(PEFT_PREFIX) else adapter_key
    for suffix in LORA_FACTORS:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def base_model_prefix(model_type: Optional[str]) -> Optional[str]:
    """The causal-LM class's ``base_model_prefix`` for a config ``model_type`` (None when transformers lacks it)."""
    if not model_type:
        return None
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config_class = type(AutoConfig.for_model(model_type))
        return MODEL_FOR_CAUSAL_LM_MAPPING[config_class].base_model_prefix or None
    except (KeyError, ValueError):
        return None


def _candidates(path: str, prefixes: list[str]) -> list[str]:
    """The checkpoint names a module weight path may have: as is, with a known prefix dropped, added, or swapped."""
    stripped = [path] + [path[len(p) + 1:] for p in prefixes if path.startswith(p + ".")]
    out = list(stripped)
    for stem in stripped:
        out += [f"{prefix}.{stem}" for prefix in prefixes]
    return list(dict.fromkeys(out))


def resolve_tensor(tensor_path: str, checkpoint_names: set[str], prefixes: list[str], adapter_key: str) -> str:
    """The checkpoint tensor a module weight path refers to (exact name first); an error naming the key if none."""
    hits = [name for name in _candidates(tensor_path, prefixes) if name in checkpoint_names]
    if not hits:
        raise ContractError(
            f"adapter key {adapter_key} matches no tensor of the target checkpoint (looked for {tensor_path} and "
            f"prefix variants); was the adapter trained on another architecture?"
        )
    return hits[0]


def lora_scaling(config: dict, module: str, strength: float) -> float:
    """peft's scaling for one module (rank_pattern / alpha_pattern honoured, rsLoRA = alpha/sqrt(r)) times strength."""
    from peft.utils.other import get_pattern_key

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config["r"]) if rank_pattern else config["r"]
    alpha = (
        alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"])
        if alpha_pattern
        else config["lora_alpha"]
    )
    base = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return base * strength


def map_adapter(
    config: dict,
    tensors: dict[str, torch.Tensor],
    checkpoint_shapes: dict[str, tuple[int, ...]],
    model_type: Optional[str],
    strength: float,
) -> MergeTargets:
    """Pair every LoRA A with its B, find the checkpoint tensor each adapts, and check the shapes agree."""
    for key in tensors:
        for part, reason in UNSUPPORTED_PARTS.items():
            if part in key:
                raise ContractError(f"adapter key {key}: {reason}")
    own_prefix = base_model_prefix(model_type)
    prefixes = list(dict.fromkeys(([own_prefix] if own_prefix else []) + list(KNOWN_PREFIXES)))
    names = set(checkpoint_shapes)
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    targets = MergeTargets()
    factors: dict[str, dict[str, str]] = {}
    for key in tensors:
        kind = next((kind for suffix, kind in LORA_FACTORS.items() if key.endswith(suffix)), None)
        if kind is None:
            path = module_path(key).replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
            name = resolve_tensor(path, names, prefixes, key)
            if tuple(tensors[key].shape) != checkpoint_shapes[name]:
                raise ContractError(
                    f"adapter key {key} has shape {tuple(tensors[key].shape)} but checkpoint tensor {name} has "
                    f"{checkpoint_shapes[name]}: the adapter was trained on another architecture or size"
                )
            targets.full[name] = FullWeight(key, tensors[key])
            continue
        factors.setdefault(module_path(key), {})[kind] = key
    for module, keys in factors.items():
        if set(keys) != {"A", "B"}:
            missing = "lora_B" if "A" in keys else "lora_A"
            raise ContractError(f"adapter key {next(iter(keys.values()))} has no matching {missing} tensor")
        a, b = tensors[keys["A"]], tensors[keys["B"]]
        if a.dim() != 2 or b.dim() != 2:
            raise ContractError(
                f"adapter key {keys['A']} has shape {tuple(a.shape)}: only LoRA on linear and embedding layers "
                f"(2-D weights) can be merged by streaming"
            )
        transposed = keys["A"].endswith("lora_embedding_A") or fan_in_fan_out
        name = resolve_tensor(f"{module}.weight", names, prefixes, keys["A"])
        if a.shape[0] != b.shape[1]:
            raise ContractError(f"adapter key {keys['A']}: rank {a.shape[0]} differs from its lora_B ({b.shape[1]})")
        delta_shape = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
        if delta_shape != checkpoint_shapes[name]:
            raise ContractError(
                f"adapter key {keys['A']} gives a delta of shape {delta_shape} but checkpoint tensor {name} has "
                f"{checkpoint_shapes[name]}: the adapter was trained on another architecture or size"
            )
        targets.lora[name] = LoraPair(
            module, keys["A"], keys["B"], a, b, lora_scaling(config, module, strength), transposed
        )
    if not targets.lora and not targets.full:
        raise ContractError("the adapter holds no LoRA tensors to merge")
    return targets


def lora_factors(pair: LoraPair) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (left, right) with left @ right = B @ A in the checkpoint tensor's layout; left's rows follow its rows."""
    a, b = pair.a.float(), pair.b.float()
    return (a.T.contiguous(), b.T.contiguous()) if pair.transposed else (b, a)
