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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from gift_dist.contracts import ContractError, check_finite, file_sha256, staged_directory

FORMAT = "gift_dist.adapter"
VERSION = 1
PROVENANCE_NAME = "gift_adapter.json"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class Adapter:
    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    provenance: Optional[dict[str, Any]]

    @property
    def scale(self) -> float:
        """LoRA scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r, alpha = self.config["r"], self.config["lora_alpha"]
        return alpha / (r**0.5) if self.config.get("use_rslora") else alpha / r


def adapter_hash(path: str | Path) -> str:
    return file_sha256(Path(path) / WEIGHTS_NAME)[:16]


def write_adapter(
    out_dir: str | Path, peft_config: Any, tensors: dict[str, torch.Tensor], provenance: dict[str, Any]
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
        record = {"format": FORMAT, "version": VERSION, **provenance,
                  "weights_sha256": file_sha256(tmp / WEIGHTS_NAME)}
        (tmp / PROVENANCE_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
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
        try:
            provenance = json.loads((path / PROVENANCE_NAME).read_text())
        except json.JSONDecodeError as exc:
            raise ContractError(f"{path / PROVENANCE_NAME} is not valid JSON: {exc}") from exc
        if provenance.get("format") != FORMAT or provenance.get("version") != VERSION:
            raise ContractError(f"{path / PROVENANCE_NAME}: unsupported format/version {provenance.get('version')}")
        recorded = provenance.get("weights_sha256")
        if recorded is not None and file_sha256(path / WEIGHTS_NAME) != recorded:
            raise ContractError(
                f"adapter weights {path / WEIGHTS_NAME} do not match the sha256 recorded in {PROVENANCE_NAME}: the "
                f"file was changed or damaged after training; restore it or train again"
            )
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except json.JSONDecodeError as exc:
        raise ContractError(f"{path / CONFIG_NAME} is not valid JSON: {exc}") from exc
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
