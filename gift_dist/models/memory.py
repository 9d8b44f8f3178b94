"""How much memory training a model needs under each sharding, from its config alone (no weights read).

The model is built on the meta device, so a 70B estimate runs on a laptop. The LoRA states (weights, gradients,
fp32 master copy and Adam moments) come from DeepSpeed's own ZeRO-3 estimator; the frozen base weights, which that
estimator would count as trainable (18 bytes/param), are added at their real cost (bf16, whole on every GPU when
replicated, partitioned or offloaded under ZeRO-3). Activations are an estimate for gradient checkpointing.
``gift-dist plan`` prints these figures; ``train.sharding: auto`` decides with them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

GIB = 1024**3
BF16 = 2
# A plan "fits" when it needs at most this share of a GPU's (or node's) memory: the rest is the CUDA context,
# the allocator's fragmentation and the communication buffers.
USABLE_FRACTION = 0.9


@dataclass
class ModelShape:
    name: str
    total_params: int
    largest_layer_params: int
    decoder_layer_params: int
    lora_params: int
    largest_lora_tensor: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    largest_shard_bytes: Optional[int]
    num_attention_heads: int = 0
    num_key_value_heads: int = 0


def _load_config(model: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    path = Path(model)
    if path.is_file():
        return AutoConfig.for_model(**json.loads(path.read_text()))
    return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)


def decoder_layer_classes(model: torch.nn.Module) -> list[type]:
    """The classes transformers never splits across devices (the decoder layers): ZeRO-3's natural leaf modules."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return sorted({type(m) for m in model.modules() if type(m).__name__ in names}, key=lambda c: c.__name__)


def model_shape(model: str, lora_r: int, target_modules: list[str], trust_remote_code: bool = False) -> ModelShape:
    from transformers import AutoModelForCausalLM

    config = _load_config(model, trust_remote_code)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    total = sum(p.numel() for p in net.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in net.modules())
    layer_classes = tuple(decoder_layer_classes(net))
    layers = [m for m in net.modules() if layer_classes and isinstance(m, layer_classes)]
    layer_params = max((sum(p.numel() for p in m.parameters()) for m in layers), default=largest)
    targets = [m for name, m in net.named_modules()
               if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in target_modules]
    lora = sum(lora_r * (m.in_features + m.out_features) for m in targets)
    largest_lora = max((lora_r * max(m.in_features, m.out_features) for m in targets), default=0)
    shard_bytes = None
    if Path(model).is_dir():
        from gift_dist.models.checkpoint import weight_files

        shard_bytes = max(p.stat().st_size for p in weight_files(model))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelShape(
        name=model, total_params=total, largest_layer_params=largest, decoder_layer_params=layer_params,
        lora_params=lora, largest_lora_tensor=largest_lora, hidden_size=text.hidden_size,
        intermediate_size=getattr(text, "intermediate_size", 4 * text.hidden_size),
        num_layers=text.num_hidden_layers, vocab_size=text.vocab_size, largest_shard_bytes=shard_bytes,
        num_attention_heads=getattr(text, "num_attention_heads", 0) or 0,
        num_key_value_heads=getattr(text, "num_key_value_heads", None) or getattr(text, "num_attention_heads", 0) or 0,
    )


def activation_bytes(shape: ModelShape, tokens: int, ce_chunk_tokens: int, checkpointing: bool = True) -> int:
    """Activation memory of one micro-batch of ``tokens`` tokens, plus the chunked output layer (fp32 logits and
    their gradient for one chunk).

    With gradient checkpointing: one hidden state per layer, plus one layer's working set during recompute.
    Without: every layer keeps what its backward reads, ~2 * (16 H + 5 I) bytes per token (the norms' fp32 inputs,
    q/k/v and the attention output, the LoRA layers' dropped-out inputs, the MLP's gate, up and product). The
    coefficients were fitted to one measurement: 8B-shaped layers (H 4096, I 14336), 8,233 packed tokens, peak
    memory 15.55 GiB without and 7.30 GiB with checkpointing (H100, benchmarks/RESULTS.md, 2026-11-26).
    """
    head = 2 * 4 * min(ce_chunk_tokens, tokens) * shape.vocab_size
    if not checkpointing:
        return BF16 * tokens * (16 * shape.hidden_size + 5 * shape.intermediate_size) * shape.num_layers + head
    return (
        BF16 * tokens * shape.hidden_size * shape.num_layers
        + BF16 * tokens * (4 * shape.hidden_size + 3 * shape.intermediate_size)
        + head
    )


def training_plan(shape: ModelShape, gpus_per_node: int, nodes: int, tokens_per_micro_batch: int,
                  ce_chunk_tokens: int, checkpointing: bool = True) -> dict[str, dict[str, float]]:
    """Per-GPU and per-node GiB for each shipped layout: ``replicate`` (frozen base whole on every GPU, LoRA states
    partitioned by ZeRO stage 1) and the three ZeRO-3 configs, with or without gradient checkpointing."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    world = gpus_per_node * nodes
    activations = activation_bytes(shape, tokens_per_micro_batch, ce_chunk_tokens, checkpointing)
    # LoRA under ZeRO-1: bf16 weights and gradients everywhere, fp32 master + Adam moments (12 bytes) partitioned.
    lora_replicated = (2 + 2) * shape.lora_params + 12 * shape.lora_params / world
    plans = {"replicate": {"gpu_gib": (BF16 * shape.total_params + lora_replicated + activations) / GIB,
                           "cpu_per_node_gib": 0.0}}
    for name, cpu_offload, offload_params in (
        ("zero3", False, False), ("zero3_offload", True, True), ("zero3_nvme", True, True)
    ):
        lora_cpu, lora_gpu, _ = estimate_zero3_model_states_mem_needs(
            shape.lora_params, shape.largest_layer_params, gpus_per_node, nodes,
            cpu_offload=cpu_offload, cpu_offload_params=offload_params,
        )
        if name == "zero3":
            gpu = lora_gpu + BF16 * shape.total_params / world + activations
            cpu_node = lora_cpu
        elif name == "zero3_offload":
            gpu = lora_gpu + activations
            cpu_node = lora_cpu + BF16 * shape.total_params / nodes
        else:
            # Parameters live on NVMe; CPU holds pinned swap buffers (a few layers) and the LoRA optimizer.
            gpu = lora_gpu + activations
            cpu_node = lora_cpu + 4 * BF16 * shape.largest_layer_params * gpus_per_node
        plans[name] = {"gpu_gib": gpu / GIB, "cpu_per_node_gib": cpu_node / GIB}
    return plans


def first_fitting(plans: dict[str, dict[str, float]], gpu_memory_gib: float,
                  cpu_memory_gib: float) -> Optional[str]:
    """The first layout (fastest first: replicate, zero3, offload, nvme) that fits the GPUs and the nodes."""
    return next(
        (name for name, p in plans.items()
         if p["gpu_gib"] <= USABLE_FRACTION * gpu_memory_gib
         and p["cpu_per_node_gib"] <= USABLE_FRACTION * cpu_memory_gib),
        None,
    )
