"""`gift-dist merge`: the trained LoRA merged into the instruct model (or the base), streamed shard by shard.

The recipe:
  1. read the adapter contract and the target checkpoint's headers (a missing shard, corrupt header or pickle-only
     checkpoint stops here);
  2. check the adapter was trained on this architecture (adapter config, gift_adapter.json identity, shapes) and
     map every adapter key to the checkpoint tensor it changes;
  3. stream the merge into a work folder beside the output (reusing finished shards of an interrupted run), copy
     config/tokenizer/chat template, write gift_merge.json;
  4. optionally verify it there (recompute a sample of merged tensors, compare logits with peft on small models);
  5. rename the folder into place.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional

from gift_dist import dist
from gift_dist.config import (
    ConfigError,
    MergeConfig,
    RunConfig,
    add_config_arguments,
    config_from_args,
    result_settings,
)
from gift_dist.contracts import ContractError, recover_directory, replace_directory, require_writable
from gift_dist.contracts import adapter as adapter_contract
from gift_dist.contracts import merged as merged_contract
from gift_dist.contracts import model_folder
from gift_dist.merge import names, stream
from gift_dist.models.pair import SHAPE_KEYS, check_pair

log = logging.getLogger(__name__)

WORK_SUFFIX = ".merging"
# The gift_merge.json field that holds each merge setting shaping the merged weights (config.result_settings of
# MergeConfig: every setting not marked operational). Merge writes them, `run` compares them to tell whether
# merged/ is this config's merge; a new result-shaping setting needs its field here and in MergeRecord.
RECORD_FIELDS = {"into": "into", "scale": "strength", "dtype": "dtype"}


def recorded_settings(settings: MergeConfig) -> dict:
    """The merge settings that shape the merged weights, by the name of the MergeRecord field that holds each."""
    return {RECORD_FIELDS[key]: value for key, value in result_settings(MergeConfig, settings).items()}


def merge_paths(
    cfg: RunConfig, adapter_dir: Optional[str], target_dir: Optional[str], output_dir: Optional[str],
    base_dir: Optional[str],
) -> tuple[Path, Path, Path, Optional[Path]]:
    """Adapter, target, output and (optional) base dirs: explicit arguments win over the run config."""
    into = cfg.merge.into
    target = target_dir or (cfg.instruct_model if into == "instruct" else cfg.base_model)
    if not target:
        key = "instruct_model" if into == "instruct" else "base_model"
        raise ConfigError(f"merge into {into} needs the model: set config key '{key}' or pass --target")
    base = base_dir or cfg.base_model or None
    if into == "base":
        base = target
    return (Path(adapter_dir or cfg.paths.adapter), Path(target), Path(output_dir or cfg.paths.merged),
            Path(base) if base else None)


def check_adapter_fits(adapter: adapter_contract.Adapter, target: Path, base: Optional[Path]) -> None:
    """Refuse an adapter whose recorded training model is of another architecture than the target."""
    target_config = json.loads((target / "config.json").read_text()) if (target / "config.json").is_file() else {}
    trained_on = adapter.config.get("base_model_name_or_path")
    if trained_on and Path(trained_on, "config.json").is_file() and target_config:
        trained_config = json.loads(Path(trained_on, "config.json").read_text())
        for key in ("model_type",) + SHAPE_KEYS:
            if key in trained_config and key in target_config and trained_config[key] != target_config[key]:
                raise ContractError(
                    f"adapter {adapter.path} was trained on {trained_on} ({key}={trained_config[key]!r}) but the "
                    f"merge target {target} has {key}={target_config[key]!r}"
                )
    recorded = adapter.provenance.base_model if adapter.provenance is not None else None
    if recorded and base is not None:
        actual = model_folder.model_identity(str(base))
        if actual["hash"] != recorded["hash"]:
            raise ContractError(
                f"adapter {adapter.path} was trained on {recorded.get('name')} (hash {recorded['hash']}) but the "
                f"base model given is {base} (hash {actual['hash']})"
            )


def recorded_instruct(provenance: Optional[adapter_contract.AdapterProvenance]) -> Optional[dict]:
    """The identity of the instruct model an adapter was made for, as its provenance records it: the run's
    instruct model (whose confidence weighted the loss), or for direct fine-tuning the model trained itself."""
    if provenance is None:
        return None
    if provenance.instruct_model:
        return provenance.instruct_model
    return provenance.model_identity if provenance.train_model == "instruct" else None


def check_instruct_target(adapter: adapter_contract.Adapter, target_identity: dict, into: str,
                          allow_other: bool) -> Optional[dict]:
    """Refuse merging into an instruct model other than the one the adapter was scored/trained for, unless
    ``merge.allow_other_instruct``; returns that recorded identity when the merge goes into another one."""
    recorded = recorded_instruct(adapter.provenance)
    if into != "instruct" or not recorded or recorded.get("hash") == target_identity["hash"]:
        return None
    made_for = "trained on" if adapter.provenance.train_model == "instruct" else "scored and trained for"
    if not allow_other:
        raise ContractError(
            f"adapter {adapter.path} was {made_for} the instruct model {recorded.get('name')} (hash "
            f"{recorded.get('hash')}) but the merge target {target_identity['name']} has hash "
            f"{target_identity['hash']}: merge into that instruct model (instruct_model / --target), or set "
            f"merge.allow_other_instruct=true if you mean to merge into another one"
        )
    log.warning("merging adapter %s, %s instruct model %s (hash %s), into another instruct model %s (hash %s) "
                "(merge.allow_other_instruct=true)", adapter.path, made_for, recorded.get("name"),
                recorded.get("hash"), target_identity["name"], target_identity["hash"])
    return dict(recorded)


def install(work_dir: Path, output: Path, overwrite: bool) -> None:
    """Move a finished work folder to the output path (``replace_directory``: a replaced output is removed only
    after the move, and one a crash left aside is put back by the next merge)."""
    if output.exists() and not overwrite:
        raise ContractError(f"output directory {output} exists; pass --overwrite (merge.overwrite=true) to replace")
    replace_directory(work_dir, output)


def merge(
    cfg: RunConfig,
    adapter_dir: Optional[str] = None,
    target_dir: Optional[str] = None,
    output_dir: Optional[str] = None,
    base_dir: Optional[str] = None,
    throttle_seconds: float = 0.0,
) -> Path:
    """Merge the run's adapter into the instruct (or base) checkpoint; returns the merged model dir. One writer
    per output: the merge lock of the run folder, or of the output's parent when --output is outside it."""
    adapter_path, target, output, base = merge_paths(cfg, adapter_dir, target_dir, output_dir, base_dir)
    require_writable(output.parent, "the merge output's parent directory")
    with dist.stage_lock(lock_folder(cfg.paths.root, output), "merge"):
        return _merge(cfg, adapter_path, target, output, base, throttle_seconds)


def lock_folder(run_folder: Path, output: Path) -> Path:
    """The folder whose stage lock guards ``output``: the run folder when it holds ``output``, else its parent."""
    run_folder, output = Path(run_folder).absolute(), Path(output).absolute()
    return run_folder if run_folder in output.parents else output.parent


def _merge(cfg: RunConfig, adapter_path: Path, target: Path, output: Path, base: Optional[Path],
           throttle_seconds: float) -> Path:
    opts = cfg.merge
    for model in (target, base):
        if model is not None and (output.resolve() == model.resolve() or model.resolve() in output.resolve().parents):
            raise ConfigError(f"output directory {output} would replace or sit inside the input model {model}")
    # A merged model a crash left aside while it was being replaced is the output again before anything is decided.
    recover_directory(output)
    if output.exists() and not opts.overwrite:
        raise ContractError(f"output directory {output} exists; pass --overwrite (merge.overwrite=true) to replace")
    model_folder.require_model(target, "the merge target")
    if base is not None:
        model_folder.require_model(base, "the base model")
    adapter = adapter_contract.read_adapter(adapter_path)
    int8_base = adapter_contract.int8_base_note(adapter.provenance)
    if int8_base:
        log.warning("adapter %s was %s", adapter_path, int8_base)
    quantized_base = adapter_contract.quantized_base_note(adapter.provenance)
    if quantized_base:
        log.warning("adapter %s was %s", adapter_path, quantized_base)
    shapes = model_folder.tensor_shapes(target)
    if base is not None and base != target:
        check_pair(str(base), str(target), cfg.trust_remote_code)
    check_adapter_fits(adapter, target, base)
    model_type = json.loads((target / "config.json").read_text()).get("model_type") \
        if (target / "config.json").is_file() else None
    targets = names.map_adapter(adapter.config, adapter.tensors, shapes, model_type, opts.scale)
    if targets.full and base is None:
        raise ContractError(
            f"adapter {adapter_path} carries whole trained tensors ({', '.join(sorted(targets.full))}: "
            f"modules_to_save or saved embeddings); merging them into {target} needs their delta from the base "
            f"model: set config key 'base_model' or pass --base"
        )
    identity = {
        "target": model_folder.model_identity(str(target)),
        "base": model_folder.model_identity(str(base)) if base is not None else None,
        "adapter": {"path": str(adapter_path.resolve()), "hash": adapter_contract.adapter_hash(adapter_path)},
    }
    other_instruct = check_instruct_target(adapter, identity["target"], opts.into, opts.allow_other_instruct)
    work_dir = output.with_name(output.name + WORK_SUFFIX)
    log.info("merging %d LoRA tensors and %d full tensors of %s into %s -> %s", len(targets.lora),
             len(targets.full), adapter_path, target, output)
    shards = stream.stream_merge(target, work_dir, targets, opts, identity,
                                 base_dir=base if opts.into == "instruct" else None, throttle_seconds=throttle_seconds)
    stream.copy_model_files(target, work_dir, opts.dtype)
    record = merged_contract.MergeRecord(
        base=identity["base"], target=identity["target"], adapter=identity["adapter"], lora_scaling=adapter.scale,
        **recorded_settings(opts), merged_tensors=sorted(targets.names()), shards=shards,
        shard_sha256=merged_contract.shard_checksums(work_dir, shards), other_instruct=other_instruct,
        int8_base_weights=int8_base, quantized_base=quantized_base,
    )
    merged_contract.write_record(work_dir, record)
    if opts.verify:
        # Checked before the rename: a merge that fails verification never appears at the output path.
        from gift_dist.merge.verify import verify_merged

        verify_merged(cfg, merged_dir=str(work_dir), adapter_dir=str(adapter_path), target_dir=str(target),
                      base_dir=str(base) if base is not None else None)
    (work_dir / stream.PLAN_NAME).unlink()
    install(work_dir, output, opts.overwrite)
    log.info("merged model written to %s", output)
    return output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, sections=("merge",))
    parser.add_argument("--adapter", help="adapter dir (default: the run's adapter/)")
    parser.add_argument("--target", help="model dir to merge into (default: instruct_model, or base_model with "
                                         "--into base)")
    parser.add_argument("--base", help="base model dir, for adapters with modules_to_save (default: base_model)")
    parser.add_argument("--output", help="merged model dir (default: the run's merged/)")
    parser.add_argument("--scale", type=float, help="blend strength of the adapter (merge.scale, default 1.0)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="output dtype")
    parser.add_argument("--into", choices=["instruct", "base"], help="merge into the instruct model or the base")
    parser.add_argument("--max-shard-size", help="reshard the output, e.g. 5GB (default: keep the input's shards)")
    parser.add_argument("--threads", type=int, help="shards merged in parallel (merge.threads)")
    parser.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output dir")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                        help="recompute sample tensors and compare logits with peft afterwards")
    parser.add_argument("--throttle-seconds", type=float, default=0.0,
                        help="debugging: sleep after each shard (to interrupt a merge midway on purpose)")


def apply_arguments(cfg: RunConfig, args: argparse.Namespace) -> RunConfig:
    """Command-line flags override the config's merge section."""
    for flag in ("scale", "dtype", "into", "max_shard_size", "threads", "overwrite", "verify"):
        value = getattr(args, flag, None)
        if value is not None:
            setattr(cfg.merge, flag, value)
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = apply_arguments(config_from_args(args), args)
    output = merge(cfg, args.adapter, args.target, args.output, args.base, args.throttle_seconds)
    print(f"merged model: {output}")
    record = merged_contract.read_merged(output).record
    for note in (record.int8_base_weights, record.quantized_base):
        if note:
            print(f"adapter {note}")
    return 0
