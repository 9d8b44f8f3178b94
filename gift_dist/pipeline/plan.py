"""`gift-dist plan`: how much memory training, scoring and merging a model needs, and which layout fits.

The training figures are ``gift_dist.models.memory``'s (the same model ``train.sharding: auto`` decides with);
the model is built on the meta device from its config, so a 70B plan runs on a laptop.
"""

from __future__ import annotations

import argparse
import math

from gift_dist.models.memory import (
    BF16,
    GIB,
    USABLE_FRACTION,
    ModelShape,
    first_fitting,
    model_shape,
    training_plan,
)


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
    train = training_plan(shape, args.gpus_per_node, args.nodes, args.micro_batch_size * args.seq_len,
                          args.ce_chunk_tokens)
    fits = first_fitting(train, args.gpu_memory_gb, args.cpu_memory_gb)
    score = scoring_plan(shape, args.gpu_memory_gb, args.score_batch_tokens, args.ce_chunk_tokens)
    merge = merge_plan(shape)
    print(f"model {shape.name}: {shape.total_params / 1e9:.2f}B params, largest layer "
          f"{shape.largest_layer_params / 1e6:.0f}M, LoRA r={args.lora_r}: {shape.lora_params / 1e6:.1f}M trainable")
    print(f"training on {args.nodes} node(s) x {args.gpus_per_node} GPU(s), micro batch {args.micro_batch_size} x "
          f"{args.seq_len} tokens (LoRA states + frozen bf16 weights + activations):")
    print(f"  {'layout':<15}{'per GPU GiB':>12}{'per node CPU GiB':>18}")
    for name, p in train.items():
        print(f"  {name:<15}{p['gpu_gib']:>12.1f}{p['cpu_per_node_gib']:>18.1f}")
    choice = "none: add nodes or GPUs"
    if fits:
        sharding = "replicate" if fits == "replicate" else "zero3"
        choice = f"ds_configs/{fits}.json (train.sharding: auto -> {sharding})"
    print(f"  fits {args.gpu_memory_gb:g} GiB GPUs / {args.cpu_memory_gb:g} GiB nodes: {choice}")
    if fits:
        without = training_plan(shape, args.gpus_per_node, args.nodes, args.micro_batch_size * args.seq_len,
                                args.ce_chunk_tokens, checkpointing=False)[fits]["gpu_gib"]
        recompute = "off" if without <= USABLE_FRACTION * args.gpu_memory_gb else "on"
        print(f"  gradient checkpointing (train.gradient_checkpointing: auto): {recompute}; without recompute "
              f"{fits} needs {without:.1f} GiB per GPU")
    print(f"scoring replica (bf16): weights {score['weights_gib']:.1f} GiB + working set {score['working_gib']:.1f} "
          f"GiB -> {score['gpus_per_replica']} GPU(s) per replica (score.gpus_per_replica)")
    print(f"merge: peak ~{merge['peak_gib']:.1f} GiB RAM (largest shard {merge['largest_shard_gib']:.1f} GiB "
          f"+ adapter {merge['adapter_gib']:.2f} GiB), independent of model size")
    return 0
