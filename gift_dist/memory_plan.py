"""How much memory training a model needs under each sharding, from its config alone (no weights read).

The model is built on the meta device, so a 70B estimate runs on a laptop. Each layout is the shipped ds_config of
that name, read for the values that cost memory, and its figure is a sum of line items (``LINE_ITEMS``), each
printed by ``gift-dist plan``:

- LoRA states: DeepSpeed's own ZeRO-3 estimator on the LoRA parameters alone (18 bytes per parameter over the
  GPUs), plus their bf16 copies kept whole on every GPU (the persistence threshold keeps them unpartitioned);
  ZeRO-1's formula when replicated.
- frozen weights: bf16 (int8 with ``zero_quantized_nontrainable_weights``), whole when replicated, partitioned over
  all GPUs under ZeRO-3, in host memory when offloaded. DeepSpeed's estimator would count them as trainable
  (18 bytes/param); the frozen base has no gradients, fp32 master or Adam moments. With ``train.quantize_base``
  (bitsandbytes) the quantized weights are packed (``frozen_weight_bytes``) and their constants are held whole on
  every GPU.
- hpZ secondary copy (``zero_hpz_partition_size``): a second partition of the frozen weights over that many GPUs
  (a node), so backward gathers stay inside the node: weights / hpz_partition_size per GPU.
- gathered layer: the largest ZeRO-3 leaf module gathered while it computes (the output layer or one decoder
  layer, as stored: bf16, or packed with ``train.quantize_base``).
- dequantized weight (``train.quantize_base``): bitsandbytes multiplies by a bf16 copy of each quantized weight, one
  at a time: the largest one's.
- prefetch: ``stage3_prefetch_bucket_size`` parameters gathered ahead, at most ``stage3_max_live_parameters`` less
  the gathered layer (DeepSpeed caps the two together).
- reduce bucket: ``reduce_bucket_size`` elements of gradient buffer (twice with ``overlap_comm`` under ZeRO-1/2;
  fp32 when ZeRO-1 accumulates gradients in fp32), allocated at that size whatever the LoRA's.
- activations: the micro-batch's tokens (``train.micro_batch_tokens``, else micro batch x sequence length), see
  ``activation_bytes``.
- LoRA gather: each LoRA tensor gathered whole in fp32 for an adapter or checkpoint save (one tensor at a time on
  the GPU; the whole adapter in fp32 in every rank's host memory).

A quantized base (``train.quantize_base``) also has a load peak: transformers builds a bitsandbytes model without
``zero.Init``, quantizing every weight onto the rank's GPU, and ZeRO-3 partitions it only in
``deepspeed.initialize``; so each GPU holds the whole quantized base once (``load_gib``), and a layout's
``gpu_gib`` is the larger of that and its line items.

``gift-dist plan`` prints these figures; ``train.sharding: auto`` decides with them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

GIB = 1024**3
BF16 = 2
INT8 = 1
# The layouts planned, fastest first; ``first_fitting`` takes the first that fits among AUTO_CANDIDATES, the ones
# ``train.sharding: auto`` or a deliberate offload choice would use (zero3_multinode is a choice for several nodes).
LAYOUTS = ("replicate", "zero3", "zero3_offload", "zero3_nvme", "zero3_multinode")
AUTO_CANDIDATES = ("replicate", "zero3", "zero3_offload", "zero3_nvme")
# Per-GPU line items, in the order plan prints them.
LINE_ITEMS = {
    "lora_states": "LoRA states",
    "frozen_weights": "frozen weights",
    "hpz_secondary": "hpZ secondary copy",
    "gathered_layer": "gathered layer",
    "dequantized_weight": "dequantized weight",
    "prefetch": "prefetch",
    "reduce_bucket": "reduce bucket",
    "activations": "activations",
    "lora_gather": "LoRA gather (save)",
}
# Bytes per element of a weight bitsandbytes quantizes (train.quantize_base), as packed: nf4 holds two 4-bit codes
# per byte (in a tensor of the compute dtype, bnb_4bit_quant_storage, so ZeRO-3 partitions it like any weight).
QUANTIZED_WEIGHT_BYTES = {"nf4": 0.5, "int8": 1.0}
# bitsandbytes' nf4 blocks (transformers' BitsAndBytesConfig defaults): one absmax per 64 weights, and with double
# quantization one fp32 constant per 256 of those 8-bit absmaxes.
NF4_BLOCK = 64
NF4_NESTED_BLOCK = 256
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
    # The LoRA target names lora_params counts (train.lora.target_modules resolved against the model).
    lora_targets: tuple[str, ...] = ()
    # The weights bitsandbytes quantizes (train.quantize_base: every nn.Linear but those transformers keeps in full
    # precision, the output layer and tied weights): their elements and output rows, the largest one's elements,
    # and those of the largest decoder layer.
    quantizable_params: int = 0
    quantizable_rows: int = 0
    largest_quantizable_params: int = 0
    decoder_layer_quantizable_params: int = 0


def load_shape_config(model: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    path = Path(model)
    if path.is_file():
        return AutoConfig.for_model(**json.loads(path.read_text()))
    return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)


def decoder_layer_classes(model: torch.nn.Module) -> list[type]:
    """The classes transformers never splits across devices (the decoder layers): ZeRO-3's natural leaf modules."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return sorted({type(m) for m in model.modules() if type(m).__name__ in names}, key=lambda c: c.__name__)


def model_shape(model: str, lora_r: int, target_modules: Union[str, list[str]],
                trust_remote_code: bool = False) -> ModelShape:
    """The figures the memory model needs, from the model's config on the meta device; the LoRA ones for
    ``target_modules`` (``auto`` or names) as the trainer resolves them (``models.lora_targets``)."""
    from transformers import AutoModelForCausalLM

    config = load_shape_config(model, trust_remote_code)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    total = sum(p.numel() for p in net.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in net.modules())
    layer_classes = tuple(decoder_layer_classes(net))
    layers = [m for m in net.modules() if layer_classes and isinstance(m, layer_classes)]
    layer_params = max((sum(p.numel() for p in m.parameters()) for m in layers), default=largest)
    quantizable = quantizable_linears(net)
    layer_quantizable = max((sum(m.weight.numel() for m in layer.modules() if m in quantizable) for layer in layers),
                            default=0)
    from gift_dist.models.lora_targets import resolve_target_modules

    # The trainer's resolution (auto, fused layers, unknown names refused); peft adapts every layer of each name.
    resolved = resolve_target_modules(net, target_modules)
    names = set(resolved)
    targets = [m for name, m in net.named_modules() if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in names]
    lora = sum(lora_r * (m.in_features + m.out_features) for m in targets)
    largest_lora = max((lora_r * max(m.in_features, m.out_features) for m in targets), default=0)
    shard_bytes = None
    if Path(model).is_dir():
        from gift_dist.contracts.model_folder import weight_files

        shard_bytes = max(p.stat().st_size for p in weight_files(model))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelShape(
        name=model, total_params=total, largest_layer_params=largest, decoder_layer_params=layer_params,
        lora_params=lora, largest_lora_tensor=largest_lora, hidden_size=text.hidden_size,
        intermediate_size=getattr(text, "intermediate_size", 4 * text.hidden_size),
        num_layers=text.num_hidden_layers, vocab_size=text.vocab_size, largest_shard_bytes=shard_bytes,
        num_attention_heads=getattr(text, "num_attention_heads", 0) or 0,
        num_key_value_heads=getattr(text, "num_key_value_heads", None) or getattr(text, "num_attention_heads", 0) or 0,
        lora_targets=tuple(resolved),
        quantizable_params=sum(m.weight.numel() for m in quantizable),
        quantizable_rows=sum(m.out_features for m in quantizable),
        largest_quantizable_params=max((m.weight.numel() for m in quantizable), default=0),
        decoder_layer_quantizable_params=layer_quantizable,
    )


def quantizable_linears(net: torch.nn.Module) -> list[torch.nn.Linear]:
    """The linear layers bitsandbytes replaces when transformers loads ``net`` quantized: all but the modules its
    ``get_keys_to_not_convert`` keeps in full precision (the output layer, tied weights)."""
    from transformers.quantizers.base import get_keys_to_not_convert

    kept = set(get_keys_to_not_convert(net))
    return [m for name, m in net.named_modules() if isinstance(m, torch.nn.Linear) and name not in kept]


def quantization_constant_bytes(quantize: str, params: int, rows: int) -> float:
    """Bytes of the constants bitsandbytes keeps beside ``params`` packed weights of ``rows`` output rows. They are
    attributes of the parameters (nf4's QuantState, int8's SCB), not parameters: ZeRO-3 leaves them whole on every
    GPU.

    nf4 with double quantization: one 8-bit absmax per block of 64 weights and one fp32 constant per 256 of those,
    ``params/64 + 4 params/(64 x 256)`` bytes (0.127 bits per weight, the QLoRA paper's figure); int8 (LLM.int8):
    one fp32 scale per output row, ``4 rows``. Per-tensor constants (nf4's code book, ~1 KiB a weight) are left
    out."""
    if quantize == "nf4":
        return params / NF4_BLOCK + 4 * params / (NF4_BLOCK * NF4_NESTED_BLOCK)
    return 4.0 * rows


def frozen_weight_bytes(shape: ModelShape, quantize: str) -> tuple[float, float]:
    """(parameters, constants): bytes of the frozen weights as ZeRO-3 sees them. ``quantize`` "none": all bf16, no
    constants; "nf4" / "int8" (``train.quantize_base``): the quantizable weights packed
    (``QUANTIZED_WEIGHT_BYTES``), the rest (embeddings, output layer, norms) in bf16, plus
    ``quantization_constant_bytes``."""
    if quantize == "none":
        return float(BF16 * shape.total_params), 0.0
    packed = QUANTIZED_WEIGHT_BYTES[quantize] * shape.quantizable_params
    kept = BF16 * (shape.total_params - shape.quantizable_params)
    return packed + kept, quantization_constant_bytes(quantize, shape.quantizable_params, shape.quantizable_rows)


def gathered_layer_bytes(shape: ModelShape, quantize: str) -> float:
    """The largest ZeRO-3 leaf as stored: the output layer (never quantized, bf16) or a decoder layer (its
    quantizable weights packed, the rest bf16)."""
    quantized = shape.decoder_layer_quantizable_params if quantize != "none" else 0
    layer = BF16 * (shape.decoder_layer_params - quantized) + QUANTIZED_WEIGHT_BYTES.get(quantize, 0) * quantized
    return max(BF16 * shape.largest_layer_params, layer)


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


def shipped_ds_config(name: str) -> dict:
    """A shipped ds_config (``ds_configs/<name>.json``, installed as the package ``gift_dist.ds_configs``)."""
    from importlib import resources

    try:
        shipped = resources.files("gift_dist.ds_configs") / f"{name}.json"
        if shipped.is_file():
            return json.loads(shipped.read_text())
    except ModuleNotFoundError:
        pass
    return json.loads((Path(__file__).resolve().parents[1] / "ds_configs" / f"{name}.json").read_text())


def zero3_auto_sizes(shape: ModelShape) -> dict[str, int]:
    """The ZeRO-3 sizes an "auto" ds_config gets from the model (``train.engine`` fills them): LoRA tensors
    persistent (never partitioned), one decoder layer prefetched ahead, three alive at once (the one computing, the
    next, the one being released)."""
    return {
        # Above the largest LoRA tensor; frozen tensors that small (norms) stay whole too, which costs nothing.
        "stage3_param_persistence_threshold": max(shape.largest_lora_tensor + 1, 10_000),
        "stage3_prefetch_bucket_size": shape.decoder_layer_params,
        "stage3_max_live_parameters": 3 * shape.decoder_layer_params,
        "stage3_max_reuse_distance": 3 * shape.decoder_layer_params,
    }


@dataclass
class DsSettings:
    """What a ds_config sets that costs memory ("auto" resolved as ``train.engine`` resolves it)."""

    stage: int
    reduce_bucket_size: int
    overlap_comm: bool
    fp32_grad_accum: bool
    prefetch_bucket_size: int
    max_live_parameters: int
    hpz_partition_size: int
    quantized_frozen_weights: bool
    offload_param: Optional[str]
    offload_optimizer: Optional[str]


def ds_settings(config: dict, shape: ModelShape, quantized_frozen_weights: bool = False,
                hpz_partition_size: Optional[int] = None) -> DsSettings:
    """Read ``config``'s memory-relevant values; ``quantized_frozen_weights`` is ``train.quantized_frozen_weights``
    (the engine turns DeepSpeed's key on from it, ZeRO-3 only), ``hpz_partition_size`` overrides the config's."""
    zero = config.get("zero_optimization", {})
    auto = zero3_auto_sizes(shape)

    def value(key: str, default: int) -> int:
        got = zero.get(key, default)
        return int(auto.get(key, default) if got == "auto" else got)

    stage = int(zero.get("stage", 0))
    quantized = stage == 3 and (quantized_frozen_weights or zero.get("zero_quantized_nontrainable_weights") is True)
    return DsSettings(
        stage=stage,
        reduce_bucket_size=value("reduce_bucket_size", 500_000_000),
        overlap_comm=bool(zero.get("overlap_comm", stage == 3)),
        fp32_grad_accum=config.get("data_types", {}).get("grad_accum_dtype") == "fp32",
        prefetch_bucket_size=value("stage3_prefetch_bucket_size", 50_000_000) if stage == 3 else 0,
        max_live_parameters=value("stage3_max_live_parameters", 1_000_000_000) if stage == 3 else 0,
        hpz_partition_size=(hpz_partition_size if hpz_partition_size is not None
                            else value("zero_hpz_partition_size", 1)) if stage == 3 else 1,
        quantized_frozen_weights=quantized,
        offload_param=(zero.get("offload_param") or {}).get("device"),
        offload_optimizer=(zero.get("offload_optimizer") or {}).get("device"),
    )


def zero3_model_states_bytes(shape: ModelShape, gpus_per_node: int, nodes: int, cpu_offload: bool = False,
                             offload_params: bool = False) -> tuple[int, int]:
    """(per GPU, per node CPU) bytes of the LoRA states under ZeRO-3: DeepSpeed's estimator
    (``estimate_zero3_model_states_mem_needs``) on the LoRA parameters alone, with no largest-layer term (the
    gathered layer is a line item of its own, and in bf16 only: a frozen layer has no gradient).

    Against DeepSpeed's estimate for the whole model (``largest_layer_params`` and every parameter trainable:
    4 x largest layer + 18 bytes/param over the GPUs), ours differs like for like by exactly what a frozen base
    does not have: 16 bytes/param of gradient, fp32 master and Adam moments for every frozen parameter (it keeps
    its 2 bf16 bytes, ``frozen_weights``), and the gathered layer's gradient (2 x largest layer). The LoRA bf16
    weights, kept whole on every GPU, add ``2 x LoRA x (1 - 1/GPUs)`` on top (``training_plan``)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        shape.lora_params, 0, gpus_per_node, nodes, cpu_offload=cpu_offload, cpu_offload_params=offload_params)
    return gpu, cpu


def training_plan(shape: ModelShape, gpus_per_node: int, nodes: int, tokens_per_micro_batch: int,
                  ce_chunk_tokens: int, checkpointing: bool = True, quantized_frozen_weights: bool = False,
                  hpz_partition_size: Optional[int] = None, ds_configs: Optional[dict[str, dict]] = None,
                  quantize_base: str = "none") -> dict[str, dict]:
    """Per-GPU and per-node GiB for each layout of ``LAYOUTS`` (its shipped ds_config, or ``ds_configs[name]``),
    with or without gradient checkpointing: ``gpu_gib`` and ``cpu_per_node_gib`` totals, ``items`` /
    ``cpu_items``, the line items they sum (GiB), and ``load_gib``, the whole quantized base each GPU holds while a
    ``quantize_base`` model loads (0 otherwise; ``gpu_gib`` is the larger of it and the items' sum)."""
    world = gpus_per_node * nodes
    activations = activation_bytes(shape, tokens_per_micro_batch, ce_chunk_tokens, checkpointing)
    stored_params, stored_constants = frozen_weight_bytes(shape, quantize_base)
    gathered = gathered_layer_bytes(shape, quantize_base)
    # DeepSpeed counts the prefetch and live limits in stored elements: bf16, or nf4 packed into bf16 storage.
    leaf = gathered / BF16
    plans = {}
    for name in LAYOUTS:
        config = (ds_configs or {}).get(name) or shipped_ds_config(name)
        ds = ds_settings(config, shape, quantized_frozen_weights and name != "replicate", hpz_partition_size)
        # ZeRO++ int8 (train.quantized_frozen_weights) and bitsandbytes (train.quantize_base) exclude each other.
        params_bytes, constants_bytes = ((INT8 * shape.total_params, 0.0) if ds.quantized_frozen_weights
                                         else (stored_params, stored_constants))
        gpu: dict[str, float] = dict.fromkeys(LINE_ITEMS, 0.0)
        cpu: dict[str, float] = {"LoRA optimizer": 0.0, "frozen weights": 0.0, "LoRA gather (save)": 0.0}
        if ds.stage < 3:
            # LoRA under ZeRO-1: bf16 weights and gradients everywhere, fp32 master + Adam moments partitioned.
            gpu["lora_states"] = (2 + 2) * shape.lora_params + 12 * shape.lora_params / world
            gpu["frozen_weights"] = params_bytes + constants_bytes
            buffer = 4 if ds.fp32_grad_accum else BF16
            gpu["reduce_bucket"] = buffer * ds.reduce_bucket_size * (2 if ds.overlap_comm else 1)
        else:
            offload_opt = ds.offload_optimizer in ("cpu", "nvme")
            offload_params = ds.offload_param in ("cpu", "nvme")
            states_gpu, states_cpu = zero3_model_states_bytes(shape, gpus_per_node, nodes, offload_opt,
                                                              offload_params)
            gpu["lora_states"] = states_gpu + BF16 * shape.lora_params * (1 - 1 / world)
            cpu["LoRA optimizer"] = states_cpu
            # bitsandbytes' constants are not parameters: neither partitioned nor offloaded.
            gpu["frozen_weights"] = constants_bytes
            if ds.offload_param == "cpu":
                cpu["frozen weights"] = params_bytes / nodes
            elif ds.offload_param == "nvme":
                # Parameters live on NVMe; the host holds pinned swap buffers (a few layers per GPU).
                cpu["frozen weights"] = 4 * BF16 * shape.largest_layer_params * gpus_per_node
            else:
                gpu["frozen_weights"] += params_bytes / world
            if ds.hpz_partition_size > 1:
                gpu["hpz_secondary"] = params_bytes / ds.hpz_partition_size
            gpu["gathered_layer"] = gathered
            gpu["prefetch"] = BF16 * min(ds.prefetch_bucket_size, max(ds.max_live_parameters - leaf, 0))
            gpu["reduce_bucket"] = BF16 * ds.reduce_bucket_size
        if quantize_base != "none":
            gpu["dequantized_weight"] = BF16 * shape.largest_quantizable_params
        gpu["activations"] = activations
        gpu["lora_gather"] = 4 * shape.largest_lora_tensor
        cpu["LoRA gather (save)"] = 4 * shape.lora_params * gpus_per_node
        load = params_bytes + constants_bytes if quantize_base != "none" else 0.0
        plans[name] = {
            "gpu_gib": max(sum(gpu.values()), load) / GIB, "cpu_per_node_gib": sum(cpu.values()) / GIB,
            "load_gib": load / GIB, "frozen_params_gib": params_bytes / GIB,
            "items": {key: value / GIB for key, value in gpu.items()},
            "cpu_items": {key: value / GIB for key, value in cpu.items()},
            "hpz_partition_size": ds.hpz_partition_size, "quantized_frozen_weights": ds.quantized_frozen_weights,
            "prefetch_bucket_size": ds.prefetch_bucket_size, "max_live_parameters": ds.max_live_parameters,
            "reduce_bucket_size": ds.reduce_bucket_size,
        }
    return plans


def gathered_traffic_gib(plan: dict, checkpointing: bool) -> float:
    """GiB of frozen weights each GPU receives by all-gather per micro-batch under ZeRO-3: the base's parameters as
    stored (bf16, int8 with ZeRO++, packed with ``train.quantize_base``) once per pass (forward, the recompute when
    checkpointing, backward)."""
    passes = 3 if checkpointing else 2
    return passes * plan["frozen_params_gib"]


def first_fitting(plans: dict[str, dict[str, float]], gpu_memory_gib: float,
                  cpu_memory_gib: float) -> Optional[str]:
    """The first layout (fastest first: replicate, zero3, offload, nvme) that fits the GPUs and the nodes."""
    return next(
        (name for name, p in plans.items()
         if name in AUTO_CANDIDATES and p["gpu_gib"] <= USABLE_FRACTION * gpu_memory_gib
         and p["cpu_per_node_gib"] <= USABLE_FRACTION * cpu_memory_gib),
        None,
    )
