"""`gift-dist plan`: how much memory training, scoring and merging a model needs, and which layout fits.

The training figures are ``gift_dist.memory_plan``'s (the same model ``train.sharding: auto`` decides with);
the model is built on the meta device from its config, so a 70B plan runs on a laptop.
"""

from __future__ import annotations

import argparse
import math

from gift_dist.config import QUANTIZE_BASES
from gift_dist.memory_plan import (
    BF16,
    GIB,
    LINE_ITEMS,
    USABLE_FRACTION,
    ModelShape,
    first_fitting,
    frozen_weight_bytes,
    gathered_traffic_gib,
    model_shape,
    training_plan,
)


def scoring_plan(shape: ModelShape, gpu_memory_gib: float, gpus_per_node: int, batch_tokens: int,
                 chunk_tokens: int) -> dict:
    """The scoring layout ``score.parallel: auto`` takes for this model, and its memory per GPU (bf16).

    A replica of k tensor-parallel ranks holds 1/k of every decoder layer and of the output layer (split by
    vocabulary), and the whole input embedding (transformers' plan leaves it unsplit). Its working set: the
    batch's hidden states in full on every rank (residual, norm output, attention output, one spare: 4 H per
    token), the MLP's gate/up/product split k ways (3 I / k), and one chunk of fp32 logits and their exponentials
    over this rank's vocabulary slice. The smallest k that fits ``USABLE_FRACTION`` of a GPU is taken, among the
    divisors of the key/value heads up to a node's GPUs; when none fits, the layers are spread over more GPUs
    with ``device_map`` (``pipeline``: one GPU busy at a time)."""
    weights = BF16 * shape.total_params
    embedding = BF16 * shape.vocab_size * shape.hidden_size

    def per_gpu(k: int) -> tuple[float, float]:
        held = (weights - embedding) / k + embedding
        working = BF16 * batch_tokens * (4 * shape.hidden_size + 3 * shape.intermediate_size / k) + 2 * 4 * (
            min(chunk_tokens, batch_tokens) * shape.vocab_size / k)
        return held, working

    kv_heads = shape.num_key_value_heads or 1
    heads = shape.num_attention_heads or kv_heads
    sizes = [k for k in range(1, gpus_per_node + 1) if kv_heads % k == 0 and heads % k == 0 and gpus_per_node % k == 0]
    for k in sizes:
        held, working = per_gpu(k)
        if held + working <= USABLE_FRACTION * gpu_memory_gib * GIB:
            return {"parallel": "replica" if k == 1 else "tensor", "gpus_per_replica": k,
                    "replicas_per_node": gpus_per_node // k, "weights_gib": held / GIB, "working_gib": working / GIB,
                    "batch_tokens": batch_tokens}
    held, working = per_gpu(1)
    k = max(1, math.ceil((weights + working) / (USABLE_FRACTION * gpu_memory_gib * GIB)))
    return {"parallel": "pipeline", "gpus_per_replica": k, "replicas_per_node": max(1, gpus_per_node // k),
            "weights_gib": weights / k / GIB, "working_gib": working / GIB, "batch_tokens": batch_tokens}


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
    parser.add_argument("--micro-batch-tokens", type=int, default=0,
                        help="train.micro_batch_tokens: plan activations for this token budget per micro-batch "
                             "instead of micro batch size x sequence length")
    parser.add_argument("--quantized-frozen-weights", action="store_true",
                        help="train.quantized_frozen_weights: the frozen base in int8 under ZeRO-3 (ZeRO++)")
    parser.add_argument("--quantize-base", choices=QUANTIZE_BASES, default="none",
                        help="train.quantize_base: the frozen base loaded quantized by bitsandbytes (nf4: QLoRA)")
    parser.add_argument("--hpz-partition-size", type=int, default=None,
                        help="zero_hpz_partition_size of zero3_multinode (default: the shipped config's)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--ce-chunk-tokens", type=int, default=1024)
    parser.add_argument("--score-batch-tokens", type=int, default=16384)
    parser.add_argument("--dry-run", action="store_true",
                        help="also walk the ZeRO-3 training and merge code paths on the meta-device model at "
                             "nodes x gpus-per-node ranks (engine config, LoRA, partition, adapter gather, merge "
                             "plan over the instruct checkpoint's shards): no GPU, no weights")


def print_training_plan(args: argparse.Namespace, shape: ModelShape, train: dict, tokens: int) -> None:
    """The training part of the plan: each layout's totals, then the line items they sum (per GPU), and the
    ds_config values they were read from. zero3_multinode is shown for several nodes."""
    layouts = [name for name in train if name != "zero3_multinode" or args.nodes > 1]
    batch = (f"micro-batches of {args.micro_batch_tokens} tokens (train.micro_batch_tokens)"
             if args.micro_batch_tokens else f"micro batch {args.micro_batch_size} x {args.seq_len} tokens")
    frozen = "int8" if args.quantized_frozen_weights else "bf16"
    if args.quantize_base != "none":
        frozen = f"{args.quantize_base} (bitsandbytes, train.quantize_base)"
    print(f"training on {args.nodes} node(s) x {args.gpus_per_node} GPU(s), {batch}, frozen weights {frozen} "
          f"under ZeRO-3, gradient checkpointing on:")
    print(f"  LoRA targets (train.lora.target_modules: auto): {', '.join(shape.lora_targets)}")
    print(f"  {'layout':<17}{'per GPU GiB':>12}{'per node CPU GiB':>18}")
    for name in layouts:
        print(f"  {name:<17}{train[name]['gpu_gib']:>12.1f}{train[name]['cpu_per_node_gib']:>18.1f}")
    width = max(len(name) for name in layouts) + 1
    print(f"  {'per GPU GiB':<21}" + "".join(f"{name:>{width}}" for name in layouts))
    for key, label in LINE_ITEMS.items():
        print(f"  {label:<21}" + "".join(f"{train[name]['items'][key]:>{width}.2f}" for name in layouts))
    if args.quantize_base != "none":
        print(f"  {'load (whole base)':<21}" + "".join(f"{train[name]['load_gib']:>{width}.2f}" for name in layouts))
    print(f"  {'per node CPU GiB':<21}" + "".join(f"{name:>{width}}" for name in layouts))
    for key in train["zero3"]["cpu_items"]:
        print(f"  {key:<21}" + "".join(f"{train[name]['cpu_items'][key]:>{width}.2f}" for name in layouts))
    zero3 = train["zero3"]
    print(f"  ZeRO-3 sizes (ds_config \"auto\" from the model): stage3_prefetch_bucket_size "
          f"{zero3['prefetch_bucket_size'] / 1e6:.0f}M, stage3_max_live_parameters "
          f"{zero3['max_live_parameters'] / 1e6:.0f}M params, reduce_bucket_size {zero3['reduce_bucket_size'] / 1e6:.0f}M "
          f"(replicate: {train['replicate']['reduce_bucket_size'] / 1e6:.0f}M, fp32)")
    print(f"  all-gathered per micro-batch under ZeRO-3: {gathered_traffic_gib(zero3, True):.0f} GiB of frozen "
          f"weights per GPU ({frozen}; forward, recompute, backward)")
    if args.quantize_base != "none":
        print_quantized_base(shape, args.quantize_base)
    if args.nodes > 1:
        multi = train["zero3_multinode"]
        hpz = multi["hpz_partition_size"]
        note = "" if hpz == args.gpus_per_node else (
            f"; set zero_hpz_partition_size to the GPUs per node ({args.gpus_per_node}), not {hpz}")
        print(f"  zero3_multinode: hpZ over {hpz} GPU(s) (zero_hpz_partition_size), so the backward's gathers stay "
              f"inside a node, for {multi['items']['hpz_secondary']:.1f} GiB more per GPU{note}; "
              f"train.quantized_frozen_weights=true halves the frozen weights and the gathers (the LoRA then trains "
              f"against int8 base weights)")


def print_quantized_base(shape: ModelShape, quantize: str) -> None:
    """What a bitsandbytes base is made of, and why it has a load peak (``memory_plan``'s ``load_gib``)."""
    params, constants = frozen_weight_bytes(shape, quantize)
    kept = BF16 * (shape.total_params - shape.quantizable_params)
    print(f"  {quantize} base: {shape.quantizable_params / 1e9:.2f}B weights packed {(params - kept) / GIB:.1f} GiB + "
          f"constants {constants / GIB:.2f} GiB (whole on every GPU: not parameters, ZeRO-3 leaves them) + "
          f"{kept / GIB:.1f} GiB kept in bf16 (embeddings, output layer, norms); while the model loads each GPU "
          f"holds all {(params + constants) / GIB:.1f} GiB (transformers quantizes onto the GPU without zero.Init; "
          f"ZeRO-3 partitions it after), the \"load\" row, counted in the totals")


def run_dry(args: argparse.Namespace) -> int:
    """``--dry-run``: the ZeRO-3 training and merge code paths walked on the meta-device model (``dry_run``)."""
    from gift_dist.config import load_config
    from gift_dist.pipeline.dry_run import dry_run, dry_run_report

    ds_config = "zero3_multinode" if args.nodes > 1 else "zero3"
    cfg = load_config(None, [f"base_model={args.model}", "train.sharding=zero3", f"train.ds_config={ds_config}",
                             f"train.lora.r={args.lora_r}", f"train.micro_batch_size={args.micro_batch_size}",
                             f"train.quantize_base={args.quantize_base}"])
    print(dry_run_report(dry_run(cfg, args.model, args.nodes * args.gpus_per_node, args.gpus_per_node)))
    return 0


def run(args: argparse.Namespace) -> int:
    from gift_dist.config import LoraConfig

    shape = model_shape(args.model, args.lora_r, LoraConfig().target_modules)
    tokens = args.micro_batch_tokens or args.micro_batch_size * args.seq_len
    options = {"quantized_frozen_weights": args.quantized_frozen_weights,
               "hpz_partition_size": args.hpz_partition_size, "quantize_base": args.quantize_base}
    train = training_plan(shape, args.gpus_per_node, args.nodes, tokens, args.ce_chunk_tokens, **options)
    fits = first_fitting(train, args.gpu_memory_gb, args.cpu_memory_gb)
    score = scoring_plan(shape, args.gpu_memory_gb, args.gpus_per_node, args.score_batch_tokens, args.ce_chunk_tokens)
    merge = merge_plan(shape)
    print(f"model {shape.name}: {shape.total_params / 1e9:.2f}B params, largest layer "
          f"{shape.largest_layer_params / 1e6:.0f}M, LoRA r={args.lora_r}: {shape.lora_params / 1e6:.1f}M trainable")
    print_training_plan(args, shape, train, tokens)
    choice = "none: add nodes or GPUs"
    if args.quantize_base != "none" and train["zero3"]["load_gib"] > USABLE_FRACTION * args.gpu_memory_gb:
        choice = (f"none: each GPU holds the whole {args.quantize_base} base ({train['zero3']['load_gib']:.1f} GiB) "
                  f"while it loads, however many GPUs share it after")
    if fits:
        sharding = "replicate" if fits == "replicate" else "zero3"
        choice = f"ds_configs/{fits}.json (train.sharding: auto -> {sharding})"
    print(f"  fits {args.gpu_memory_gb:g} GiB GPUs / {args.cpu_memory_gb:g} GiB nodes: {choice}")
    if fits and fits != "replicate" and args.quantize_base != "none":
        print("  gradient checkpointing: on, required under ZeRO-3 with a quantized base (README, QLoRA)")
    elif fits:
        without = training_plan(shape, args.gpus_per_node, args.nodes, tokens, args.ce_chunk_tokens,
                                checkpointing=False, **options)[fits]["gpu_gib"]
        recompute = "off" if without <= USABLE_FRACTION * args.gpu_memory_gb else "on"
        print(f"  gradient checkpointing (train.gradient_checkpointing: auto): {recompute}; without recompute "
              f"{fits} needs {without:.1f} GiB per GPU")
    k = score["gpus_per_replica"]
    processes = args.gpus_per_node if score["parallel"] != "pipeline" else score["replicas_per_node"]
    if k > args.gpus_per_node:
        print(f"scoring (bf16): does not fit one node: {k} GPUs of {args.gpu_memory_gb:g} GiB per replica "
              f"({score['weights_gib'] + score['working_gib']:.1f} GiB each), a node has {args.gpus_per_node}; score "
              f"on nodes with more or larger GPUs (the scoring pool need not be the training pool)")
    else:
        print(f"scoring (bf16, {score['batch_tokens']} tokens per batch, score.parallel: auto -> {score['parallel']}): "
              f"{k} GPU(s) per replica (score.gpus_per_replica={k}), {score['replicas_per_node']} replica(s) per node, "
              f"{score['weights_gib'] + score['working_gib']:.1f} GiB per GPU (weights {score['weights_gib']:.1f} + "
              f"working set {score['working_gib']:.1f}); launch {processes} process(es) per node: torchrun "
              f"--nproc_per_node {processes} -m gift_dist score --config run.yaml score.gpus_per_replica={k}")
    print(f"merge: peak ~{merge['peak_gib']:.1f} GiB RAM (largest shard {merge['largest_shard_gib']:.1f} GiB "
          f"+ adapter {merge['adapter_gib']:.2f} GiB), independent of model size")
    if args.dry_run:
        print()
        return run_dry(args)
    return 0
