"""`gift-dist plan`: how much memory training, scoring and merging a model needs, and which ds_config fits.

The model is built on the meta device from its config (no weights are read), so a 70B plan runs on a laptop.
Training memory uses DeepSpeed's own ZeRO-3 estimator for the trainable (LoRA) parameters; the frozen base
weights, which DeepSpeed's estimator would count as trainable (18 bytes/param), are added separately at their
real cost (bf16 shards, on GPU or offloaded). Activations are an estimate for gradient checkpointing.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

GIB = 1024**3
BF16 = 2


@dataclass
class ModelShape:
    name: str
    total_params: int
    largest_layer_params: int
    lora_params: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    largest_shard_bytes: Optional[int]


def _load_config(model: str):
    from transformers import AutoConfig

    path = Path(model)
    if path.is_file():
        return AutoConfig.for_model(**json.loads(path.read_text()))
    return AutoConfig.from_pretrained(model)


def model_shape(model: str, lora_r: int, target_modules: list[str]) -> ModelShape:
    from transformers import AutoModelForCausalLM

    config = _load_config(model)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in net.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in net.modules())
    lora = sum(
        lora_r * (m.in_features + m.out_features)
        for name, m in net.named_modules()
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in target_modules
    )
    shard_bytes = None
    if Path(model).is_dir():
        from gift_dist.models.checkpoint import weight_files

        shard_bytes = max(p.stat().st_size for p in weight_files(model))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelShape(
        name=model, total_params=total, largest_layer_params=largest, lora_params=lora,
        hidden_size=text.hidden_size, intermediate_size=getattr(text, "intermediate_size", 4 * text.hidden_size),
        num_layers=text.num_hidden_layers, vocab_size=text.vocab_size, largest_shard_bytes=shard_bytes,
    )


def training_plan(shape: ModelShape, gpus_per_node: int, nodes: int, micro_batch: int, seq_len: int,
                  ce_chunk_tokens: int) -> dict[str, dict[str, float]]:
    """Per-GPU and per-node bytes for the three shipped ZeRO-3 configs."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    world = gpus_per_node * nodes
    frozen_per_gpu = BF16 * shape.total_params / world
    tokens = micro_batch * seq_len
    # Gradient checkpointing keeps one hidden state per layer, plus one layer's working set during recompute,
    # plus the chunked output layer (logits + their gradient for one chunk).
    activations = (
        BF16 * tokens * shape.hidden_size * shape.num_layers
        + BF16 * tokens * (4 * shape.hidden_size + 3 * shape.intermediate_size)
        + 2 * 4 * min(ce_chunk_tokens, tokens) * shape.vocab_size
    )
    plans = {}
    for name, cpu_offload, offload_params in (
        ("zero3", False, False), ("zero3_offload", True, True), ("zero3_nvme", True, True)
    ):
        lora_cpu, lora_gpu, largest = estimate_zero3_model_states_mem_needs(
            shape.lora_params, shape.largest_layer_params, gpus_per_node, nodes,
            cpu_offload=cpu_offload, cpu_offload_params=offload_params,
        )
        if name == "zero3":
            gpu = lora_gpu + frozen_per_gpu + activations
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


def scoring_plan(shape: ModelShape, gpu_memory_gib: float, batch_tokens: int, chunk_tokens: int) -> dict:
    weights = BF16 * shape.total_params
    working = BF16 * batch_tokens * (4 * shape.hidden_size + 3 * shape.intermediate_size) + 4 * chunk_tokens * (
        shape.vocab_size
    ) * 2
    gpus = max(1, math.ceil((weights + working) / (0.9 * gpu_memory_gib * GIB)))
    return {"weights_gib": weights / GIB, "working_gib": working / GIB, "gpus_per_replica": gpus}


def merge_plan(shape: ModelShape) -> dict:
    shard = shape.largest_shard_bytes or 5 * 10**9  # transformers' default max_shard_size
    adapter = 4 * shape.lora_params
    return {"largest_shard_gib": shard / GIB, "adapter_gib": adapter / GIB, "peak_gib": (shard + adapter) / GIB}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model dir, hub id, or a config.json file")
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU (GiB)")
    parser.add_argument("--cpu-memory-gb", type=float, default=1024.0, help="RAM of one node (GiB)")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--ce-chunk-tokens", type=int, default=1024)
    parser.add_argument("--score-batch-tokens", type=int, default=16384)


def run(args: argparse.Namespace) -> int:
    from gift_dist.config import LoraConfig

    shape = model_shape(args.model, args.lora_r, LoraConfig().target_modules)
    train = training_plan(shape, args.gpus_per_node, args.nodes, args.micro_batch_size, args.seq_len,
                          args.ce_chunk_tokens)
    fits = next(
        (name for name, p in train.items()
         if p["gpu_gib"] <= 0.9 * args.gpu_memory_gb and p["cpu_per_node_gib"] <= 0.9 * args.cpu_memory_gb),
        None,
    )
    score = scoring_plan(shape, args.gpu_memory_gb, args.score_batch_tokens, args.ce_chunk_tokens)
    merge = merge_plan(shape)
    print(f"model {shape.name}: {shape.total_params / 1e9:.2f}B params, largest layer "
          f"{shape.largest_layer_params / 1e6:.0f}M, LoRA r={args.lora_r}: {shape.lora_params / 1e6:.1f}M trainable")
    print(f"training on {args.nodes} node(s) x {args.gpus_per_node} GPU(s), micro batch {args.micro_batch_size} x "
          f"{args.seq_len} tokens (DeepSpeed ZeRO-3 estimator for LoRA states + frozen bf16 weights + activations):")
    print(f"  {'ds_config':<15}{'per GPU GiB':>12}{'per node CPU GiB':>18}")
    for name, p in train.items():
        print(f"  {name:<15}{p['gpu_gib']:>12.1f}{p['cpu_per_node_gib']:>18.1f}")
    print(f"  fits {args.gpu_memory_gb:g} GiB GPUs / {args.cpu_memory_gb:g} GiB nodes: "
          f"{'ds_configs/' + fits + '.json' if fits else 'none: add nodes or GPUs'}")
    print(f"scoring replica (bf16): weights {score['weights_gib']:.1f} GiB + working set {score['working_gib']:.1f} "
          f"GiB -> {score['gpus_per_replica']} GPU(s) per replica (score.gpus_per_replica)")
    print(f"merge: peak ~{merge['peak_gib']:.1f} GiB RAM (largest shard {merge['largest_shard_gib']:.1f} GiB "
          f"+ adapter {merge['adapter_gib']:.2f} GiB), independent of model size")
    return 0
