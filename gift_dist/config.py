"""The run config: one YAML file describes a whole GIFT run, every default lives here.

A run config is a tree of dataclasses. Loading validates every key against the dataclass fields (an unknown or
mistyped key is an error naming the key and the valid ones), coerces scalar types, and applies command-line
overrides of the form ``section.key=value`` (the value parsed as YAML, so ``train.lora.r=16`` is an int).
"""

from __future__ import annotations

import argparse

import dataclasses
import difflib
import importlib.util
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from gift_dist.errors import ConfigError


# Field metadata of settings that change how a run is operated (logging, checkpoint cadence, waiting), never what
# it produces: an output made with other values of these is still the same output. Every such list derives from
# this mark (``operational_keys``, ``result_settings``), so a new setting is result-changing unless marked.
OPERATIONAL = {"operational": True}


def doc(text: str, **extra: Any) -> dict[str, Any]:
    """A config field's metadata: its documentation (``help``, whitespace collapsed; shown by `gift-dist config`)
    merged with any other marks, e.g. ``field(default=1, metadata=doc("...", **OPERATIONAL))``."""
    return {"help": " ".join(text.split()), **extra}


def field_docs(cls: type) -> dict[str, str]:
    """The documentation of every field of a config dataclass, by field name (its ``help`` metadata)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def operational_keys(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("operational"))


def result_settings(cls: type, values: Any) -> dict[str, Any]:
    """The settings of a config section that shape what its stage produces: all but those marked operational.
    ``values``: the section (an instance of ``cls``) or its dict, as a record stored it. The one list both the
    trainer's record and the pipeline's "is this adapter current" check compare."""
    if dataclasses.is_dataclass(values):
        values = config_to_dict(values)
    operational = operational_keys(cls)
    return {key: value for key, value in values.items() if key not in operational}


RECORD_FORMATS = ("auto", "messages", "sharegpt", "prompt_response", "alpaca")
# How prepare groups records into prompts before it holds some out (prepare.split_key).
SPLIT_KEYS = ("any_user_turn", "user_turns", "first_user_turn", "none")


@dataclass
class DataSource:
    """One dataset of a mix (``data.sources``)."""

    path: Optional[str] = field(default=None, metadata=doc(
        "A local file (jsonl, json, parquet, csv; relative to the config file). Give exactly one of path and hub_id."))
    hub_id: Optional[str] = field(default=None, metadata=doc(
        "A datasets hub id, read with datasets.load_dataset (instead of path)."))
    split: str = field(default="train", metadata=doc("The split of hub_id to read."))
    revision: Optional[str] = field(default=None, metadata=doc(
        "The revision (branch, tag or commit) of hub_id; null: the hub's default."))
    format: Optional[Literal["auto", "messages", "sharegpt", "prompt_response", "alpaca"]] = field(
        default=None, metadata=doc("This source's record shape; null: data.format."))
    weight: Optional[float] = field(default=None, metadata=doc(
        "How much of this source the mix takes: its share of the weighted sources' total, from its usable records "
        "(down- or up-sampled, seeded by prepare.seed). Give weight or samples, not both; neither: all its records."))
    samples: Optional[int] = field(default=None, metadata=doc(
        "Exactly how many of this source's usable records the mix takes (repeated when above what it has). Give "
        "weight or samples, not both; neither: all its records."))

    def __post_init__(self) -> None:
        if (self.path is None) == (self.hub_id is None):
            raise ConfigError(f"a data.sources entry needs exactly one of path and hub_id, got {self}")
        if self.weight is not None and self.samples is not None:
            raise ConfigError(f"data.sources entry {self.name}: give weight or samples, not both")
        if self.weight is not None and not (0 < self.weight < float("inf")):
            raise ConfigError(f"data.sources entry {self.name}: weight must be a finite number > 0, got {self.weight}")
        if self.samples is not None and self.samples < 1:
            raise ConfigError(f"data.sources entry {self.name}: samples must be >= 1, got {self.samples}")

    @property
    def name(self) -> str:
        return self.path if self.path is not None else f"{self.hub_id}:{self.split}"


@dataclass
class DataConfig:
    """Where the training records come from and which columns hold what."""

    files: list[str] = field(default_factory=list, metadata=doc(
        "Local files (jsonl, json, parquet, csv) or one datasets hub id. Relative paths resolve against the config "
        "file."))
    sources: list[DataSource] = field(default_factory=list, metadata=doc(
        "Instead of files/hub_id: several datasets mixed by weight or sample count (each a path or hub_id with "
        "split, revision, format, weight, samples); each source's counts and drops are reported in prepared.json."))
    hub_id: Optional[str] = field(default=None, metadata=doc(
        "One datasets hub id to read instead of files (data.sources for several)."))
    hub_split: str = field(default="train", metadata=doc("The split of data.hub_id to read."))
    hub_revision: Optional[str] = field(default=None, metadata=doc(
        "The revision (branch, tag or commit) of data.hub_id; null: the hub's default."))
    format: Literal["auto", "messages", "sharegpt", "prompt_response", "alpaca"] = field(default="auto", metadata=doc(
        "Record shape: auto detects messages / sharegpt / prompt_response / alpaca from the columns present "
        "(record by record)."))
    messages_column: str = field(default="messages", metadata=doc(
        "The column of `messages` records: a list of {role, content} turns (roles system, user, assistant, tool), "
        "with tool_calls on assistant turns and a record's `tools` passed to the chat template."))
    conversations_column: str = field(default="conversations", metadata=doc(
        "The column of ShareGPT records (LLaMA-Factory, axolotl): a list of {\"from\": ..., \"value\": ...} turns, "
        "their speakers mapped by role_map; a record's `system` string becomes the system turn."))
    role_map: dict[str, str] = field(default_factory=lambda: {
        "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
        "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system",
        "function_call": "assistant", "observation": "tool", "tool": "tool"}, metadata=doc(
        "ShareGPT speaker names mapped to chat roles (an unmapped speaker drops the record). The defaults cover "
        "human/gpt/system, user/assistant as they are, and tool use: `function_call` turns (a JSON call) become "
        "the assistant's tool_calls, `observation` turns tool results; a record's `tools` (a list or its JSON "
        "string) reaches the chat template."))
    prompt_column: str = field(default="prompt", metadata=doc(
        "The user turn's column of prompt_response records."))
    response_column: str = field(default="response", metadata=doc(
        "The assistant turn's column of prompt_response records (the trained reply)."))
    system_column: Optional[str] = field(default=None, metadata=doc(
        "A column of prompt_response records whose non-empty value becomes the system turn; null: none."))
    instruction_column: str = field(default="instruction", metadata=doc(
        "The instruction column of alpaca records (the user turn)."))
    input_column: str = field(default="input", metadata=doc(
        "The optional input column of alpaca records, appended to the instruction after a blank line."))
    output_column: str = field(default="output", metadata=doc(
        "The output column of alpaca records (the trained reply)."))
    system_prompt: Optional[str] = field(default=None, metadata=doc(
        "Added as the first (system) turn of every record that has none; null: nothing added."))

    def __post_init__(self) -> None:
        if self.sources and (self.files or self.hub_id):
            raise ConfigError("data.sources replaces data.files and data.hub_id: list every dataset in data.sources")

    def all_sources(self) -> list[DataSource]:
        """The datasets to read, in order: data.sources, or one source per data.files entry, or data.hub_id."""
        if self.sources:
            return list(self.sources)
        if self.hub_id:
            return [DataSource(hub_id=self.hub_id, split=self.hub_split, revision=self.hub_revision)]
        return [DataSource(path=name) for name in self.files]


@dataclass
class PrepareConfig:
    """`gift-dist prepare`: records rendered with the chat template into token ids and labels, in shards."""

    max_length: int = field(default=2048, metadata=doc(
        "Most tokens of a rendered record (chat template included); longer ones are handled by overlength."))
    overlength: Literal["drop", "truncate"] = field(default="drop", metadata=doc(
        "A record over max_length: `drop` it (counted as over_length), or `truncate` it to max_length tokens (a "
        "record with no assistant token left is then dropped)."))
    train_on: Literal["all_assistant", "last_assistant"] = field(default="all_assistant", metadata=doc(
        "Which assistant turns are training targets: all of them, or only the last (earlier ones stay context)."))
    samples_per_shard: int = field(default=512, metadata=doc(
        "Records per prepared shard: the unit the scorer scores (and leases) and the trainer streams as it is "
        "scored."))
    num_proc: int = field(default=1, metadata=doc(
        "Processes that render records (datasets' map num_proc); the output does not depend on it.", **OPERATIONAL))
    strict: bool = field(default=False, metadata=doc(
        "Fail on the first unusable record instead of dropping it and counting the reason (also --strict).",
        **OPERATIONAL))
    seed: int = field(default=42, metadata=doc(
        "Seeds the order of the prepared records, the held-out split and the sampling of a data.sources mix."))
    eval_fraction: float = field(default=0.0, metadata=doc(
        "Share of the kept records held out for evaluation (prepared/eval/, disjoint from training, fixed by "
        "`seed`), at most `eval_max_samples` of them. 0: no held-out split."))
    eval_max_samples: int = field(default=2000, metadata=doc(
        "The most records held out for evaluation, whatever eval_fraction gives."))
    split_key: Literal["any_user_turn", "user_turns", "first_user_turn", "none"] = field(
        default="any_user_turn", metadata=doc(
            "What makes two records \"the same prompt\" for the held-out split: records with the same key go whole "
            "to one side. User text is compared whitespace collapsed and lower-cased. `any_user_turn` (default): "
            "records sharing any user turn are one group, transitively, so no held-out user turn is trained on, "
            "whichever turn it is in either record; `user_turns`: the text of all user turns together (a question "
            "asked alone and as a follow-up may then be on both sides); `first_user_turn`: the first user turn only; "
            "`none`: record by record. prepared.json reports the held-out records with a user turn trained on "
            "either way (0 by construction with `any_user_turn`)."))

    def __post_init__(self) -> None:
        for key in ("max_length", "samples_per_shard", "num_proc", "eval_max_samples"):
            _at_least(f"prepare.{key}", getattr(self, key), 1)
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"config key 'prepare.eval_fraction' must lie in [0, 1), got {self.eval_fraction}")
        if self.split_key not in SPLIT_KEYS:
            raise ConfigError(f"config key 'prepare.split_key' must be one of {list(SPLIT_KEYS)}, got "
                              f"{self.split_key!r}")


@dataclass
class ScoreConfig:
    """`gift-dist score`: the instruct model's probability of every target token, written as confidence shards."""

    max_batch_tokens: int = field(default=16384, metadata=doc(
        "Upper bound on padded tokens per forward batch (length-bucketed inside a shard)."))
    max_batch_size: int = field(default=64, metadata=doc("Upper bound on records per forward batch."))
    logprob_chunk_tokens: int = field(default=1024, metadata=doc(
        "Positions per chunk of the fp32 log-softmax, so [batch, seq, vocab] fp32 is never materialised."))
    logprob_dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata=doc(
        "The dtype the confidence shards store the per-token log-probabilities in (computed in fp32)."))
    record_entropy: bool = field(default=False, metadata=doc(
        "Also store the instruct model's entropy at every target position in the confidence shards (for "
        "analysis: no weighting reads it)."))
    gpus_per_replica: int = field(default=1, metadata=doc(
        "Devices one scoring replica spans (1: the whole instruct model on one GPU). A 70B model in bf16 needs "
        "more."))
    parallel: Literal["auto", "replica", "tensor", "pipeline"] = field(default="auto", metadata=doc(
        "How a replica of gpus_per_replica > 1 devices splits the model: `tensor` (transformers' tensor-parallel "
        "plan, one process per GPU, every GPU of the replica busy on every batch, the output layer split by "
        "vocabulary), `pipeline` (accelerate's device_map, one process per replica, its GPUs busy one at a time: "
        "for architectures without a tensor-parallel plan), `replica` (no split: gpus_per_replica must be 1), "
        "`auto` (replica at 1 GPU, else tensor where the architecture has a plan and its heads divide evenly, else "
        "pipeline)."))
    attn_implementation: str = field(default="auto", metadata=doc(
        "The attention kernel the instruct model is loaded with: `auto` (flash_attention_2 on a GPU when "
        "installed, else sdpa) or a transformers attn_implementation name."))
    lease_seconds: float = field(default=600.0, metadata=doc(
        "A worker that holds a shard refreshes its lease; a lease older than this is considered dead and "
        "retaken."))
    progress: bool = field(default=True, metadata=doc("Show a progress bar while scoring (one per replica leader)."))
    throttle_seconds: float = field(default=0.0, metadata=doc(
        "Debugging/testing only: every batch takes at least this long (to observe leases, kills and restarts)."))

    def __post_init__(self) -> None:
        for key in ("max_batch_tokens", "max_batch_size", "logprob_chunk_tokens", "gpus_per_replica"):
            _at_least(f"score.{key}", getattr(self, key), 1)
        if not self.lease_seconds > 0 or not self.throttle_seconds >= 0:
            raise ConfigError(f"config keys 'score.lease_seconds' must be > 0 and 'score.throttle_seconds' >= 0, got "
                              f"{self.lease_seconds} and {self.throttle_seconds}")
        if self.parallel == "replica" and self.gpus_per_replica != 1:
            raise ConfigError(f"config key 'score.parallel' is 'replica' (the whole model in one process) but "
                              f"'score.gpus_per_replica' is {self.gpus_per_replica}: set score.parallel to auto, "
                              f"tensor or pipeline, or gpus_per_replica to 1")


@dataclass
class LoraConfig:
    """The LoRA adapter trained (peft): ``train.lora``."""

    r: int = field(default=16, metadata=doc("The LoRA rank."))
    alpha: float = field(default=32.0, metadata=doc(
        "The LoRA alpha: updates are scaled by alpha/r (alpha/sqrt(r) with use_rslora)."))
    dropout: float = field(default=0.05, metadata=doc(
        "Dropout on the LoRA input in training, in [0, 1) (masks seeded by train.seed, so a resume repeats them)."))
    target_modules: Union[Literal["auto"], list[str]] = field(default="auto", metadata=doc(
        "Which linear layers LoRA adapts: `auto` (every linear layer of the decoder except the output layer and "
        "the mixture-of-experts routers and experts, resolved against the model when it is loaded: `gift-dist "
        "plan` and the train log print the names, the adapter's adapter_config.json records them; `gift-dist "
        "config` cannot know the model and shows `auto`), or a list of module names (q_proj, gate_proj, ...; all "
        "parts of a fused layer such as Phi-3's qkv_proj name it). A name the model has no linear layer of is an "
        "error listing the ones it has."))
    use_rslora: bool = field(default=False, metadata=doc(
        "Rank-stabilised LoRA: scale by alpha/sqrt(r) instead of alpha/r (recorded in adapter_config.json; merge "
        "follows it)."))

    def __post_init__(self) -> None:
        _at_least("train.lora.r", self.r, 1)
        if not (self.alpha > 0 and math.isfinite(self.alpha)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config keys 'train.lora.alpha' must be a finite number > 0 and 'train.lora.dropout' in "
                              f"[0, 1), got {self.alpha} and {self.dropout}")
        if isinstance(self.target_modules, str) and self.target_modules != "auto":
            raise ConfigError(f"config key 'train.lora.target_modules' must be auto or a list of module names, got "
                              f"{self.target_modules!r}")
        if not self.target_modules or (isinstance(self.target_modules, list) and not all(
                isinstance(name, str) and name.strip() for name in self.target_modules)):
            raise ConfigError(f"config key 'train.lora.target_modules' must be auto or a non-empty list of module "
                              f"names, got {self.target_modules!r}")


# Experiment trackers `train.report_to` may name.
TRACKERS = ("tensorboard", "wandb")


# train.quantize_base's values: the one list (the adapter contract, `plan` and `compare` read it).
QUANTIZE_BASES: tuple[str, ...] = ("none", "nf4", "int8")


@dataclass
class TrainConfig:
    """`gift-dist train`: the LoRA, the per-token weighting, the DeepSpeed layout and the optimisation."""

    train_model: Literal["base", "instruct"] = field(default="base", metadata=doc(
        "Which model the LoRA is trained on: `base` (GIFT / Shadow-FT / DFT) or `instruct` (direct fine-tuning)."))
    weighting: Literal["gift", "clipped", "mean_normalized", "uniform", "dft"] = field(default="gift", metadata=doc(
        "Per-token weight from the instruct model's probability q: gift (max(q, prob_floor)^gamma), clipped "
        "(clamped to [weight_min, weight_max]), mean_normalized (divided by its mean over the sample), uniform "
        "(1: Shadow-FT, no scoring needed), dft (the trained model's own detached probability)."))
    gamma: float = field(default=1.0, metadata=doc(
        "The exponent of q in the gift, clipped and mean_normalized weights (> 0; 1 in the authors' reference)."))
    prob_floor: float = field(default=1e-4, metadata=doc(
        "The floor under q before the exponent, in (0, 1) (1e-4 in the authors' reference)."))
    weight_min: float = field(default=0.0, metadata=doc("The lower clamp of the `clipped` weighting."))
    weight_max: float = field(default=1.0, metadata=doc("The upper clamp of the `clipped` weighting."))
    eos_weight: Union[float, Literal["scored"]] = field(default=1.0, metadata=doc(
        "The end-of-turn target's weight: a number (1.0 in the authors' reference), or `scored` to weight it like "
        "any token."))
    normalizer: Literal["sum_weights", "token_count"] = field(default="sum_weights", metadata=doc(
        "What the weighted CE sum is divided by: the sum of the weights, or the number of target tokens (DFT, "
        "whose weights exist only after the forward)."))
    normalize_over: Literal["global_batch", "per_micro_batch"] = field(default="global_batch", metadata=doc(
        "Normalise over the whole global batch (all ranks, all accumulation steps: results do not depend on how "
        "a batch is split) or each micro-batch (reproduces the reference exactly)."))
    lora: LoraConfig = field(default_factory=LoraConfig, metadata=doc("The LoRA adapter (peft) trained."))
    sharding: Literal["auto", "replicate", "zero3"] = field(default="auto", metadata=doc(
        "Where the frozen base lives: `replicate` (whole on every GPU; DeepSpeed manages only the LoRA states, "
        "ZeRO-1: the fastest, for every model that fits one GPU), `zero3` (partitioned over all GPUs: models that "
        "do not fit, 70B), `auto` (replicate when the memory model of `gift-dist plan` says it fits, else zero3)."))
    ds_config: str = field(default="auto", metadata=doc(
        "`auto` (the shipped config of the chosen sharding: ds_configs/replicate.json or zero3.json), a file path, "
        "or a shipped name (replicate, zero3, zero3_offload, zero3_nvme, zero3_multinode); it must agree with "
        "`sharding`."))
    quantized_frozen_weights: bool = field(default=False, metadata=doc(
        "Keep the frozen base in int8 under ZeRO-3 (DeepSpeed ZeRO++ `zero_quantized_nontrainable_weights`): its "
        "partitions, hpZ copies and all-gathers take half the memory and traffic, but the LoRA then trains against "
        "an int8 copy of the base and is merged into bf16 weights. Off unless chosen here (a ds_config that turns "
        "it on by itself is refused); only with a ZeRO-3 layout. The log, the adapter's provenance and merge say "
        "so."))
    # The annotation names QUANTIZE_BASES: evaluated by typing.get_type_hints, it is Literal of its values.
    quantize_base: Literal[QUANTIZE_BASES] = field(default="none", metadata=doc(  # type: ignore[valid-type]
        "Load the model the LoRA trains on (the base; the instruct model with train_model=instruct) quantized by "
        "bitsandbytes, frozen: `nf4` (QLoRA: 4-bit NormalFloat, blocks of 64 with double-quantized constants, "
        "computing in the training dtype), `int8` (LLM.int8), `none` (the training dtype). Needs `pip install "
        "'gift-dist[qlora]'`. Works under replicate and zero3 (ZeRO-3 with gradient checkpointing on: see "
        "README, QLoRA); `gift-dist plan --quantize-base` counts it. The LoRA learns against the quantized base but "
        "is merged into the full-precision instruct weights: the adapter's provenance records it and merge says so."))
    nvme_path: str = field(default="", metadata=doc(
        "A folder on each node's local NVMe for the `zero3_nvme` layout's parameter swap files (the shipped "
        "ds_configs/zero3_nvme.json takes it for its \"auto\" nvme_path; that layout is refused without it).",
        **OPERATIONAL))
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention",
                                 "gift_varlen"] = field(default="auto", metadata=doc(
        "Attention kernel: `auto` = for packed rows on a GPU a varlen kernel (flash_attention_2 when installed, "
        "else torch's own, `gift_varlen`), else sdpa; or one of these by name."))
    micro_batch_size: int = field(default=4, metadata=doc(
        "Samples per micro-batch per rank (unless micro_batch_tokens is set)."))
    micro_batch_tokens: int = field(default=0, metadata=doc(
        "A token budget per micro-batch instead of a sample count (0: off): each micro-batch takes whole samples in "
        "order while their tokens (padding included when not packed) stay within it, so every micro-batch costs "
        "about the same memory and time, and activation memory is planned on the budget (`gradient_checkpointing: "
        "auto`). A step is still gradient_accumulation_steps micro-batches per rank; the samples per step vary."))
    gradient_accumulation_steps: int = field(default=1, metadata=doc(
        "Micro-batches per rank per optimizer step: the global batch is micro_batch_size x this x ranks."))
    epochs: int = field(default=1, metadata=doc(
        "Passes over the prepared training records (max_steps may stop earlier)."))
    max_steps: int = field(default=-1, metadata=doc(
        "Stop after this many optimizer steps (-1: no cap, the epochs decide)."))
    learning_rate: float = field(default=2e-4, metadata=doc(
        "The peak learning rate (after warmup) of the optimizer: AdamW unless the ds_config names another."))
    weight_decay: float = field(default=0.0, metadata=doc("The optimizer's weight decay on the LoRA weights."))
    warmup_steps: int = field(default=0, metadata=doc("Optimizer steps of linear learning-rate warmup."))
    lr_scheduler: Literal["cosine", "linear", "constant"] = field(default="cosine", metadata=doc(
        "The learning-rate schedule after warmup, down to 0 over the run (cosine, linear) or held (constant)."))
    max_grad_norm: float = field(default=1.0, metadata=doc(
        "Gradient clipping by global norm (DeepSpeed gradient_clipping); 0: no clipping."))
    gradient_checkpointing: Union[bool, Literal["auto"]] = field(default="auto", metadata=doc(
        "Recompute each decoder layer in backward instead of keeping its activations: `auto` turns it off on a "
        "GPU when the memory model of `gift-dist plan` says the activations of the largest micro-batch fit (a step "
        "is then ~15-20% faster), on otherwise. Changes memory and speed, never results.", **OPERATIONAL))
    packing: Union[bool, Literal["auto"]] = field(default="auto", metadata=doc(
        "Each micro-batch as one row of samples back to back (no padding, attention kept within each sample); "
        "`auto` packs on GPUs, where padded positions cost real arithmetic, and pads on CPU."))
    ce_chunk_tokens: int = field(default=1024, metadata=doc(
        "Positions per chunk through the output layer: full-vocab logits of a long sequence never sit in memory."))
    liger_kernels: bool = field(default=False, metadata=doc(
        "Liger's Triton kernels for RMSNorm, SwiGLU and RoPE (GPU only; `pip install liger-kernel`). Off by "
        "default: benchmarks/RESULTS.md records where they measured faster. Our chunked weighted CE is kept "
        "either way.", **OPERATIONAL))
    save_every_steps: int = field(default=200, metadata=doc(
        "A checkpoint (under checkpoints/, resumable with --resume) every this many optimizer steps.",
        **OPERATIONAL))
    keep_checkpoints: int = field(default=2, metadata=doc(
        "How many of the latest checkpoints are kept; older ones are deleted.", **OPERATIONAL))
    log_every_steps: int = field(default=1, metadata=doc(
        "Metrics to logs/train_metrics.jsonl and the trackers (and a log line without a progress bar) every this "
        "many steps; the last step always.", **OPERATIONAL))
    eval_every_steps: int = field(default=0, metadata=doc(
        "With a held-out split (prepare.eval_fraction > 0): its CE every this many steps (0: only after the last "
        "step), in the metrics log, TensorBoard and the loss plot.", **OPERATIONAL))
    confidence_wait_seconds: float = field(default=3600.0, metadata=doc(
        "How long the trainer waits for the scorer to finish the shard it needs next.", **OPERATIONAL))
    confidence_poll_seconds: float = field(default=5.0, metadata=doc(
        "How often the waiting trainer looks for that shard.", **OPERATIONAL))
    progress: bool = field(default=True, metadata=doc(
        "Show a progress bar with loss and tokens/s on rank 0 (else a log line every log_every_steps).",
        **OPERATIONAL))
    report_to: list[str] = field(default_factory=list, metadata=doc(
        "Where the per-step metrics go besides logs/train_metrics.jsonl and logs/train_loss.png, which every run "
        "writes: `tensorboard` (logs/tensorboard; pip install 'gift-dist[tensorboard]'), `wandb` (pip install "
        "'gift-dist[wandb]'; WANDB_MODE=offline works without a network). Each also gets the run config and the "
        "scorer's confidence summary. Default []: no tracker, nothing that `pip install -e .` leaves out.",
        **OPERATIONAL))
    wandb_project: str = field(default="gift-dist", metadata=doc(
        "The W&B project; the run is named after output_dir and resumes with it.", **OPERATIONAL))
    seed: int = field(default=42, metadata=doc(
        "Seeds the LoRA initialisation (identical on every rank), the per-step dropout masks (so a resumed run "
        "repeats them) and the data order of every epoch: epoch 0 shuffled within each scorer shard (the shards "
        "keep prepare's order, so training still streams them as the scorer finishes them), later epochs whole. "
        "The order is a function of (seed, epoch) only, so a resumed run continues it exactly; `compare`'s seeds "
        "differ in it."))

    def __post_init__(self) -> None:
        """Ranges, checked when the config is loaded: before any model, data or process group is touched."""
        for key in ("micro_batch_size", "gradient_accumulation_steps", "epochs", "save_every_steps",
                    "keep_checkpoints", "log_every_steps", "ce_chunk_tokens"):
            _at_least(f"train.{key}", getattr(self, key), 1)
        for key in ("eval_every_steps", "warmup_steps", "micro_batch_tokens"):
            _at_least(f"train.{key}", getattr(self, key), 0)
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"config key 'train.max_steps' must be -1 (no cap) or >= 1, got {self.max_steps}")
        if not (self.learning_rate > 0 and self.learning_rate < float("inf")):
            raise ConfigError(f"config key 'train.learning_rate' must be a finite number > 0, got {self.learning_rate}")
        if not self.max_grad_norm >= 0:
            raise ConfigError(f"config key 'train.max_grad_norm' must be >= 0, got {self.max_grad_norm}")
        # The weight formula's settings: `score` uses them too (its token view), so they are refused here, not
        # when training starts.
        if not (self.gamma > 0 and math.isfinite(self.gamma)):
            raise ConfigError(f"config key 'train.gamma' must be a finite number > 0, got {self.gamma}")
        if not 0.0 < self.prob_floor < 1.0:
            raise ConfigError(f"config key 'train.prob_floor' must lie in (0, 1), got {self.prob_floor}")
        if not self.weight_min <= self.weight_max:
            raise ConfigError(f"config key 'train.weight_min' must be <= 'train.weight_max' (the clamp of the "
                              f"clipped weighting), got {self.weight_min} and {self.weight_max}")
        if self.eos_weight != "scored" and (isinstance(self.eos_weight, bool) or not (
                math.isfinite(self.eos_weight) and self.eos_weight >= 0)):
            raise ConfigError(f"config key 'train.eos_weight' must be 'scored' or a finite number >= 0, got "
                              f"{self.eos_weight}")
        unknown = sorted(set(self.report_to) - set(TRACKERS))
        if unknown:
            raise ConfigError(f"config key 'train.report_to': unknown tracker(s) {unknown}; choose from {TRACKERS}")
        if not self.confidence_poll_seconds > 0:
            raise ConfigError(f"config key 'train.confidence_poll_seconds' must be > 0, got "
                              f"{self.confidence_poll_seconds}")
        if not self.confidence_wait_seconds >= 0:
            raise ConfigError(f"config key 'train.confidence_wait_seconds' must be >= 0, got "
                              f"{self.confidence_wait_seconds}")
        if not isinstance(self.quantized_frozen_weights, bool):
            raise ConfigError(f"config key 'train.quantized_frozen_weights' must be true or false, got "
                              f"{self.quantized_frozen_weights!r}")
        if self.quantized_frozen_weights and self.sharding == "replicate":
            raise ConfigError("train.quantized_frozen_weights=true keeps the frozen base in int8 under ZeRO-3, but "
                              "train.sharding=replicate holds it whole in bf16: set train.sharding=zero3")
        if self.quantized_frozen_weights and self.sharding == "auto" and self.ds_config == "auto":
            raise ConfigError("train.quantized_frozen_weights=true needs a ZeRO-3 layout, which train.sharding=auto "
                              "may not pick: set train.sharding=zero3 (or train.ds_config=zero3_multinode)")
        self._check_quantize_base()

    def _check_quantize_base(self) -> None:
        """``quantize_base``: refused, one line each, where it cannot work."""
        if self.quantize_base == "none":
            return
        setting = f"train.quantize_base={self.quantize_base}"
        if self.quantized_frozen_weights:
            raise ConfigError(f"{setting} and train.quantized_frozen_weights=true both quantize the frozen base: "
                              f"choose one (train.quantized_frozen_weights=false keeps {self.quantize_base})")
        # bitsandbytes' matmul keeps a view of the packed weight for its backward, whose storage ZeRO-3 has released
        # by then; gradient checkpointing's recompute multiplies again with the weight gathered anew (the engine
        # checks the same once a ds_config has resolved the layout).
        if self.sharding == "zero3" and self.gradient_checkpointing is False:
            raise ConfigError(f"{setting} under train.sharding=zero3 needs gradient checkpointing: set "
                              f"train.gradient_checkpointing=auto (or true)")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"{setting} needs bitsandbytes, which is not installed: pip install "
                              f"'gift-dist[qlora]' (or set train.quantize_base=none)")

    def global_batch(self, world: int) -> int:
        """Samples per optimizer step over all ranks: micro batch x gradient accumulation x ranks. With a token
        budget (``micro_batch_tokens``) the samples per step vary and this is the nominal figure DeepSpeed and the
        resume check use; ``micro_batches_per_step`` is what stays fixed."""
        return self.micro_batch_size * self.gradient_accumulation_steps * world

    def micro_batches_per_step(self, world: int) -> int:
        return self.gradient_accumulation_steps * world

    def packs(self, on_gpu: bool) -> bool:
        """Whether micro-batches are packed (``packing: auto`` resolved for the device)."""
        return on_gpu if self.packing == "auto" else bool(self.packing)


@dataclass
class EvalConfig:
    """`gift-dist eval` and `gift-dist compare`: task metrics on prepare's held-out split, preservation on a general
    chat set."""

    general_files: list[str] = field(default_factory=list, metadata=doc(
        "Chat records (jsonl with `messages`) the models should still handle like the instruct model; their last "
        "assistant replies are scored (CE, and KL to the instruct model). Relative paths resolve like data.files. "
        "`prepare` counts their records with a user turn (whitespace collapsed, lower-cased) that also appears "
        "in the training data: a warning, and `eval_files` in prepared.json (measured on the files named then)."))
    answer_pattern: str = field(default="answer_is", metadata=doc(
        "How to find the answer in a reply: answer_is (\"The answer is N\"), gsm8k (\"#### N\"), boxed "
        "(\\boxed{..}), last_number, or a regex whose first group is the answer."))
    max_new_tokens: int = field(default=96, metadata=doc("Most tokens generated per reply (greedy)."))
    batch_size: int = field(default=16, metadata=doc(
        "Records per batch for the CE and KL passes and generation (and lm-evaluation-harness)."))
    max_generate_samples: int = field(default=500, metadata=doc(
        "Held-out samples whose replies are generated (greedy) and checked; 0: teacher-forced CE only."))
    max_general_samples: int = field(default=1000, metadata=doc(
        "The most records read from general_files (in file order)."))
    models: list[str] = field(default_factory=list, metadata=doc(
        "More models to evaluate beside instruct and the run's merged/: NAME=PATH or a path."))
    lm_eval_tasks: list[str] = field(default_factory=list, metadata=doc(
        "lm-evaluation-harness tasks run on every model too (needs `pip install 'gift-dist[eval]'`), e.g. gsm8k, "
        "ifeval."))
    lm_eval_include: Optional[str] = field(default=None, metadata=doc(
        "A folder of your own lm-evaluation-harness task YAMLs (local datasets work offline); null: the "
        "harness's own tasks only."))
    lm_eval_chat_template: bool = field(default=False, metadata=doc(
        "Format each lm-evaluation-harness request with the model's chat template (the harness's "
        "apply_chat_template; few-shot examples as turns of the conversation): how instruct models are meant to "
        "be prompted."))
    lm_eval_fewshot: Optional[int] = field(default=None, metadata=doc(
        "Few-shot examples per lm-evaluation-harness request; null: each task's own default."))
    lm_eval_limit: Optional[int] = field(default=None, metadata=doc(
        "The most documents lm-evaluation-harness scores per task; null: all (a smoke test, not a benchmark "
        "number)."))

    def __post_init__(self) -> None:
        """Ranges, checked when the config is loaded: not after the models are loaded or an hour of evaluation."""
        for key in ("max_new_tokens", "batch_size", "max_general_samples"):
            _at_least(f"eval.{key}", getattr(self, key), 1)
        _at_least("eval.max_generate_samples", self.max_generate_samples, 0)
        if self.lm_eval_fewshot is not None:
            _at_least("eval.lm_eval_fewshot", self.lm_eval_fewshot, 0)
        if self.lm_eval_limit is not None and self.lm_eval_limit < 1:
            raise ConfigError(f"config key 'eval.lm_eval_limit' must be >= 1, or null for all documents, got "
                              f"{self.lm_eval_limit}")


@dataclass
class MergeConfig:
    """`gift-dist merge`: the adapter merged into full model weights, streamed shard by shard."""

    into: Literal["instruct", "base"] = field(default="instruct", metadata=doc(
        "Which model the adapter is merged into: the instruct sibling (GIFT) or the base (for comparisons)."))
    scale: float = field(default=1.0, metadata=doc(
        "Blend strength: W + scale x (the adapter's delta); 1: the adapter as trained."))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata=doc(
        "The merged weights' dtype: `auto` keeps each tensor's dtype of the target model (the delta is computed "
        "in fp32 and cast)."))
    max_shard_size: Optional[str] = field(default=None, metadata=doc(
        "Largest output shard, a size like 5GB; null: the target model's own shard layout (the same weights split "
        "into other files).", **OPERATIONAL))
    threads: int = field(default=2, metadata=doc("Threads that merge tensors in parallel.", **OPERATIONAL))
    memory_budget_gb: float = field(default=8.0, metadata=doc(
        "The byte budget (GiB) that admits shards to the parallel merge threads, so parallelism never multiplies "
        "the peak memory past it.", **OPERATIONAL))
    verify: bool = field(default=True, metadata=doc(
        "Verify the merged model after writing it (as `gift-dist verify-merge`).", **OPERATIONAL))
    overwrite: bool = field(default=False, metadata=doc(
        "Replace an existing merged folder (also --overwrite); else a merged folder already there is refused.",
        **OPERATIONAL))
    verify_sample_tensors: int = field(default=8, metadata=doc(
        "Verification: how many merged tensors are recomputed from the inputs for checkpoints up to "
        "verify_logits_max_gb (bigger ones get every adapted tensor recomputed).", **OPERATIONAL))
    verify_logits_max_gb: float = field(default=2.0, metadata=doc(
        "Verification: logits compared with peft only for checkpoints up to this size (both models are loaded "
        "whole, in fp32).", **OPERATIONAL))
    progress: bool = field(default=True, metadata=doc("Show a progress bar (bytes written) while merging.",
                                                      **OPERATIONAL))
    allow_other_instruct: bool = field(default=False, metadata=doc(
        "Merge into an instruct model other than the one the adapter was scored and trained for (its hash differs "
        "from the one gift_adapter.json records): refused unless true; the merge record then says so. A permission: "
        "the merged weights are the same either way.", **OPERATIONAL))

    def __post_init__(self) -> None:
        if not isinstance(self.allow_other_instruct, bool):
            raise ConfigError(f"config key 'merge.allow_other_instruct' must be true or false, got "
                              f"{self.allow_other_instruct!r}")
        _at_least("merge.threads", self.threads, 1)
        _at_least("merge.verify_sample_tensors", self.verify_sample_tensors, 0)
        if not math.isfinite(self.scale):
            raise ConfigError(f"config key 'merge.scale' must be a finite number, got {self.scale}")
        if not self.memory_budget_gb > 0 or not self.verify_logits_max_gb >= 0:
            raise ConfigError(f"config keys 'merge.memory_budget_gb' must be > 0 and 'merge.verify_logits_max_gb' "
                              f">= 0, got {self.memory_budget_gb} and {self.verify_logits_max_gb}")


def _at_least(key: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ConfigError(f"config key '{key}' must be >= {minimum}, got {value}")


# The methods users compare, each a complete set of train settings (what the paper's table compares); the one list
# of method names (RunConfig.method's choices, `compare`'s default methods):
#   gift       the base model, weighted by the instruct model's confidence, merged into the instruct model
#   shadow-ft  the same without weights (Shadow-FT): uniform weighting
#   dft        the model's own detached probability as the weight (DFT); its normaliser is the token count,
#              because its weights are known only after the forward
#   direct     plain fine-tuning of the instruct model itself
METHODS: dict[str, dict[str, Any]] = {
    "gift": {"train.train_model": "base", "train.weighting": "gift"},
    "shadow-ft": {"train.train_model": "base", "train.weighting": "uniform"},
    "dft": {"train.train_model": "base", "train.weighting": "dft", "train.normalizer": "token_count"},
    "direct": {"train.train_model": "instruct", "train.weighting": "uniform"},
}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


@dataclass
class RunConfig:
    base_model: str = field(default="", metadata=doc(
        "The base model the LoRA is trained on (GIFT, Shadow-FT, DFT): a local folder (relative to the config "
        "file) or a hub id."))
    instruct_model: str = field(default="", metadata=doc(
        "The instruct sibling of base_model: it scores the targets (GIFT's confidence) and the adapter is merged "
        "into it; its tokenizer and chat template render the data."))
    output_dir: str = field(default="runs/gift", metadata=doc(
        "The run folder every stage reads and writes (prepared/, confidence/, checkpoints/, adapter/, merged/, "
        "logs/); a relative path resolves against the config file."))
    trust_remote_code: bool = field(default=False, metadata=doc(
        "Let transformers run the models' own code from their folders or the hub (for architectures it lacks)."))
    # The annotation names METHOD_NAMES: evaluated by typing.get_type_hints, it is Literal of the method names.
    method: Optional[Literal[METHOD_NAMES]] = field(default=None, metadata=doc(  # type: ignore[valid-type]
        "A named method sets every train key it needs: gift (train_model base, weighting gift), shadow-ft (base, "
        "uniform), dft (base, dft, normalizer token_count), direct (instruct, uniform); a key the config sets "
        "explicitly to something else is an error. null: the train keys as given."))
    data: DataConfig = field(default_factory=DataConfig, metadata=doc("Where the training records come from."))
    prepare: PrepareConfig = field(default_factory=PrepareConfig, metadata=doc(
        "How the records are rendered, filtered, held out and sharded."))
    score: ScoreConfig = field(default_factory=ScoreConfig, metadata=doc(
        "How the instruct model scores the targets."))
    train: TrainConfig = field(default_factory=TrainConfig, metadata=doc(
        "The LoRA training: weighting, layout, optimisation."))
    merge: MergeConfig = field(default_factory=MergeConfig, metadata=doc("How the adapter is merged."))
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=doc(
        "What `eval` and `compare` measure."))

    @property
    def paths(self) -> "RunPaths":
        return RunPaths(Path(self.output_dir))


@dataclass(frozen=True)
class RunPaths:
    """The fixed layout of a run's output folder; every stage finds its inputs here."""

    root: Path

    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    @property
    def confidence(self) -> Path:
        return self.root / "confidence"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert the harmless cases (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"config key '{key}': {value!r} is not valid ({'; '.join(errors)})")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key '{key}': expected null, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"config key '{key}': {value!r} is not one of {list(args)}")
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return {_coerce(k, args[0], f"{key} key"): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {tp!r}")


def _unknown_key_error(cls: type, key: str, prefix: str) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{prefix}{key}'.{hint} Valid keys here: {', '.join(valid)}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key_error(cls, key, prefix)
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["train.lora.r=8", "output_dir=runs/x"]`` into a nested dict (values parsed as YAML scalars)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        _set_path(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve_relative(cfg: RunConfig, root: Path) -> None:
    """Paths in a config file are relative to that file, so a config works from any working directory."""

    def resolve(p: str) -> str:
        candidate = root / p
        return str(candidate) if not Path(p).is_absolute() and candidate.exists() else p

    cfg.data.files = [str(root / f) if not Path(f).is_absolute() else f for f in cfg.data.files]
    for source in cfg.data.sources:
        if source.path is not None and not Path(source.path).is_absolute():
            source.path = str(root / source.path)
    cfg.eval.general_files = [str(root / f) if not Path(f).is_absolute() else f for f in cfg.eval.general_files]
    cfg.base_model = resolve(cfg.base_model) if cfg.base_model else cfg.base_model
    cfg.instruct_model = resolve(cfg.instruct_model) if cfg.instruct_model else cfg.instruct_model
    if not Path(cfg.output_dir).is_absolute():
        cfg.output_dir = str(root / cfg.output_dir)


def config_from_dict(values: dict) -> RunConfig:
    if not isinstance(values, dict):
        raise ConfigError(f"a run config must be a mapping at top level, got {type(values).__name__}")
    return _build(RunConfig, values)


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Read a YAML run config (optional) and apply ``key=value`` overrides on top."""
    values: dict = {}
    root = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping at top level")
        root = path.resolve().parent
    explicit = _deep_merge(values, parse_overrides(overrides or []))
    cfg = config_from_dict(values)
    _resolve_relative(cfg, root)
    if overrides:
        # Overrides are relative to the working directory, like any other command-line path.
        cfg = config_from_dict(_deep_merge(config_to_dict(cfg), parse_overrides(overrides)))
    if cfg.method:
        cfg = apply_method(cfg, cfg.method, explicit)
    return cfg


def apply_method(cfg: RunConfig, method: str, explicit: Optional[dict] = None) -> RunConfig:
    """``cfg`` with the train settings of ``method`` (see METHODS); a key that ``explicit`` (the values the user
    wrote) sets to another value is an error naming both."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    tree = config_to_dict(cfg)
    for dotted, value in METHODS[method].items():
        node: Any = explicit or {}
        for part in dotted.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is not _MISSING and node != value:
            raise ConfigError(f"method={method} sets {dotted}={value} but the config sets {node!r}; drop one of them")
        _set_path(tree, dotted, value)
    tree["method"] = method
    return config_from_dict(tree)


_MISSING = object()


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")


def require(cfg: RunConfig, *keys: str) -> None:
    """Fail early, naming the key, when a stage needs a value the config left empty."""
    for key in keys:
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, part)
        if node in ("", None, []):
            raise ConfigError(f"config key '{key}' is required for this command but is empty")


def config_keys_help(sections: tuple[str, ...]) -> str:
    """The keys a command reads, for its ``--help``: the run-level keys, then every key of ``sections`` (nested
    sections as ``train.lora.r``), each with its default and its documentation (the field's ``help``)."""
    import textwrap

    def entries(cls: type, prefix: str, instance: Any) -> list[str]:
        lines = []
        for f in dataclasses.fields(cls):
            value = getattr(instance, f.name)
            if dataclasses.is_dataclass(value):
                if not prefix and f.name not in sections:
                    continue
                lines += entries(type(value), f"{prefix}{f.name}.", value)
                continue
            if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
                default = f"[{len(value)} entries]"  # a list of sections (data.sources): its keys are in its help
            else:
                default = json.dumps(value)
            lines.append(f"  {prefix}{f.name} (default {default})")
            lines += textwrap.wrap(f.metadata.get("help", ""), 100, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6, break_on_hyphens=False)
        return lines

    listed = " and ".join(f"{name}.*" for name in sections) or "no section"
    header = textwrap.wrap(f"config keys this command reads (the run-level keys and {listed}; set them in "
                           "--config or as key=value; `gift-dist config` prints the resolved values):", 100)
    return "\n".join(header + entries(RunConfig, "", RunConfig()))


def add_config_arguments(parser: argparse.ArgumentParser, sections: Optional[tuple[str, ...]] = None) -> None:
    """The arguments every stage's command shares: a run config and ``section.key=value`` overrides (anywhere on the
    command line: ``gift_dist.cli.parse_command_line`` collects them). ``sections``: the config sections the
    command reads, listed key by key in its ``--help`` (None: every section)."""
    parser.add_argument("--config", help="run config YAML (see examples/; `gift-dist config` prints every key with its value and documentation)")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value",
        help="override config keys, e.g. train.lora.r=8 (before, between or after the flags; the last one wins)"
    )
    if sections is None:
        defaults = RunConfig()
        sections = tuple(f.name for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(getattr(defaults,
                                                                                                          f.name)))
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = config_keys_help(sections)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config of a command line parsed with ``add_config_arguments``."""
    return load_config(args.config, args.overrides)
