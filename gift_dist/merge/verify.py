"""`gift-dist verify-merge`: check a merged model against its inputs.

Two checks, the second only on models small enough to load twice:
  * tensors: a sample of merged tensors (plus one the adapter leaves alone) is recomputed from the target
    checkpoint and the adapter and compared with what the merged checkpoint holds, in the merged dtype's precision;
  * logits: the merged model and ``PeftModel.from_pretrained(target, adapter)`` (unmerged, same strength, trained
    full tensors grafted as trained - base) read a few chat prompts; the largest logit difference is reported.
A difference beyond tolerance is a ContractError naming the tensor or the prompt.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from gift_dist.config import RunConfig, add_config_arguments, config_from_args
from gift_dist.contracts import ContractError, check_finite, max_abs_diff
from gift_dist.contracts import adapter as adapter_contract
from gift_dist.contracts import merged as merged_contract
from gift_dist.contracts import model_folder
from gift_dist.merge import names, stream

log = logging.getLogger(__name__)

# Logit tolerance relative to the largest reference logit: fp32 merges differ from peft's unmerged forward only by
# summation order; a 16-bit output rounds every weight.
LOGIT_RTOL = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
NUM_PROMPTS = 3


@dataclass
class MergeVerifyReport:
    checked_tensors: list[str] = field(default_factory=list)
    max_tensor_diff: float = 0.0
    logits_compared: bool = False
    # NaN when the model was too large to compare logits.
    max_logit_diff: float = math.nan
    checksums_verified: int = 0

    def summary(self) -> str:
        logits = f"max |logit diff| {self.max_logit_diff:.3e}" if self.logits_compared else "logits not compared"
        return (f"{self.checksums_verified} shard checksums verified; {len(self.checked_tensors)} tensors recomputed "
                f"(max |diff| {self.max_tensor_diff:.3e}); {logits}")


class Inputs:
    """What a merged dir was made from: target checkpoint, adapter mapped onto it, base for full tensors."""

    def __init__(self, merged: merged_contract.Merged, adapter_dir: Path, target_dir: Path, base_dir: Optional[Path]):
        self.merged, self.target_dir, self.adapter_dir = merged, target_dir, adapter_dir
        self.adapter = adapter_contract.read_adapter(adapter_dir)
        config = json.loads((target_dir / "config.json").read_text())
        self.targets = names.map_adapter(self.adapter.config, self.adapter.tensors,
                                         model_folder.tensor_shapes(target_dir), config.get("model_type"),
                                         merged.record.strength)
        into_base = merged.record.into == "base"
        self.base = stream.BaseReader(base_dir) if self.targets.full and base_dir and not into_base else None
        if self.targets.full and not into_base and self.base is None:
            raise ContractError("the adapter carries whole trained tensors: verifying them needs the base model")

    def expected(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The merged value in fp32, computed whole (not block by block as the merge does)."""
        pair, full = self.targets.lora.get(name), self.targets.full.get(name)
        expected = weight.float()
        if pair is not None:
            left, right = names.lora_factors(pair)
            expected = expected + pair.scaling * (left @ right)
        if full is not None:
            reference = self.base.get(name) if self.base is not None else weight
            expected = expected + self.merged.record.strength * (full.tensor.float() - reference.float())
        return expected


def tensor_locations(model_dir: Path) -> dict[str, Path]:
    return {s.name: model_dir / s.file for s in stream.read_sources(model_dir)}


def sample_names(merged_names: list[str], all_names: list[str], count: int) -> list[str]:
    """Evenly spread merged tensors (first and last included) plus the first tensor the adapter leaves alone."""
    picked = merged_names if len(merged_names) <= count else [
        merged_names[round(i * (len(merged_names) - 1) / max(count - 1, 1))] for i in range(count)
    ]
    untouched = next((n for n in all_names if n not in set(merged_names)), None)
    return list(dict.fromkeys(picked + ([untouched] if untouched else [])))


def check_tensors(inputs: Inputs, count: int, report: MergeVerifyReport) -> None:
    from safetensors import safe_open

    merged_at = tensor_locations(inputs.merged.path)
    target_at = tensor_locations(inputs.target_dir)
    for name in sample_names(inputs.merged.record.merged_tensors, list(target_at), count):
        if name not in merged_at:
            raise ContractError(f"merged model {inputs.merged.path} lacks tensor {name}")
        with safe_open(str(target_at[name]), framework="pt") as fh:
            weight = fh.get_tensor(name)
        with safe_open(str(merged_at[name]), framework="pt") as fh:
            actual = fh.get_tensor(name)
        expected = inputs.expected(name, weight) if name in inputs.targets.names() else weight
        expected = expected.to(actual.dtype).float()
        check_finite(actual, f"merged tensor {name} in {merged_at[name]}")
        diff = max_abs_diff(actual, expected)
        # A few ulps: the merge sums block by block, the recomputation in one matmul.
        tolerance = 4 * torch.finfo(actual.dtype).eps * max(1.0, expected.abs().max().item()) if \
            actual.is_floating_point() else 0.0
        if actual.shape != expected.shape or not diff <= tolerance:
            raise ContractError(
                f"merged tensor {name} in {merged_at[name]} differs from its recomputation by {diff:.3e} "
                f"(tolerance {tolerance:.1e})"
            )
        report.checked_tensors.append(name)
        report.max_tensor_diff = max(report.max_tensor_diff, diff)


def prompts(tokenizer) -> list[torch.Tensor]:
    """A few chat prompts from the bundled data, rendered with the model's own template."""
    from gift_dist import bundled

    records = bundled.read_jsonl(bundled.bundled_data_path())[:NUM_PROMPTS]
    out = []
    for record in records:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(record["messages"], tokenize=False)
        else:
            text = "\n".join(m["content"] for m in record["messages"])
        out.append(torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:256]]))
    return out


def graft_full_weights(peft_model: torch.nn.Module, inputs: Inputs) -> None:
    """peft replaces modules_to_save with the trained copy; the merge grafts trained - base onto the target."""
    from safetensors import safe_open

    target_at = tensor_locations(inputs.target_dir)
    wanted = {}
    for name, full in inputs.targets.full.items():
        with safe_open(str(target_at[name]), framework="pt") as fh:
            wanted[names.module_path(full.key)] = inputs.expected(name, fh.get_tensor(name))
    params = dict(peft_model.named_parameters())
    for param_name, param in params.items():
        path = names.module_path(param_name)
        if ".modules_to_save.default." not in path and ".base_layer." not in path:
            continue
        plain = path.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")
        if plain in wanted:
            with torch.no_grad():
                param.copy_(wanted[plain].to(param.dtype))


def compare_logits(inputs: Inputs, report: MergeVerifyReport) -> None:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(str(inputs.merged.path), dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(str(inputs.target_dir), dtype=torch.float32)
    reference = PeftModel.from_pretrained(reference, str(inputs.adapter_dir)).eval()
    strength = inputs.merged.record.strength
    if strength != 1.0:
        for module in reference.modules():
            if isinstance(module, LoraLayer):
                module.scale_layer(strength)
    graft_full_weights(reference, inputs)
    tokenizer = AutoTokenizer.from_pretrained(str(inputs.merged.path))
    rtol = LOGIT_RTOL[stored_precision(inputs.merged.path)]
    worst = 0.0
    with torch.no_grad():
        for number, ids in enumerate(prompts(tokenizer)):
            expected = reference(input_ids=ids).logits
            actual = merged(input_ids=ids).logits
            check_finite(actual, f"merged model {inputs.merged.path}: logits on verification prompt {number}")
            diff = max_abs_diff(actual, expected)
            tolerance = rtol * max(1.0, expected.abs().max().item())
            if not diff <= tolerance:
                raise ContractError(
                    f"merged model {inputs.merged.path}: logits on verification prompt {number} differ from "
                    f"PeftModel({inputs.target_dir}, {inputs.adapter_dir}) by {diff:.3e} (tolerance {tolerance:.1e})"
                )
            worst = max(worst, diff)
    report.logits_compared = True
    report.max_logit_diff = worst


def stored_precision(model_dir: Path) -> str:
    """The coarsest float dtype a checkpoint stores, which bounds how closely its logits can match fp32."""
    dtypes = {s.safe_dtype for s in stream.read_sources(model_dir)}
    return "bfloat16" if "BF16" in dtypes else "float16" if "F16" in dtypes else "float32"


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(path.stat().st_size for path in model_folder.weight_files(model_dir))


def verify_merged(
    cfg: RunConfig,
    merged_dir: Optional[str] = None,
    adapter_dir: Optional[str] = None,
    target_dir: Optional[str] = None,
    base_dir: Optional[str] = None,
) -> MergeVerifyReport:
    """Recompute sample tensors and compare logits with peft (models up to merge.verify_logits_max_gb), or
    recompute every adapted tensor (bigger models); recompute the shard checksums; ContractError on mismatch."""
    merged = merged_contract.read_merged(merged_dir or cfg.paths.merged)
    target = target_dir or merged.record.target["name"]
    base = base_dir or (merged.record.base or {}).get("name") or cfg.base_model or None
    model_folder.require_model(target, "the model merged into")
    inputs = Inputs(merged, Path(adapter_dir or merged.record.adapter["path"]), Path(target),
                    Path(base) if base else None)
    report = MergeVerifyReport()
    small = checkpoint_bytes(inputs.target_dir) <= cfg.merge.verify_logits_max_gb * 1024**3
    # A model too big for the logit comparison gets every adapted tensor recomputed (streamed, one at a time)
    # instead of a sample: the recomputation is then the only end-to-end check of the merge arithmetic.
    count = cfg.merge.verify_sample_tensors if small else len(merged.record.merged_tensors)
    check_tensors(inputs, count, report)
    if small:
        compare_logits(inputs, report)
    # Last: the recomputations above name a wrong tensor; this catches damage anywhere else in the files.
    report.checksums_verified = merged_contract.verify_checksums(merged)
    log.info("verify-merge %s: %s", merged.path, report.summary())
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, sections=("merge",))
    parser.add_argument("--merged", help="merged model dir (default: the run's merged/)")
    parser.add_argument("--adapter", help="adapter dir (default: the one recorded in gift_merge.json)")
    parser.add_argument("--target", help="model merged into (default: the one recorded in gift_merge.json)")
    parser.add_argument("--base", help="base model, for adapters with modules_to_save (default: recorded)")


def run(args: argparse.Namespace) -> int:
    report = verify_merged(config_from_args(args), args.merged, args.adapter, args.target, args.base)
    print(f"ok: {report.summary()}")
    return 0
