"""The DeepSpeed side of training: the ZeRO-3 config filled from the run config, and the LoRA model built on it.

The base (or instruct) model is created inside ``zero.Init`` (via transformers' ``HfDeepSpeedConfig``), so every
rank only ever holds its partition of the frozen weights; peft then adds the LoRA layers and DeepSpeed partitions
them too when the engine is built. The optimizer and LR schedule come from the DeepSpeed config.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import torch

from gift_dist.config import ConfigError, RunConfig, TrainConfig

log = logging.getLogger(__name__)

REPO_DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"


def on_gpu() -> bool:
    return torch.cuda.is_available()


def resolve_ds_config(name_or_path: str) -> Path:
    """A ds_config is a file path, or the name of a config shipped in ds_configs/ (``zero3``, ``zero3_offload``...).

    Shipped configs are found through ``importlib.resources`` (installed package ``gift_dist.ds_configs``) and,
    from a source checkout that was never installed, in the repository's top-level ``ds_configs/``.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = name_or_path if name_or_path.endswith(".json") else f"{name_or_path}.json"
    try:
        shipped = resources.files("gift_dist.ds_configs") / name
        if shipped.is_file():
            return Path(str(shipped))
    except ModuleNotFoundError:
        pass
    if (REPO_DS_CONFIGS / name).is_file():
        return REPO_DS_CONFIGS / name
    available = sorted(p.stem for p in REPO_DS_CONFIGS.glob("*.json"))
    raise ConfigError(
        f"train.ds_config={name_or_path!r} is neither a file nor a shipped DeepSpeed config; shipped: {available}"
    )


def _fill(node: dict, key: str, value: Any, where: str, conflicts: list[str]) -> None:
    """Fill an "auto" (or absent) value; a concrete value that disagrees with the run config is a conflict."""
    current = node.get(key, "auto")
    if current == "auto":
        node[key] = value
    elif current != value:
        conflicts.append(f"{where}={current!r} but the run config gives {value!r}")


def build_ds_config(train: TrainConfig, ds_config: str, world: int, total_steps: int) -> dict:
    """Load a ds_config and fill its "auto" values from the run config; contradicting numbers are an error."""
    path = resolve_ds_config(ds_config)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {exc}") from exc
    config = copy.deepcopy(config)
    conflicts: list[str] = []
    global_batch = train.micro_batch_size * train.gradient_accumulation_steps * world
    _fill(config, "train_micro_batch_size_per_gpu", train.micro_batch_size, "train_micro_batch_size_per_gpu",
          conflicts)
    _fill(config, "gradient_accumulation_steps", train.gradient_accumulation_steps, "gradient_accumulation_steps",
          conflicts)
    _fill(config, "train_batch_size", global_batch, f"train_batch_size (micro x GA x {world} ranks)", conflicts)
    _fill(config, "gradient_clipping", train.max_grad_norm, "gradient_clipping", conflicts)
    bf16 = config.setdefault("bf16", {})
    bf16["enabled"] = on_gpu() if bf16.get("enabled", "auto") == "auto" else bf16["enabled"]
    optimizer = config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    _fill(params, "lr", train.learning_rate, "optimizer.params.lr", conflicts)
    _fill(params, "weight_decay", train.weight_decay, "optimizer.params.weight_decay", conflicts)
    if not on_gpu() and "offload_optimizer" not in config.get("zero_optimization", {}):
        # DeepSpeed's default Adam is the CUDA FusedAdam; the CPU accelerator has no such kernel.
        params.setdefault("torch_adam", True)
    _fill_scheduler(config, train, total_steps, conflicts)
    if conflicts:
        raise ConfigError(
            f"DeepSpeed config {path} contradicts the run config: " + "; ".join(conflicts)
            + ". Set those keys to \"auto\" in the ds_config or change the run config."
        )
    stage = config.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ConfigError(f"DeepSpeed config {path} uses ZeRO stage {stage}; gift_dist trains under ZeRO stage 3")
    leftover = [key for key, value in _walk(config) if value == "auto"]
    if leftover:
        raise ConfigError(f"DeepSpeed config {path}: no run-config value fills the \"auto\" keys {leftover}")
    return config


def _fill_scheduler(config: dict, train: TrainConfig, total_steps: int, conflicts: list[str]) -> None:
    """An "auto" scheduler becomes the run config's schedule (see ``lr_schedule``); an explicit DeepSpeed
    scheduler keeps its type and gets its "auto" parameters filled."""
    scheduler = config.get("scheduler", {"type": "auto"})
    if scheduler.get("type", "auto") == "auto":
        config.pop("scheduler", None)
        return
    params = scheduler.setdefault("params", {})
    # DeepSpeed's warmup schedulers refuse 0 warmup steps.
    _fill(params, "warmup_num_steps", max(train.warmup_steps, 1), "scheduler.params.warmup_num_steps", conflicts)
    if scheduler["type"] in ("WarmupCosineLR", "WarmupDecayLR"):
        _fill(params, "total_num_steps", max(total_steps, 2), "scheduler.params.total_num_steps", conflicts)
    if scheduler["type"] in ("WarmupDecayLR", "WarmupLR"):
        _fill(params, "warmup_max_lr", train.learning_rate, "scheduler.params.warmup_max_lr", conflicts)


def lr_schedule(train: TrainConfig, total_steps: int):
    """The run config's LR schedule (warmup, then cosine/linear/constant), for DeepSpeed to step and checkpoint.

    Used instead of DeepSpeed's Warmup* schedulers because those start at lr 0 for the first two steps even
    with no warmup; transformers' schedules give step 1 the configured learning rate when warmup_steps=0.
    """
    from transformers import get_scheduler

    names = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}

    def build(optimizer):
        return get_scheduler(names[train.lr_scheduler], optimizer, num_warmup_steps=max(train.warmup_steps, 0),
                             num_training_steps=max(total_steps, 1))

    return build


def _walk(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), node


def training_model_path(cfg: RunConfig) -> str:
    """GIFT, Shadow-FT and DFT train the base model; "direct fine-tuning" trains the instruct model itself."""
    return cfg.instruct_model if cfg.train.train_model == "instruct" else cfg.base_model


def resolve_target_modules(model: torch.nn.Module, wanted: list[str]) -> list[str]:
    """Keep the configured LoRA targets that name linear layers of the model; none matching is an error."""
    linear_names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                           if isinstance(module, torch.nn.Linear)})
    present = [name for name in wanted if name in linear_names]
    missing = [name for name in wanted if name not in linear_names]
    if not present:
        raise ConfigError(
            f"train.lora.target_modules={wanted} match no linear layer of the model; its linear layers are "
            f"{linear_names}"
        )
    if missing:
        log.warning("LoRA targets %s do not exist in this model and are skipped (linear layers: %s)",
                    missing, linear_names)
    return present


class TargetTokenCE(torch.nn.Module):
    """The module the DeepSpeed engine runs: decoder -> last hidden states -> chunked CE through the lm_head.

    Going through ``engine(...)`` (not the submodules directly) matters: DeepSpeed's forward advances its
    gradient-accumulation bookkeeping, without which ZeRO-3 overwrites instead of accumulating micro-batch
    gradients. The lm_head is called as a module so ZeRO-3 gathers its partitioned weight in its hooks, and
    full-vocabulary logits are never materialised for the whole sequence.
    """

    def __init__(self, peft_model: torch.nn.Module, chunk_tokens: int):
        super().__init__()
        self.peft_model = peft_model
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, min_chunks: int = 1) -> torch.Tensor:
        from gift_dist.train.loss import target_token_ce

        causal_lm = self.peft_model.get_base_model()
        hidden = causal_lm.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        return target_token_ce(hidden, causal_lm.get_output_embeddings(), labels, self.chunk_tokens, min_chunks)


@dataclass
class TrainEngine:
    """The DeepSpeed engine (running ``TargetTokenCE``) and what the recipe needs beside it."""

    engine: Any  # deepspeed.DeepSpeedEngine
    peft_config: Any
    ds_config: dict
    model_path: str

    @property
    def peft_model(self) -> torch.nn.Module:
        return self.engine.module.peft_model

    @property
    def lora_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(name, p) for name, p in self.peft_model.named_parameters() if p.requires_grad]

    def target_token_ce(self, batch: Any, min_chunks: int) -> torch.Tensor:
        """CE of every target token of a ``MicroBatch`` ([N], row-major), in ``min_chunks`` or more lm_head calls
        (the same number on every rank: each call is a ZeRO-3 all-gather of the lm_head weight)."""
        batch = batch.to(self.engine.device)
        return self.engine(input_ids=batch.input_ids, labels=batch.labels, position_ids=batch.position_ids,
                           attention_mask=batch.attention_mask, min_chunks=min_chunks)


def build_engine(cfg: RunConfig, world: int, total_steps: int) -> TrainEngine:
    """Load the model partitioned under ZeRO-3, add LoRA with peft, and build the DeepSpeed engine."""
    import deepspeed
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    ds_config = build_ds_config(cfg.train, cfg.train.ds_config, world, total_steps)
    model_path = training_model_path(cfg)
    # Must stay referenced while from_pretrained runs: it is how transformers knows to build under zero.Init.
    hf_ds_config = HfDeepSpeedConfig(ds_config)
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=dtype, trust_remote_code=cfg.trust_remote_code
    )
    del hf_ds_config
    model.config.use_cache = False
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # With frozen embeddings nothing upstream requires grad; checkpointed blocks still need a grad path.
        model.enable_input_require_grads()
    lora = cfg.train.lora
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=resolve_target_modules(model, lora.target_modules),
        use_rslora=lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # Every rank must draw the same LoRA initialisation: ZeRO-3 keeps each rank's slice of its own draw.
    torch.manual_seed(cfg.train.seed)
    peft_model = get_peft_model(model, peft_config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    schedule = None if "scheduler" in ds_config else lr_schedule(cfg.train, total_steps)
    engine, _, _, _ = deepspeed.initialize(model=TargetTokenCE(peft_model, cfg.train.ce_chunk_tokens),
                                           model_parameters=trainable, config=ds_config, lr_scheduler=schedule)
    engine.train()
    return TrainEngine(engine=engine, peft_config=peft_config, ds_config=ds_config, model_path=model_path)


def learning_rate(engine: Any) -> float:
    return float(engine.get_lr()[0])


def grad_norm(engine: Any) -> Optional[float]:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)
