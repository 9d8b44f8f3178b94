"""The DeepSpeed side of training: the layout of the frozen base, the ds_config filled from the run config, and
the LoRA model built on it.

Two layouts (``train.sharding``), one engine:

- ``replicate``: the frozen base is loaded whole onto every GPU, as a plain training loop would; DeepSpeed manages
  only what LoRA trains (bf16 weights with fp32 master copies, gradients and Adam state, ZeRO stage 1). No
  per-layer gathers, no module hooks: a step costs what the arithmetic costs. For every model whose bf16 weights
  fit one GPU beside the activations (8B on an 80 GiB card, 70B does not).
- ``zero3``: the base is created inside ``zero.Init`` (transformers' ``HfDeepSpeedConfig``), so every rank only ever
  holds its partition of the frozen weights. Tuned for a frozen base: each decoder layer is a ZeRO-3 leaf module
  (gathered once per forward / recompute / backward, not tensor by tensor), the LoRA tensors stay whole on every
  rank (persistence threshold above them), the output layer is gathered once per micro-batch
  (``loss.ChunkedTargetCE``), prefetch and live-parameter limits come from the decoder layer's size.

``auto`` picks ``replicate`` when ``gift_dist.memory_plan`` (what ``gift-dist plan`` prints) says it fits the GPU.
With ``train.quantize_base`` the frozen model is loaded quantized by bitsandbytes in either layout (QLoRA).
The optimizer is torch's AdamW (fused on CUDA) unless the ds_config names another: no JIT-built op on the default
path. The LR schedule is the run config's.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import torch

from gift_dist.config import ConfigError, RunConfig, TrainConfig
from gift_dist.launchers import env_local_world_size
from gift_dist.memory_plan import (
    GIB, USABLE_FRACTION, ModelShape, decoder_layer_classes, frozen_weight_bytes, model_shape, training_plan,
    zero3_auto_sizes,
)
from gift_dist.models import lora_targets
from gift_dist.models.batch import choose_attention
from gift_dist.train import attention

log = logging.getLogger(__name__)

REPO_DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"
# Attention implementations that take a packed row's sample boundaries as keyword arguments.
VARLEN_ATTENTION = (attention.NAME, "flash_attention_2")
# The shipped ds_config each layout uses when train.ds_config is "auto".
SHIPPED_FOR_SHARDING = {"replicate": "replicate", "zero3": "zero3"}


def on_gpu() -> bool:
    return torch.cuda.is_available()


@dataclass
class Layout:
    """Where the frozen base lives (``replicate`` | ``zero3``), the ds_config that does it, and why."""

    sharding: str
    ds_config: Path
    reason: str


def _read_ds_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {exc}") from exc


def _zero_stage(path: Path) -> int:
    stage = _read_ds_config(path).get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"DeepSpeed config {path}: zero_optimization.stage={stage!r} is not 0, 1, 2 or 3")
    return stage


def choose_layout(cfg: RunConfig, world: int, shape: Optional[ModelShape] = None) -> Layout:
    """Resolve ``train.sharding`` and ``train.ds_config`` into one layout; a contradiction is an error."""
    train = cfg.train
    if train.ds_config != "auto":
        path = resolve_ds_config(train.ds_config)
        stage = _zero_stage(path)
        implied = "zero3" if stage == 3 else "replicate"
        if train.sharding not in ("auto", implied):
            raise ConfigError(
                f"train.sharding={train.sharding} but train.ds_config={train.ds_config} ({path}) is a {implied} "
                f"config (ZeRO stage {stage}); set train.ds_config=auto or train.sharding={implied}"
            )
        return Layout(implied, path, f"train.ds_config={train.ds_config}")
    if train.sharding != "auto":
        return Layout(train.sharding, resolve_ds_config(SHIPPED_FOR_SHARDING[train.sharding]),
                      f"train.sharding={train.sharding}")
    if not on_gpu():
        return Layout("replicate", resolve_ds_config("replicate"), "auto: no GPU, the model is in host memory")
    shape = shape or model_shape(training_model_path(cfg), train.lora.r, train.lora.target_modules,
                                 cfg.trust_remote_code)
    replicated = planned_gpu_gib(cfg, world, shape, checkpointing=True)["replicate"]
    gpu_gib = gpu_memory_gib()
    if replicated <= USABLE_FRACTION * gpu_gib:
        return Layout("replicate", resolve_ds_config("replicate"),
                      f"auto: the whole base needs ~{replicated:.1f} GiB of a {gpu_gib:.0f} GiB GPU")
    return Layout("zero3", resolve_ds_config("zero3"),
                  f"auto: the whole base needs ~{replicated:.1f} GiB, more than {USABLE_FRACTION:.0%} of a "
                  f"{gpu_gib:.0f} GiB GPU; partitioning it over {world} rank(s)")


def gpu_memory_gib() -> float:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB


def micro_batch_token_bound(cfg: RunConfig) -> int:
    """The most tokens one micro-batch can hold (padding included): what activation memory is planned for."""
    if cfg.train.micro_batch_tokens:
        return cfg.train.micro_batch_tokens
    return cfg.train.micro_batch_size * cfg.prepare.max_length


def planned_gpu_gib(cfg: RunConfig, world: int, shape: ModelShape, checkpointing: bool) -> dict[str, float]:
    """GiB per GPU of each layout (``memory_plan.training_plan``) for this run's largest micro-batch."""
    local = env_local_world_size() or world  # ranks on this node, from whichever launcher started us
    plans = training_plan(shape, local, max(world // max(local, 1), 1), micro_batch_token_bound(cfg),
                          cfg.train.ce_chunk_tokens, checkpointing,
                          quantized_frozen_weights=cfg.train.quantized_frozen_weights,
                          quantize_base=cfg.train.quantize_base)
    return {name: plan["gpu_gib"] for name, plan in plans.items()}


def choose_checkpointing(cfg: RunConfig, layout: Layout, world: int, shape: Optional[ModelShape]) -> tuple[bool, str]:
    """Resolve ``train.gradient_checkpointing``: ``auto`` recomputes only when the activations of the largest
    micro-batch would not fit beside the layout's weights (recomputing costs a third more forward work)."""
    setting = cfg.train.gradient_checkpointing
    if cfg.train.quantize_base != "none" and layout.sharding == "zero3":
        # bitsandbytes' matmul keeps a view of the packed weight for its backward, whose storage ZeRO-3 has
        # released by then (a shape error in backward); the recompute multiplies again with the weight gathered anew.
        if setting is False:
            raise ConfigError(f"train.quantize_base={cfg.train.quantize_base} under ZeRO-3 ({layout.reason}) needs "
                              f"gradient checkpointing: set train.gradient_checkpointing=auto (or true)")
        return True, f"required: train.quantize_base={cfg.train.quantize_base} under ZeRO-3"
    if setting != "auto":
        return bool(setting), f"train.gradient_checkpointing={str(setting).lower()}"
    if not on_gpu() or shape is None:
        return True, "auto: not on a GPU"
    plan_name = layout.ds_config.stem if layout.ds_config.parent == REPO_DS_CONFIGS else layout.sharding
    without = planned_gpu_gib(cfg, world, shape, checkpointing=False)
    need = without.get(plan_name, without[layout.sharding])
    gpu_gib = gpu_memory_gib()
    tokens = micro_batch_token_bound(cfg)
    if need <= USABLE_FRACTION * gpu_gib:
        return False, (f"auto: micro-batches of up to {tokens} tokens need ~{need:.1f} GiB without recompute, "
                       f"within a {gpu_gib:.0f} GiB GPU")
    return True, (f"auto: micro-batches of up to {tokens} tokens would need ~{need:.1f} GiB without recompute, more "
                  f"than {USABLE_FRACTION:.0%} of a {gpu_gib:.0f} GiB GPU")


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


def build_ds_config(train: TrainConfig, layout: Layout, world: int, total_steps: int,
                    shape: Optional[ModelShape] = None) -> dict:
    """Load the layout's ds_config and fill its "auto" values from the run config (and, for ZeRO-3, from the
    model's shape); contradicting numbers are an error."""
    path = layout.ds_config
    config = _read_ds_config(path)
    conflicts: list[str] = []
    global_batch = train.global_batch(world)
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
    zero = config.setdefault("zero_optimization", {})
    if str(optimizer.get("type", "")).lower() in ("adam", "adamw") and "offload_optimizer" not in zero:
        # DeepSpeed's default Adam is FusedAdam, built by JIT on first use (which fails on images whose
        # TORCH_CUDA_ARCH_LIST holds "9.0a") and absent on CPU; torch's own AdamW, fused on CUDA, is as fast for
        # the few LoRA tensors. An explicit "torch_adam": false in the ds_config keeps DeepSpeed's.
        if params.setdefault("torch_adam", True) and on_gpu():
            params.setdefault("fused", True)
    _fill_scheduler(config, train, total_steps, conflicts)
    stage = zero.get("stage", 0)
    if (stage == 3) != (layout.sharding == "zero3"):
        conflicts.append(f"zero_optimization.stage={stage} but the layout is {layout.sharding}")
    if stage == 3:
        _fill_zero3_sizes(zero, shape, conflicts)
    _fill_quantized_frozen_weights(zero, train, stage, conflicts)
    _fill_nvme_path(zero, train, path, conflicts)
    if conflicts:
        raise ConfigError(
            f"DeepSpeed config {path} contradicts the run config: " + "; ".join(conflicts)
            + ". Set those keys to \"auto\" in the ds_config or change the run config."
        )
    leftover = [key for key, value in _walk(config) if value == "auto"]
    if leftover:
        raise ConfigError(f"DeepSpeed config {path}: no run-config value fills the \"auto\" keys {leftover}")
    return config


def _fill_nvme_path(zero: dict, train: TrainConfig, path: Path, conflicts: list[str]) -> None:
    """Every NVMe offload's ``nvme_path`` from ``train.nvme_path``: an "auto" one without it is refused, naming
    the setting (no folder of this machine is guessed)."""
    for section in ("offload_param", "offload_optimizer"):
        offload = zero.get(section)
        if not isinstance(offload, dict) or offload.get("device") != "nvme":
            continue
        if not train.nvme_path:
            if offload.get("nvme_path", "auto") == "auto":
                raise ConfigError(
                    f"DeepSpeed config {path} swaps zero_optimization.{section} to NVMe: set train.nvme_path to a "
                    f"folder on each node's local NVMe (e.g. train.nvme_path=/local_nvme/gift)")
            continue
        _fill(offload, "nvme_path", train.nvme_path, f"zero_optimization.{section}.nvme_path", conflicts)


def _fill_zero3_sizes(zero: dict, shape: Optional[ModelShape], conflicts: list[str]) -> None:
    """ZeRO-3 sizes from the model: LoRA tensors persistent (never partitioned, so never gathered), one decoder
    layer prefetched ahead, three alive at once (the one computing, the next, the one being released)."""
    if shape is None:
        unresolved = [key for key in ("stage3_param_persistence_threshold", "stage3_prefetch_bucket_size",
                                      "stage3_max_live_parameters", "stage3_max_reuse_distance")
                      if zero.get(key) == "auto"]
        if unresolved:
            conflicts.append(f"{unresolved} are \"auto\" but the model's shape is unknown")
        return
    for key, value in zero3_auto_sizes(shape).items():
        _fill(zero, key, value, f"zero_optimization.{key}", conflicts)


def _fill_quantized_frozen_weights(zero: dict, train: TrainConfig, stage: int, conflicts: list[str]) -> None:
    """``zero_quantized_nontrainable_weights`` (int8 frozen base, ZeRO++) is on exactly when
    ``train.quantized_frozen_weights`` says so: the run config turns it on ("auto", absent or false in the
    ds_config), and a ds_config that turns it on by itself is a conflict, so an adapter never trains against int8
    weights unrecorded."""
    key = "zero_quantized_nontrainable_weights"
    current = zero.get(key, "auto")
    wanted = train.quantized_frozen_weights
    if wanted and stage != 3:
        conflicts.append(f"train.quantized_frozen_weights=true needs ZeRO stage 3, the ds_config has stage {stage}")
        return
    if current is True and not wanted:
        conflicts.append(f"zero_optimization.{key}=true (the frozen base kept in int8) but "
                         f"train.quantized_frozen_weights is false: set train.quantized_frozen_weights=true to "
                         f"train against int8 base weights")
        return
    if current not in ("auto", True, False):
        conflicts.append(f"zero_optimization.{key}={current!r} is not true, false or \"auto\"")
        return
    if stage == 3:
        zero[key] = wanted
    else:
        zero.pop(key, None)


def frozen_weights_note(ds_config: dict, quantize_base: str) -> str:
    """How the frozen base is held, for the start-up log: bitsandbytes' nf4/int8 (``train.quantize_base``), int8
    (ZeRO++) or bf16, and hpZ's secondary copy."""
    zero = ds_config.get("zero_optimization", {})
    note = ("int8 (train.quantized_frozen_weights=true: the LoRA trains against an int8 copy of the base)"
            if zero.get("zero_quantized_nontrainable_weights") else "bf16")
    if quantize_base != "none":
        note = (f"{quantize_base} by bitsandbytes (train.quantize_base: the LoRA trains against a quantized copy of "
                f"the base, merged into full-precision weights)")
    hpz = zero.get("zero_hpz_partition_size", 1)
    if zero.get("stage") == 3 and isinstance(hpz, int) and hpz > 1:
        note += f", hpZ secondary copy over {hpz} GPUs"
    return note


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


class TargetTokenCE(torch.nn.Module):
    """The module the DeepSpeed engine runs: decoder -> last hidden states -> chunked CE through the lm_head.

    Going through ``engine(...)`` (not the submodules directly) matters: DeepSpeed's forward advances its
    gradient-accumulation bookkeeping, without which ZeRO-3 overwrites instead of accumulating micro-batch
    gradients. ``ce_head`` holds the model's lm_head and is a ZeRO-3 leaf module (see ``loss.ChunkedTargetCE``):
    full-vocabulary logits are never materialised for the whole sequence, and the head is gathered once.
    """

    def __init__(self, peft_model: torch.nn.Module, chunk_tokens: int):
        super().__init__()
        from gift_dist.models.logprob import softcap_of
        from gift_dist.train.loss import ChunkedTargetCE

        self.peft_model = peft_model
        model = peft_model.get_base_model()
        # The model's own final logit soft-cap (Gemma 2/3), as the scorer and the evaluation apply it.
        self.ce_head = ChunkedTargetCE(model.get_output_embeddings(), chunk_tokens, softcap_of(model))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, target_positions: torch.Tensor,
                target_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **attention_kwargs: Any) -> torch.Tensor:
        """``attention_kwargs``: a packed row's sample boundaries, for the varlen attention kernels."""
        hidden = self.peft_model.get_base_model().get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **attention_kwargs
        ).last_hidden_state
        return self.ce_head(hidden, target_positions, target_ids)


@dataclass
class TrainEngine:
    """The DeepSpeed engine (running ``TargetTokenCE``) and what the recipe needs beside it."""

    engine: Any  # deepspeed.DeepSpeedEngine
    peft_config: Any
    ds_config: dict
    model_path: str
    layout: Layout
    attention: str
    checkpointing: bool

    @property
    def peft_model(self) -> torch.nn.Module:
        return self.engine.module.peft_model

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def lora_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(name, p) for name, p in self.peft_model.named_parameters() if p.requires_grad]

    def target_token_ce(self, batch: Any) -> torch.Tensor:
        """CE of every target token of a ``MicroBatch`` (already on the device) [N], row-major."""
        boundaries = batch.attention_kwargs() if self.attention in VARLEN_ATTENTION else {}
        return self.engine(input_ids=batch.input_ids, position_ids=batch.position_ids,
                           target_positions=batch.target_positions, target_ids=batch.target_ids,
                           attention_mask=batch.attention_mask, **boundaries)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        """DeepSpeed counts micro-steps: the weights change only at the accumulation boundary."""
        self.engine.step()

    def at_accumulation_boundary(self) -> bool:
        return self.engine.is_gradient_accumulation_boundary()

    def grad_norm(self) -> Optional[torch.Tensor | float]:
        """The last step's global gradient norm as DeepSpeed keeps it (a device tensor is not read back here)."""
        return self.engine.get_global_grad_norm()

    def learning_rate(self) -> float:
        return float(self.engine.get_lr()[0])

    @contextlib.contextmanager
    def evaluating(self):
        """Eval mode (no dropout) for the block, training mode after it."""
        self.engine.eval()
        try:
            yield
        finally:
            self.engine.train()


def attention_implementation(train: TrainConfig) -> str:
    """``auto``: for packed rows on a GPU, a varlen kernel (flash-attention 2 when installed, else torch's own,
    ``attention.NAME``), which attends within each sample without a mask; otherwise torch's sdpa (for a packed row
    transformers builds the block-diagonal mask from the position ids). The chosen name is registered."""
    packed_on_gpu = train.attn_implementation == "auto" and on_gpu() and train.packs(on_gpu=True)
    varlen = attention.NAME if packed_on_gpu and attention.varlen_kernel_available() else None
    name = choose_attention(train.attn_implementation, packed_on_gpu, varlen)
    if name == attention.NAME:
        if not train.packs(on_gpu()):
            raise ConfigError(f"train.attn_implementation={attention.NAME} attends within packed samples only; set "
                              f"train.packing=true or choose another attention")
        attention.register()
    return name


def check_liger_kernels(train: TrainConfig) -> None:
    """``train.liger_kernels`` needs the package and a GPU: refused before any model is loaded."""
    if not train.liger_kernels:
        return
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("train.liger_kernels=true but liger-kernel is not installed; pip install liger-kernel, "
                          "or set train.liger_kernels=false")
    if not on_gpu():
        raise ConfigError("train.liger_kernels=true needs a GPU (Liger's kernels are Triton); set "
                          "train.liger_kernels=false on CPU")


def apply_liger_kernels(model: torch.nn.Module) -> None:
    """Liger's RMSNorm, SwiGLU and RoPE kernels on this model (its loss kernels stay off: ``loss.ChunkedTargetCE``
    is the loss). Applied before peft wraps the projections; the patched MLP still calls them as modules, so the
    LoRA layers run as they would without Liger."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    model_type = getattr(model.config, "model_type", None)
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    log.info("Liger kernels (RMSNorm, SwiGLU, RoPE) applied to the %s model", model_type)


def check_quantized_load(cfg: RunConfig, shape: ModelShape) -> None:
    """A bitsandbytes base is quantized whole onto each rank's GPU before ZeRO-3 (if any) partitions it
    (``memory_plan``'s load peak): refused, before any weight is read, when that alone exceeds the GPU."""
    if cfg.train.quantize_base == "none" or not on_gpu():
        return
    need, gpu_gib = sum(frozen_weight_bytes(shape, cfg.train.quantize_base)) / GIB, gpu_memory_gib()
    if need > gpu_gib:
        raise ConfigError(f"train.quantize_base={cfg.train.quantize_base}: each GPU holds the whole quantized base "
                          f"(~{need:.1f} GiB) while it loads, more than this {gpu_gib:.0f} GiB GPU, whatever the "
                          f"sharding; use larger GPUs (gift-dist plan --quantize-base {cfg.train.quantize_base})")


def keep_quantized_weights_as_loaded(model: torch.nn.Module) -> None:
    """bitsandbytes' 4-bit layers repack their weight in place, the first time they run on CPU in eval mode without
    grad, into the layout of its CPU inference kernel (``support_avx512bf16_for_cpu``): the trainer's held-out
    evaluation would change the frozen base the later steps train against (a resumed run then differs from the
    unbroken one), and under ZeRO-3 rewrite a partitioned parameter. Turned off on every such layer."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def bnb_quantization_config(quantize_base: str, dtype: torch.dtype) -> Optional[Any]:
    """transformers' ``BitsAndBytesConfig`` for ``train.quantize_base`` (None for ``none``).

    nf4 as the QLoRA paper and peft's DeepSpeed ZeRO-3 recipe set it: NormalFloat-4 with double-quantized constants,
    computing in the training dtype, and the packed codes stored in that dtype too (``bnb_4bit_quant_storage``), so
    ZeRO-3 partitions and gathers them like any other weight of the model. int8 is LLM.int8 (frozen int8 weights,
    ``has_fp16_weights=False``)."""
    from transformers import BitsAndBytesConfig

    if quantize_base == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
    if quantize_base == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def build_engine(cfg: RunConfig, world: int, total_steps: int) -> TrainEngine:
    """Load the model in the chosen layout, add LoRA with peft, and build the DeepSpeed engine."""
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from gift_dist.train.loss import ChunkedTargetCE

    check_liger_kernels(cfg.train)
    model_path = training_model_path(cfg)
    shape = model_shape(model_path, cfg.train.lora.r, cfg.train.lora.target_modules, cfg.trust_remote_code)
    layout = choose_layout(cfg, world, shape)
    check_quantized_load(cfg, shape)
    ds_config = build_ds_config(cfg.train, layout, world, total_steps, shape)
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    attention_name = attention_implementation(cfg.train)
    checkpointing, checkpointing_reason = choose_checkpointing(cfg, layout, world, shape)
    log.info("layout %s (%s), ds_config %s, frozen weights %s, %s attention, gradient checkpointing %s (%s)",
             layout.sharding, layout.reason, layout.ds_config, frozen_weights_note(ds_config, cfg.train.quantize_base),
             attention_name, "on" if checkpointing else "off", checkpointing_reason)
    load = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code, "attn_implementation": attention_name}
    quantization = bnb_quantization_config(cfg.train.quantize_base, dtype)
    if quantization is not None:
        # Under ZeRO-3 transformers builds a quantized model without zero.Init, whole on this rank's device, and
        # deepspeed.initialize partitions it (the load peak of `gift-dist plan`). peft's prepare_model_for_kbit_training
        # is left out: its gradient checkpointing is done below, and its cast of every unquantized weight
        # (embeddings, output layer, norms) to fp32 would cost 4 GiB more on a 70B.
        load["quantization_config"] = quantization
    if layout.sharding == "zero3":
        # Must stay referenced while from_pretrained runs: it is how transformers knows to build under zero.Init.
        hf_ds_config = HfDeepSpeedConfig(ds_config)
        model = AutoModelForCausalLM.from_pretrained(model_path, **load)
        del hf_ds_config
    else:
        # Straight onto this rank's GPU, shard by shard: the host never holds the whole model.
        device_map = {"": torch.cuda.current_device()} if on_gpu() else None
        model = AutoModelForCausalLM.from_pretrained(model_path, device_map=device_map, **load)
    model.config.use_cache = False
    if quantization is not None:
        keep_quantized_weights_as_loaded(model)
    if cfg.train.liger_kernels:
        apply_liger_kernels(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # With frozen embeddings nothing upstream requires grad; checkpointed blocks still need a grad path.
        model.enable_input_require_grads()
    lora = cfg.train.lora
    targets = lora_targets.resolve_target_modules(model, lora.target_modules)
    log.info("LoRA r=%d on %s (train.lora.target_modules: %s)", lora.r, targets, lora.target_modules)
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        use_rslora=lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # Every rank must draw the same LoRA initialisation: ZeRO keeps each rank's slice of its own draw.
    torch.manual_seed(cfg.train.seed)
    # LoRA weights in the model's dtype (bf16 GEMMs); DeepSpeed keeps their fp32 master copies in the optimizer.
    peft_model = get_peft_model(model, peft_config, autocast_adapter_dtype=False)
    module = TargetTokenCE(peft_model, cfg.train.ce_chunk_tokens)
    if layout.sharding == "zero3":
        set_z3_leaf_modules(module, [*decoder_layer_classes(model), ChunkedTargetCE])
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    schedule = None if "scheduler" in ds_config else lr_schedule(cfg.train, total_steps)
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=trainable, config=ds_config,
                                           lr_scheduler=schedule)
    engine.train()
    return TrainEngine(engine=engine, peft_config=peft_config, ds_config=ds_config, model_path=model_path,
                       layout=layout, attention=attention_name, checkpointing=checkpointing)
