"""`gift-dist plan --dry-run`: walk the training and merge code paths of a model at a world size, without GPUs.

The model is built on the meta device from its config (a 70B one in seconds, no weights), and the code a real run
executes is run on it, as far as it goes without data or a process group:

1. the layout and the DeepSpeed config the trainer would use at this world size (``train.engine.choose_layout``
   and ``build_ds_config``, every "auto" filled, contradictions refused);
2. LoRA through peft with the trainer's target resolution (``models.lora_targets.resolve_target_modules``), the same
   targets the memory model counted (``model_shape``);
3. ZeRO-3's partition of every parameter (DeepSpeed gives each rank ceil(numel / world) elements of every
   parameter above the persistence threshold, and hpZ a second partition over the node's ranks): the bytes each
   rank holds, and that every LoRA tensor is persistent (never partitioned, so never gathered). With
   ``train.quantize_base`` a weight bitsandbytes packs (``memory_plan.quantizable_linears``) is a bf16 tensor of
   ``numel x QUANTIZED_WEIGHT_BYTES / 2`` elements (``bnb_4bit_quant_storage`` = bf16, as the trainer loads it):
   that is what ZeRO-3 partitions, and its constants stay whole on every rank;
4. the adapter gather's plan (``train.adapter_io``): exactly the LoRA tensors, each with its full shape: never a
   frozen tensor, never an empty or shape-[0] tensor (what peer tools have saved under ZeRO-3);
5. nothing that gathers the whole frozen model on one rank at save time
   (``stage3_gather_16bit_weights_on_model_save`` must be off);
6. the merge's plan over the instruct checkpoint as transformers shards it (``merge.names.map_adapter``,
   ``merge.stream.plan_output_shards``, ``working_bytes``): every LoRA pair finds its tensor, and no shard job holds more
   than one shard's bytes (plus one merged copy) in host memory.

Any failure is raised as the error the real run would raise, before a GPU is ever booked.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gift_dist.config import ConfigError, RunConfig
from gift_dist.contracts import ContractError
from gift_dist.memory_plan import BF16, QUANTIZED_WEIGHT_BYTES

# transformers' default max_shard_size: what an instruct checkpoint on the hub is cut into.
HF_SHARD_BYTES = 5 * 10**9


@dataclass
class DryRun:
    """What the dry run found (every figure per rank unless named otherwise)."""

    world: int
    ranks_per_node: int
    ds_config: str
    params: int
    lora_tensors: int
    lora_params: int
    partitioned_bytes_per_rank: int
    hpz_bytes_per_rank: int
    persistent_bytes: int
    largest_gathered_layer_params: int
    merge_shards: int
    largest_shard_bytes: int
    largest_merge_job_bytes: int
    # "bf16", or train.quantize_base ("nf4", "int8") for the weights bitsandbytes packs (the rest stay bf16).
    frozen_storage: str = "bf16"
    notes: list[str] = field(default_factory=list)


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _hf_shards(model: torch.nn.Module, dtype_bytes: int, max_shard_bytes: int) -> list[list[tuple[str, tuple]]]:
    """The checkpoint's tensors grouped into shards the way ``save_pretrained`` does: in state-dict order, a new
    shard when the next tensor would pass ``max_shard_bytes``."""
    shards: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for name, tensor in model.state_dict().items():
        nbytes = tensor.numel() * dtype_bytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(tensor.shape)))
        size += nbytes
    return shards


def _merge_plan(model_config, shards: list[list[tuple[str, tuple]]], peft_config: dict,
                lora_shapes: dict[str, tuple[int, int]]) -> tuple[int, int, int]:
    """(shards, largest shard bytes, largest shard job's bytes) of merging the adapter into the instruct checkpoint
    cut into ``shards`` (``_hf_shards``)."""
    from gift_dist.contracts.shardio import TensorRange
    from gift_dist.merge.names import map_adapter
    from gift_dist.merge.stream import TensorSource, plan_output_shards, working_bytes

    sources = []
    for index, shard in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        offset = 0
        for name, shape in shard:
            nbytes = math.prod(shape) * BF16
            sources.append(TensorSource(name, file, "BF16", list(shape),
                                        TensorRange(Path(file), offset, nbytes, "BF16", shape)))
            offset += nbytes
    adapter = {name: torch.empty(shape, device="meta") for name, shape in lora_shapes.items()}
    targets = map_adapter(peft_config, adapter, {s.name: tuple(s.shape) for s in sources},
                          getattr(model_config, "model_type", None), 1.0)
    if len(targets.lora) != len(lora_shapes) // 2:
        raise ContractError(f"dry run: {len(lora_shapes) // 2} LoRA pairs but {len(targets.lora)} found their "
                            f"checkpoint tensor")
    plans = plan_output_shards(sources, torch.bfloat16, None)
    largest = max(plan.nbytes for plan in plans)
    job = max(working_bytes(plan, targets) for plan in plans)
    return len(plans), largest, job


def dry_run(cfg: RunConfig, model: str, world: int, ranks_per_node: int,
            max_shard_bytes: int = HF_SHARD_BYTES) -> DryRun:
    """Walk the code paths of training ``model`` with ``cfg`` at ``world`` ranks and merging its adapter."""
    from peft import LoraConfig, get_peft_model

    from gift_dist.memory_plan import frozen_weight_bytes, load_shape_config, model_shape, quantizable_linears
    from gift_dist.train.adapter_io import _state_names, expected_lora_shapes
    from gift_dist.models.lora_targets import resolve_target_modules
    from gift_dist.train.engine import build_ds_config, choose_layout

    lora = cfg.train.lora
    shape = model_shape(model, lora.r, lora.target_modules, cfg.trust_remote_code)
    layout = choose_layout(cfg, world, shape)
    if layout.sharding != "zero3":
        raise ConfigError(f"plan --dry-run walks the ZeRO-3 layout; {layout.ds_config} is {layout.sharding}")
    ds = build_ds_config(cfg.train, layout, world, total_steps=1000, shape=shape)
    zero = ds["zero_optimization"]
    notes = []
    if zero.get("stage3_gather_16bit_weights_on_model_save"):
        raise ConfigError(f"{layout.ds_config}: stage3_gather_16bit_weights_on_model_save gathers every frozen "
                          f"weight on rank 0 at each save ({shape.total_params * BF16 / 2**30:.0f} GiB for this "
                          f"model); set it to false (the adapter is gathered on its own)")
    hpz = int(zero.get("zero_hpz_partition_size", 1) or 1)
    if hpz > 1 and ranks_per_node % hpz:
        raise ConfigError(f"{layout.ds_config}: zero_hpz_partition_size={hpz} does not divide the {ranks_per_node} "
                          f"ranks of a node; set it to the GPUs per node")
    threshold = int(zero["stage3_param_persistence_threshold"])

    model_config = load_shape_config(model, cfg.trust_remote_code)
    net = _meta_model(model_config)
    # The instruct checkpoint's tensors as transformers shards them (same names and shapes as the base's), read
    # before peft wraps the model in place.
    instruct_shards = _hf_shards(net, BF16, max_shard_bytes)
    quantize = cfg.train.quantize_base
    packed = {id(m.weight) for m in quantizable_linears(net)} if quantize != "none" else set()
    targets = resolve_target_modules(net, lora.target_modules)
    if tuple(targets) != shape.lora_targets:
        raise ContractError(f"dry run: the trainer's LoRA targets {targets} are not the memory model's "
                            f"{list(shape.lora_targets)}")
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                             use_rslora=lora.use_rslora, bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(net, peft_config)

    partitioned = hpz_bytes = persistent = 0
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            if param.numel() >= threshold:
                raise ContractError(f"dry run: LoRA tensor {name} ({param.numel()} elements) is above the "
                                    f"persistence threshold {threshold}: it would be partitioned and gathered")
            persistent += param.numel() * BF16
            continue
        stored = math.ceil(param.numel() * QUANTIZED_WEIGHT_BYTES[quantize] / BF16) if id(param) in packed \
            else param.numel()  # bf16 elements ZeRO-3 sees
        if stored < threshold:
            persistent += stored * BF16
            continue
        partitioned += math.ceil(stored / world) * BF16
        if hpz > 1:
            hpz_bytes += math.ceil(stored / hpz) * BF16

    gathered = _state_names(peft_model)
    expected = expected_lora_shapes(peft_model)
    frozen = [name for name, param in gathered.items() if ".lora_" not in name]
    if frozen:
        raise ContractError(f"dry run: the adapter gather would take frozen tensors {frozen[:3]}")
    if set(gathered) != set(expected):
        raise ContractError(f"dry run: the adapter gather's tensors {sorted(set(gathered) ^ set(expected))[:3]} do "
                            f"not match the LoRA layers")
    empty = [name for name, want in expected.items() if 0 in want or tuple(gathered[name].shape) != want]
    if empty:
        raise ContractError(f"dry run: LoRA tensors {empty[:3]} would be gathered empty or misshapen")

    peft_dict = json.loads(json.dumps(peft_config.to_dict(), default=sorted))
    shards, largest_shard, largest_job = _merge_plan(model_config, instruct_shards, peft_dict, expected)
    from gift_dist.merge.stream import BLOCK_ELEMENTS

    if largest_job > 2 * largest_shard + 4 * 4 * BLOCK_ELEMENTS:  # a shard, its merged copy, the fp32 blocks
        raise ContractError(f"dry run: a merge job would hold {largest_job / 2**30:.1f} GiB, more than one shard "
                            f"({largest_shard / 2**30:.1f} GiB) and its merged copy")
    if hpz > 1:
        notes.append(f"hpZ: a second copy of the frozen weights over each node's {hpz} ranks")
    if quantize != "none":
        weights, constants = frozen_weight_bytes(shape, quantize)
        notes.append(f"{quantize} base (train.quantize_base): {len(packed)} weights packed; bitsandbytes' constants "
                     f"{constants / 2**30:.2f} GiB whole on every rank; while it loads each rank holds the whole "
                     f"quantized base ({(weights + constants) / 2**30:.1f} GiB, plan's load row), checked against "
                     f"the GPU before any weight is read")
    return DryRun(world=world, ranks_per_node=ranks_per_node, ds_config=str(layout.ds_config),
                  params=shape.total_params, lora_tensors=len(expected),
                  lora_params=sum(math.prod(s) for s in expected.values()), partitioned_bytes_per_rank=partitioned,
                  hpz_bytes_per_rank=hpz_bytes, persistent_bytes=persistent,
                  largest_gathered_layer_params=shape.decoder_layer_params, merge_shards=shards,
                  largest_shard_bytes=largest_shard, largest_merge_job_bytes=largest_job,
                  frozen_storage=quantize if quantize != "none" else "bf16", notes=notes)


def _storage(frozen_storage: str) -> str:
    return "bf16" if frozen_storage == "bf16" else f"{frozen_storage} packed, the rest bf16"


def dry_run_report(result: DryRun) -> str:
    gib = 2**30
    lines = [
        f"dry run at world size {result.world} ({result.world // result.ranks_per_node} node(s) x "
        f"{result.ranks_per_node}), {Path(result.ds_config).name}: passed",
        f"  ZeRO-3 partition of {result.params / 1e9:.2f}B params: {result.partitioned_bytes_per_rank / gib:.2f} GiB "
        f"of frozen weights ({_storage(result.frozen_storage)}) per rank" + (f" + hpZ copy {result.hpz_bytes_per_rank / gib:.2f} GiB"
                                              if result.hpz_bytes_per_rank else ""),
        f"  persistent (never partitioned): {result.persistent_bytes / gib:.3f} GiB per rank, every LoRA tensor among "
        f"them; one decoder layer gathered at a time ({result.largest_gathered_layer_params / 1e6:.0f}M params)",
        f"  adapter gather: {result.lora_tensors} LoRA tensors ({result.lora_params / 1e6:.1f}M params), full "
        f"shapes, no frozen tensor; nothing gathers the frozen model at save",
        f"  merge: {result.merge_shards} instruct shards of <= {result.largest_shard_bytes / gib:.1f} GiB, every LoRA "
        f"pair mapped; largest shard job {result.largest_merge_job_bytes / gib:.1f} GiB of host memory",
    ]
    lines += [f"  {note}" for note in result.notes]
    return "\n".join(lines)
