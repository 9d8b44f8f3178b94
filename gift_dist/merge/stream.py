"""The shard-by-shard merge: W += scaling * B @ A on every adapted tensor, streamed through memory.

transformers' ``merge_and_unload`` needs the whole model in RAM (~140 GB for a 70B checkpoint). Here the output
shards' layout is planned from the input headers; tensors the adapter leaves alone are copied as byte ranges, and
each adapted tensor is read, merged in fp32, cast and appended to its output shard, so peak memory is about one
adapted tensor per thread plus the adapter (well under one shard), whatever the model size. A few shards run in
parallel threads (the work is I/O bound), admitted by a byte budget so parallelism never multiplies the peak past
``memory_budget_gb``.

Shards are written as ``<name>.partial`` and renamed, and the plan is recorded in the work folder: a rerun after a
kill keeps the finished shards of the same plan and redoes the rest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from gift_dist.config import ConfigError, MergeConfig
from gift_dist.contracts import ContractError, atomic_write_text, check_finite
from gift_dist.merge.names import MergeTargets, lora_factors
from gift_dist.contracts.shardio import (
    SAFE_DTYPE_OF, TORCH_DTYPE_BY_NAME, TORCH_DTYPE_OF, ShardWriter, TensorRange, TensorSlot, read_header,
    read_tensor, tensor_ranges,
)
from gift_dist.contracts import model_folder

log = logging.getLogger(__name__)

PLAN_NAME = ".gift_merge_plan.json"
PARTIAL_SUFFIX = ".partial"
# fp32 elements per block of rows merged at once (1 MiB: a few such blocks fit in a core's L2 cache).
BLOCK_ELEMENTS = 1 << 18
FLOAT_SAFE_DTYPES = {"F64", "F32", "BF16", "F16"}
# Not weights: everything else at the top of the target dir (config, tokenizer, chat template, ...) is copied.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", PARTIAL_SUFFIX)


@dataclass
class TensorSource:
    name: str
    file: str
    safe_dtype: str
    shape: list[int]
    where: TensorRange

    def out_slot(self, out_dtype: Optional[torch.dtype]) -> TensorSlot:
        """The tensor as the output shard stores it: float tensors take the output dtype, others keep theirs."""
        cast = out_dtype is not None and self.safe_dtype in FLOAT_SAFE_DTYPES
        return TensorSlot(self.name, SAFE_DTYPE_OF[out_dtype] if cast else self.safe_dtype, tuple(self.shape))


@dataclass
class ShardPlan:
    """One output shard: its file name and the input tensors it is made of, in order."""

    name: str
    tensors: list[TensorSource]
    slots: list[TensorSlot]

    @property
    def nbytes(self) -> int:
        return sum(slot.nbytes for slot in self.slots)


def read_sources(model_dir: Path) -> list[TensorSource]:
    """Every tensor of a checkpoint with its file, dtype and shape, from headers only, in index/file order."""
    sources = []
    for path in model_folder.weight_files(model_dir):
        for name, where in tensor_ranges(path, read_header(path)).items():
            sources.append(TensorSource(name, path.name, where.safe_dtype, list(where.shape), where))
    return sources


def plan_output_shards(
    sources: list[TensorSource], out_dtype: Optional[torch.dtype], max_shard_bytes: Optional[int]
) -> list[ShardPlan]:
    """Keep the input's shard layout, or regroup tensors greedily into shards of at most ``max_shard_bytes``."""
    if max_shard_bytes is None:
        by_file: dict[str, list[TensorSource]] = {}
        for source in sources:
            by_file.setdefault(source.file, []).append(source)
        names, groups = list(by_file), list(by_file.values())
    else:
        groups = [[]]
        size = 0
        for source in sources:
            nbytes = source.out_slot(out_dtype).nbytes
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(source)
            size += nbytes
        if len(groups) == 1:
            names = [model_folder.SAFE_SINGLE]
        else:
            names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    return [ShardPlan(n, g, [t.out_slot(out_dtype) for t in g]) for n, g in zip(names, groups)]


def working_bytes(plan: ShardPlan, targets: MergeTargets) -> int:
    """Memory one shard job holds at its peak: an adapted tensor read, its merged copy and the fp32 blocks.

    Untouched tensors are copied inside the kernel and cost nothing; a dtype change reads and casts them.
    """
    peak, merged = 0, targets.names()
    for source, slot in zip(plan.tensors, plan.slots):
        if source.name in merged or slot.safe_dtype != source.safe_dtype:
            peak = max(peak, source.where.nbytes + slot.nbytes + 4 * 4 * BLOCK_ELEMENTS)
    return peak


class ByteBudget:
    """A counting semaphore over bytes: a job waits until its shard fits; one oversized job may run alone."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self.cond = threading.Condition()

    def acquire(self, nbytes: int) -> int:
        nbytes = min(nbytes, self.capacity)
        with self.cond:
            self.cond.wait_for(lambda: self.used + nbytes <= self.capacity)
            self.used += nbytes
        return nbytes

    def release(self, nbytes: int) -> None:
        with self.cond:
            self.used -= nbytes
            self.cond.notify_all()


class BaseReader:
    """Reads single tensors of the base checkpoint (for trained - base deltas of full weights), memory-mapped."""

    def __init__(self, base_dir: Path):
        self.base_dir = base_dir
        self.file_of = {s.name: s.file for s in read_sources(base_dir)}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.file_of:
            raise ContractError(f"base checkpoint {self.base_dir} has no tensor {name} to take a trained delta from")
        with safe_open(str(self.base_dir / self.file_of[name]), framework="pt") as fh:
            return fh.get_tensor(name)


def merged_tensor(
    name: str,
    weight: torch.Tensor,
    targets: MergeTargets,
    strength: float,
    base: Optional[BaseReader],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """One adapted tensor, merged in fp32 and cast to ``out_dtype``.

    The work goes block of rows by block of rows: the fp32 temporaries of a block stay in the CPU cache, where a
    whole-tensor ``W.float() + B @ A`` would stream several fp32 copies of the weight through main memory.
    """
    out = torch.empty(weight.shape, dtype=out_dtype)
    pair, full = targets.lora.get(name), targets.full.get(name)
    left, right = lora_factors(pair) if pair is not None else (None, None)
    if full is not None:
        trained = full.tensor
        reference = base.get(name) if base is not None else weight
    rows = max(1, BLOCK_ELEMENTS // max(1, weight[0].numel())) if weight.dim() else 1
    for start in range(0, max(1, weight.shape[0] if weight.dim() else 1), rows):
        part = slice(start, start + rows) if weight.dim() else ...
        block = weight[part].to(torch.float32, copy=True)
        if pair is not None:
            block.addmm_(left[part], right, alpha=pair.scaling)
        if full is not None:
            block += strength * (trained[part].float() - reference[part].float())
        out[part] = block
    # A NaN/inf here would be written into the merged model silently; the inputs were checked, so this names the
    # overflow of an out_dtype too narrow for W + BA (float16), or a damaged target weight.
    check_finite(out, f"merged tensor {name}")
    return out


def write_merged_shard(
    plan: ShardPlan,
    work_dir: Path,
    targets: MergeTargets,
    strength: float,
    base: Optional[BaseReader],
) -> None:
    """Copy untouched tensors as byte ranges, merge adapted ones; the shard gets its name only once complete."""
    partial = work_dir / (plan.name + PARTIAL_SUFFIX)
    merged = targets.names()
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(ShardWriter(partial, plan.slots, metadata={"format": "pt"}))
        handles = {}
        for source, slot in zip(plan.tensors, plan.slots):
            if source.file not in handles:
                handles[source.file] = stack.enter_context(open(source.where.path, "rb"))
            fh = handles[source.file]
            if source.name not in merged and slot.safe_dtype == source.safe_dtype:
                writer.copy(source.name, fh, source.where)
                continue
            weight = read_tensor(fh, source.where)
            dtype = TORCH_DTYPE_OF[slot.safe_dtype]
            if source.name in merged:
                weight = merged_tensor(source.name, weight, targets, strength, base, dtype)
            writer.write(source.name, weight.to(dtype))
    os.replace(partial, work_dir / plan.name)


def plan_fingerprint(plans: list[ShardPlan], identity: dict) -> dict:
    shards = [{"name": p.name, "tensors": [asdict(slot) for slot in p.slots],
               "sources": sorted({t.file for t in p.tensors})} for p in plans]
    return json.loads(json.dumps({"identity": identity, "shards": shards}))


def prepare_work_dir(work_dir: Path, fingerprint: dict) -> set[str]:
    """Reuse a leftover work dir of the same plan (returning its finished shards); wipe one of another plan."""
    plan_path = work_dir / PLAN_NAME
    if work_dir.exists():
        same = False
        if plan_path.is_file():
            try:
                same = json.loads(plan_path.read_text()) == fingerprint
            except json.JSONDecodeError:
                same = False
        if not same:
            log.info("removing leftover merge work dir %s (made for another plan)", work_dir)
            shutil.rmtree(work_dir)
    if not work_dir.exists():
        work_dir.mkdir(parents=True)
        atomic_write_text(plan_path, json.dumps(fingerprint, sort_keys=True))
        return set()
    done = set()
    shard_names = {s["name"] for s in fingerprint["shards"]}
    for path in work_dir.iterdir():
        if path.name.endswith(PARTIAL_SUFFIX):
            path.unlink()
        elif path.name in shard_names:
            try:
                read_header(path)
                done.add(path.name)
            except ContractError:
                path.unlink()
    if done:
        log.info("resuming merge in %s: %d of %d shards already written", work_dir, len(done), len(shard_names))
    return done


def write_index(work_dir: Path, plans: list[ShardPlan]) -> None:
    weight_map = {t.name: p.name for p in plans for t in p.tensors}
    index = {"metadata": {"total_size": sum(p.nbytes for p in plans)}, "weight_map": weight_map}
    (work_dir / model_folder.SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def copy_model_files(source_dir: Path, work_dir: Path, out_dtype_name: str) -> None:
    """Config, generation config, tokenizer and chat template come from the target model unchanged (dtype aside)."""
    for path in source_dir.iterdir():
        if path.is_file() and not path.name.startswith(".") and not path.name.endswith(WEIGHT_SUFFIXES) \
                and path.name != model_folder.SAFE_INDEX:
            shutil.copy2(path, work_dir / path.name)
    config_path = work_dir / "config.json"
    if out_dtype_name != "auto" and config_path.is_file():
        config = json.loads(config_path.read_text())
        config["dtype"] = out_dtype_name
        config.pop("torch_dtype", None)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def torch_single_threaded():
    """Shard threads are the merge's parallelism: torch's own intra-op threads on cache-sized blocks only add
    synchronisation (measured 8x slower on a loaded 2-core machine). Restored afterwards for the caller."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def stream_merge(
    source_dir: Path,
    work_dir: Path,
    targets: MergeTargets,
    opts: MergeConfig,
    identity: dict,
    base_dir: Optional[Path] = None,
    throttle_seconds: float = 0.0,
) -> list[str]:
    """Write every merged shard (and the index) of ``source_dir`` into ``work_dir``; returns the shard names.

    ``opts``: strength (``scale``), dtype, shard size, threads, memory budget and progress of the merge.
    ``throttle_seconds`` sleeps after each shard: a debugging aid to interrupt a merge midway on purpose.
    """
    strength, dtype, max_shard_size = opts.scale, opts.dtype, opts.max_shard_size
    from tqdm.auto import tqdm
    from transformers.utils.hub import convert_file_size_to_int

    out_dtype = TORCH_DTYPE_BY_NAME.get(dtype)
    try:
        max_bytes = convert_file_size_to_int(max_shard_size) if max_shard_size else None
    except ValueError as exc:
        raise ConfigError(f"config key 'merge.max_shard_size': {max_shard_size!r} is not a size like 5GB") from exc
    sources = read_sources(source_dir)
    plans = plan_output_shards(sources, out_dtype, max_bytes)
    done = prepare_work_dir(work_dir, plan_fingerprint(plans, {**identity, "strength": strength, "dtype": dtype}))
    todo = [p for p in plans if p.name not in done]
    base = BaseReader(base_dir) if targets.full and base_dir is not None else None
    budget = ByteBudget(max(1, int(opts.memory_budget_gb * 1024**3)))
    bar = tqdm(total=sum(p.nbytes for p in plans), initial=sum(p.nbytes for p in plans if p.name in done),
               unit="B", unit_scale=True, unit_divisor=1024, desc="merge", disable=not opts.progress)

    def run(plan: ShardPlan) -> None:
        held = budget.acquire(working_bytes(plan, targets))
        try:
            write_merged_shard(plan, work_dir, targets, strength, base)
        finally:
            budget.release(held)
        bar.update(plan.nbytes)
        if throttle_seconds:
            time.sleep(throttle_seconds)

    started = time.perf_counter()
    workers = ThreadPoolExecutor(max_workers=max(1, opts.threads), thread_name_prefix="merge")
    with torch_single_threaded(), workers as pool:
        for future in [pool.submit(run, plan) for plan in todo]:
            future.result()
    bar.close()
    written = sum(p.nbytes for p in todo)
    elapsed = max(time.perf_counter() - started, 1e-9)
    log.info("merged %d shards (%.2f GB) in %.1f s: %.2f GB/s", len(todo), written / 1e9, elapsed,
             written / 1e9 / elapsed)
    if len(plans) > 1 or (source_dir / model_folder.SAFE_INDEX).is_file():
        write_index(work_dir, plans)
    return [p.name for p in plans]
