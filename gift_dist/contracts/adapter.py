"""The adapter contract: what `train` hands to `merge`.

An adapter directory is a standard PEFT LoRA adapter, loadable with ``PeftModel.from_pretrained``::

    adapter/
      adapter_config.json         # peft's LoraConfig
      adapter_model.safetensors   # peft's state-dict names (``base_model.model.<module>.lora_A.weight``, ...)
      gift_adapter.json           # this module's provenance record (optional for adapters made elsewhere)

``gift_adapter.json`` records which base model, prepared dataset and weighting produced it, so that merge can
refuse an adapter trained on another architecture and every merged model can say where it came from.
The directory is written to a temporary sibling and renamed, so a half-written adapter is never visible.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch

from gift_dist.config import QUANTIZE_BASES
from gift_dist.contracts import ContractError, check_finite, file_sha256, read_json, record_from, staged_directory

FORMAT = "gift_dist.adapter"
VERSION = 1
PROVENANCE_NAME = "gift_adapter.json"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class AdapterProvenance:
    """``gift_adapter.json``: how an adapter was made. Written by train, read by merge and ``gift-dist run``."""

    # "base" (GIFT, Shadow-FT, DFT) or "instruct" (direct fine-tuning): the model the LoRA was trained on.
    train_model: str
    # Content identity (``contracts.model_folder.model_identity``) of the model the LoRA was trained on.
    model_identity: dict[str, Any]
    # Identity of the base model of the pair (the same as ``model_identity`` unless train_model is instruct).
    base_model: dict[str, Any]
    # Identity of the instruct model, when the run named one.
    instruct_model: Optional[dict[str, Any]]
    # The prepared dataset the adapter was trained on.
    prepared_fingerprint: str
    # The weighting settings (weighting, gamma, floor, clipping, EOS weight, normaliser), for reports.
    weighting: dict[str, Any]
    # LoRA settings (r, alpha, dropout, target modules, rsLoRA).
    lora: dict[str, Any]
    # Every train setting, as configured.
    train_config: dict[str, Any]
    # Optimizer steps done, world size and global batch (samples per step) of the run.
    steps: int
    world_size: int
    global_batch_size: int
    # False for a checkpoint's adapter (training went on), True for the final one.
    complete: bool
    # sha256 of adapter_model.safetensors, filled by ``write_adapter`` and checked by every reader.
    weights_sha256: str = ""
    # True when the frozen base was kept in int8 during training (train.quantized_frozen_weights, DeepSpeed ZeRO++
    # zero_quantized_nontrainable_weights): the LoRA learned against int8 base weights. None in adapters written
    # before this was recorded (still readable: a new optional key keeps the version); ``int8_base_note`` says
    # what can be told of those.
    quantized_frozen_weights: Optional[bool] = None
    # How bitsandbytes quantized the model the LoRA trained on (train.quantize_base: none, nf4 or int8). Adapters
    # written before it was recorded read as "none", which they are: gift_dist could not load a quantized base then.
    quantize_base: str = "none"
    format: str = FORMAT
    version: int = VERSION

    def __post_init__(self) -> None:
        if self.train_model not in ("base", "instruct"):
            raise ContractError(f"adapter provenance: train_model must be base or instruct, got {self.train_model!r}")
        for key in ("model_identity", "base_model"):
            if not isinstance(getattr(self, key), dict) or "hash" not in getattr(self, key):
                raise ContractError(f"adapter provenance: {key} must be a model identity with a hash")
        for key in ("steps", "world_size", "global_batch_size"):
            value = getattr(self, key)
            least = 0 if key == "steps" else 1
            if not isinstance(value, int) or value < least:
                raise ContractError(f"adapter provenance: {key} must be an integer >= {least}, got {value!r}")
        if self.quantized_frozen_weights not in (None, True, False):
            raise ContractError(f"adapter provenance: quantized_frozen_weights must be true, false or absent, got "
                                f"{self.quantized_frozen_weights!r}")
        if self.quantize_base not in QUANTIZE_BASES:
            raise ContractError(f"adapter provenance: quantize_base must be one of {list(QUANTIZE_BASES)}, got "
                                f"{self.quantize_base!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> "AdapterProvenance":
        return record_from(data, cls, FORMAT, VERSION, where, "train the adapter again with this gift_dist",
                           "adapter provenance", exact_keys=True)


# The shipped ds_config that kept the frozen base in int8 before train.quantized_frozen_weights existed.
_QUANTIZING_BEFORE = "zero3_multinode"


def int8_base_note(provenance: Optional[AdapterProvenance]) -> Optional[str]:
    """What merge reports about int8 base weights: a line when the adapter was (or may have been) trained against
    them, None when it was trained against the base in full precision or nothing is recorded that suggests it."""
    if provenance is None:
        return None
    if provenance.quantized_frozen_weights:
        return ("trained against int8 base weights (train.quantized_frozen_weights=true); merged into the "
                "target's full-precision weights")
    if provenance.quantized_frozen_weights is None:
        ds_config = str(provenance.train_config.get("ds_config", ""))
        if _QUANTIZING_BEFORE in ds_config:
            return (f"may have been trained against int8 base weights: its provenance predates the record of "
                    f"it, and train.ds_config={ds_config} quantized the frozen base then")
    return None


def quantized_base_note(provenance: Optional[AdapterProvenance]) -> Optional[str]:
    """What merge reports about an adapter trained on a bitsandbytes base (QLoRA): a line, or None when the base
    was not quantized (or nothing is recorded)."""
    if provenance is None or provenance.quantize_base == "none":
        return None
    quantize = provenance.quantize_base
    return (f"trained against an {quantize} copy of its base quantized by bitsandbytes (train.quantize_base="
            f"{quantize}, QLoRA) and merged into the target's full-precision weights: the delta was fitted to the "
            f"quantized weights, not to these")


@dataclass
class Adapter:
    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    # None for an adapter made elsewhere (plain peft), which merge still accepts.
    provenance: Optional[AdapterProvenance]

    @property
    def scale(self) -> float:
        """LoRA scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r, alpha = self.config["r"], self.config["lora_alpha"]
        return alpha / (r**0.5) if self.config.get("use_rslora") else alpha / r


def adapter_hash(path: str | Path) -> str:
    return file_sha256(Path(path) / WEIGHTS_NAME)[:16]


def write_adapter(
    out_dir: str | Path, peft_config: Any, tensors: dict[str, torch.Tensor], provenance: AdapterProvenance
) -> Path:
    """Write a PEFT adapter dir from gathered full LoRA tensors (peft state-dict names), atomically."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if not tensors:
        raise ContractError(f"refusing to write adapter {out_dir}: no LoRA tensors were gathered")
    for name, tensor in tensors.items():
        if tensor.numel() == 0 or tensor.dim() != 2:
            raise ContractError(
                f"refusing to write adapter {out_dir}: tensor {name} has shape {tuple(tensor.shape)} "
                f"(an empty or non-matrix gather from the ZeRO-3 partitions)"
            )
        check_finite(tensor, f"refusing to write adapter {out_dir}: LoRA tensor {name}")
    with staged_directory(out_dir) as tmp:
        peft_config.save_pretrained(str(tmp))
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt"})
        # Checked by every reader: a flipped byte in the weights is an error, never a merged model.
        record = replace(provenance, weights_sha256=file_sha256(tmp / WEIGHTS_NAME))
        (tmp / PROVENANCE_NAME).write_text(json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n")
    return out_dir


def read_adapter(path: str | Path) -> Adapter:
    """Open and validate an adapter dir: config present, weights readable, every LoRA A has its B."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_dir():
        raise ContractError(f"adapter directory not found: {path}")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise ContractError(f"adapter {path} is missing {name}")
    provenance = None
    if (path / PROVENANCE_NAME).is_file():
        provenance = AdapterProvenance.from_json(read_json(path / PROVENANCE_NAME), str(path / PROVENANCE_NAME))
        if file_sha256(path / WEIGHTS_NAME) != provenance.weights_sha256:
            raise ContractError(
                f"adapter weights {path / WEIGHTS_NAME} do not match the sha256 recorded in {PROVENANCE_NAME}: the "
                f"file was changed or damaged after training; restore it or train again"
            )
    config = read_json(path / CONFIG_NAME)
    if config.get("peft_type", "LORA") != "LORA":
        raise ContractError(f"adapter {path} is a {config.get('peft_type')} adapter; only LoRA can be merged")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise ContractError(f"{path / CONFIG_NAME} lacks '{key}'")
    try:
        with safe_open(str(path / WEIGHTS_NAME), framework="pt") as fh:
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise ContractError(f"adapter weights {path / WEIGHTS_NAME} cannot be read: {exc}") from exc
    for name, tensor in tensors.items():
        if ".lora_A." in name and name.replace(".lora_A.", ".lora_B.") not in tensors:
            raise ContractError(f"adapter {path}: {name} has no matching lora_B tensor")
        check_finite(tensor, f"adapter {path / WEIGHTS_NAME}: tensor {name}")
    return Adapter(path, config, tensors, provenance)
