"""Training throughput on identical micro-batches: our engine in each layout against a plain loop and the HF Trainer.

Rows (each in its own process, all fed the very same micro-batches, built once by ``TrainBatches``):

  plain         peft LoRA + torch.optim.AdamW (fused on CUDA) + transformers' own loss, no DeepSpeed: the
                single-device limit                                                    target: replicate >= 0.9x
  replicate     `train_step` with train.sharding=replicate (frozen base whole, ZeRO-1 for the LoRA states)
  zero3         `train_step` with train.sharding=zero3 (frozen base partitioned)       target on 1 GPU >= 0.7x plain
  hf_replicate  transformers Trainer + peft + the replicate layout's DeepSpeed config
  hf_zero3      transformers Trainer + peft + the zero3 layout's DeepSpeed config      target: ours >= 1.3x

Per row: median step time after --warmup steps, tokens/s (real tokens, padding excluded), model TFLOP/s counted as
4N per token (LoRA computes no weight gradients for the frozen weights: 2N forward + 2N input gradients; N = all
parameters but the input embedding; gradient checkpointing's recompute and attention are not counted), MFU
against --peak-tflops, and peak memory (CUDA allocator, or the process's peak RSS on CPU).

    python benchmarks/bench_train_throughput.py                                 # CPU smoke size, ~1 minute
    python benchmarks/bench_train_throughput.py --device cuda --hidden 2048 --layers 16 --vocab 128256 \\
        --seq 2048 --micro-batch 16                                             # the 1.33B model of issue #10
    python benchmarks/bench_train_throughput.py --device cuda --hidden 4096 --intermediate 14336 --layers 4 \\
        --vocab 128256 --seq 2048 --micro-batch 16 --packing --rows plain,replicate   # 8B-shaped layers, ~8k tokens
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Optional


def _device_from_argv(argv: list[str]) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default="cpu")
    return pre.parse_known_args(argv)[0].device


# DeepSpeed picks its accelerator at import: from the parsed --device, in either spelling.
os.environ.setdefault("DS_ACCELERATOR", _device_from_argv(sys.argv[1:]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROWS = ("plain", "replicate", "zero3", "hf_replicate", "hf_zero3")
MIN_SAMPLE_TOKENS = 16
ENGINE_LAYOUT = {"replicate": "replicate", "zero3": "zero3", "hf_replicate": "replicate", "hf_zero3": "zero3"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=0, help="MLP width (default 3x hidden)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=0, help="attention heads (default hidden / 64)")
    parser.add_argument("--kv-heads", type=int, default=0, help="key/value heads (default heads / 4)")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--seq", type=int, default=128, help="longest sample (lengths are skewed below it)")
    parser.add_argument("--micro-batch", type=int, default=4, help="samples per micro-batch")
    parser.add_argument("--packing", action="store_true", help="pack each micro-batch into one row, every row")
    parser.add_argument("--attn", default="auto", help="train.attn_implementation for every row")
    parser.add_argument("--checkpointing", default="true", choices=("true", "false", "auto"),
                        help="train.gradient_checkpointing for every row (auto: as our engine resolves it)")
    parser.add_argument("--micro-batch-tokens", type=int, default=0,
                        help="train.micro_batch_tokens: micro-batches filled up to this many tokens, every row")
    parser.add_argument("--liger", action="store_true",
                        help="Liger's RMSNorm/SwiGLU/RoPE kernels in every row (train.liger_kernels; GPU only)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--profile", metavar="DIR",
                        help="torch-profile one more step after the timed ones (every row); tables to DIR")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_model(root: Path, args) -> Path:
    """A Llama-shaped base model with random weights, saved as a real checkpoint (bf16 on GPU)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    heads = args.heads or max(args.hidden // 64, 1)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.intermediate or 3 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=heads, num_key_value_heads=args.kv_heads or max(heads // 4, 1),
                         max_position_embeddings=max(args.seq, 128), tie_word_embeddings=False)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(root / "base")
    del model
    return root / "base"


def sample_count(args) -> int:
    """Enough samples for every step: a token budget holds at most budget / 16 samples (the shortest is 16)."""
    per_micro_batch = max(args.micro_batch, args.micro_batch_tokens // MIN_SAMPLE_TOKENS + 1)
    return total_steps(args) * per_micro_batch


def build_prepared(root: Path, args) -> Path:
    """Length-skewed samples (most short, a few long; labels on the reply half) through the prepared contract."""
    from datasets import Dataset

    from gift_dist.contracts import prepared as contract

    samples = sample_count(args)
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(args.seq / 6), 0.8, samples), MIN_SAMPLE_TOKENS, args.seq).astype(int)
    rows = {"input_ids": [], "labels": [], "record_index": [], "num_tokens": [], "num_target_tokens": []}
    for i, n in enumerate(lengths):
        ids = rng.integers(10, args.vocab, n).tolist()
        cut = n // 2
        rows["input_ids"].append(ids)
        rows["labels"].append([-100] * cut + ids[cut:])
        rows["record_index"].append(i)
        rows["num_tokens"].append(int(n))
        rows["num_target_tokens"].append(int(n - cut - (1 if cut == 0 else 0)))
    manifest = contract.PreparedManifest(
        fingerprint="bench", tokenizer={}, settings={}, sources=[],
        counts={"records_read": samples, "kept": samples, "dropped": {}},
        tokens={"total": int(sum(rows["num_tokens"])), "target": int(sum(rows["num_target_tokens"]))},
        eos_token_ids=[2], pad_token_id=0,
        shards=contract.plan_shards(rows["num_tokens"], rows["num_target_tokens"], 256))
    contract.write_prepared(root / "prepared", Dataset.from_dict(rows), manifest)
    return root / "prepared"


def total_steps(args) -> int:
    """Warm-up, timed, and one more to profile (never timed: the profiler slows it down)."""
    return args.warmup + args.steps + (1 if args.profile else 0)


def run_config(root: Path, args, layout: str):
    from gift_dist.config import load_config

    return load_config(None, [
        f"base_model={root / 'base'}", f"instruct_model={root / 'base'}", f"output_dir={root / layout}",
        "train.weighting=uniform", f"train.micro_batch_size={args.micro_batch}", "train.progress=false",
        f"train.max_steps={total_steps(args)}", f"train.sharding={layout}", f"train.lora.r={args.lora_r}",
        f"train.lora.alpha={2 * args.lora_r}", f"train.packing={'true' if args.packing else 'false'}",
        f"train.attn_implementation={args.attn}", "train.learning_rate=1e-4",
        f"train.gradient_checkpointing={args.checkpointing}", f"prepare.max_length={args.seq}",
        f"train.micro_batch_tokens={args.micro_batch_tokens}",
        f"train.liger_kernels={'true' if args.liger else 'false'}",
    ])


def micro_batches(cfg, prepared_dir: Path, steps: int):
    """The micro-batches every row trains on: ``TrainBatches``' own, one per step."""
    from gift_dist.contracts.prepared import load_prepared
    from gift_dist.train.data import TrainBatches

    batches = TrainBatches(load_prepared(prepared_dir), cfg.train, 0, 1, None, seed=0)
    return [batches.micro_batches(step) for step in range(steps)]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepProfiler:
    """The last step under torch.profiler: the ops by device time and by host time, how long the GPU was busy
    (the union of its kernels and copies: well below the step time means the host is what the step waits on), and
    where the host synchronised with the device (torch's sync debug mode, counted by call site)."""

    def __init__(self, folder: Optional[str], row: str, last_step: int):
        self.folder, self.row, self.last_step = folder, row, last_step
        self.gpu_busy_s: Optional[float] = None

    def step(self, index: int):
        if self.folder is None or index != self.last_step:
            return contextlib.nullcontext()
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.prof = profile(activities=activities)
        return self

    def __enter__(self):
        self.sync_sites: collections.Counter = collections.Counter()
        if torch.cuda.is_available():
            self._warnings = warnings.catch_warnings()
            self._warnings.__enter__()
            warnings.simplefilter("always")
            warnings.showwarning = self._record_sync
            torch.cuda.set_sync_debug_mode("warn")
        self.prof.__enter__()

    def _record_sync(self, message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename
                  and "warnings.py" not in f.filename and "bench_train_throughput" not in f.filename]
        site = frames[-1] if frames else None
        self.sync_sites[f"{site.filename}:{site.lineno} {site.name}" if site else f"{filename}:{lineno}"] += 1

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode(0)
            self._warnings.__exit__(*exc)
        events = self.prof.events()
        busy = [(e.time_range.start, e.time_range.end) for e in events
                if e.device_type == torch.autograd.DeviceType.CUDA]
        self.gpu_busy_s = union_length(busy) / 1e6 if busy else None
        averages = self.prof.key_averages()
        device_key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        syncs = sum(e.count for e in averages if "Synchronize" in e.key or e.key == "aten::item"
                    or e.key == "aten::_local_scalar_dense")
        span = max(e.time_range.end for e in events) - min(e.time_range.start for e in events)
        busy_line = (f"GPU busy {self.gpu_busy_s * 1e3:.1f} ms of a {span / 1e3:.1f} ms profiled step"
                     if self.gpu_busy_s is not None else "no GPU events")
        sites = "".join(f"  {count:5d}  {site}\n" for site, count in self.sync_sites.most_common(20))
        text = (f"{self.row}: host syncs (cudaStreamSynchronize/cudaDeviceSynchronize/aten::item) {syncs}; "
                f"{busy_line}\nsynchronising call sites (torch sync debug mode):\n{sites}"
                + averages.table(sort_by=device_key, row_limit=25)
                + averages.table(sort_by="cpu_time_total", row_limit=15))
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        (Path(self.folder) / f"profile-{self.row}.txt").write_text(text)


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping intervals (concurrent kernels count once)."""
    total, end = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def engine_times(cfg, steps, profiler: StepProfiler) -> list[float]:
    from gift_dist.train.engine import build_engine
    from gift_dist.train.recipe import train_step

    te = build_engine(cfg, 1, len(steps))
    times = []
    for index, mbs in enumerate(steps):
        sync()
        started = time.perf_counter()
        with profiler.step(index):
            train_step(te, cfg, mbs, 1, None, index + 1)
            sync()
        times.append(time.perf_counter() - started)
    return times


def model_inputs(mb, device, attention: str) -> dict:
    """A micro-batch as transformers' model inputs; varlen attention also gets the packed row's boundaries."""
    from gift_dist.train.engine import VARLEN_ATTENTION

    inputs = {"input_ids": mb.input_ids, "position_ids": mb.position_ids, "labels": mb.labels}
    if mb.attention_mask is not None:
        inputs["attention_mask"] = mb.attention_mask
    if attention in VARLEN_ATTENTION:
        inputs.update(mb.attention_kwargs())
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}


def plain_times(cfg, steps, device: str, profiler: StepProfiler) -> list[float]:
    """peft + torch AdamW + the model's own loss: the single-device limit (``plain_loop.plain_lora_model``)."""
    from plain_loop import plain_lora_model

    from gift_dist.train.engine import attention_implementation

    attention = attention_implementation(cfg.train)
    model, params, optimizer = plain_lora_model(cfg, device, attention)
    times = []
    for index, mbs in enumerate(steps):
        sync()
        started = time.perf_counter()
        with profiler.step(index):
            for mb in mbs:
                loss = model(**model_inputs(mb, device, attention)).loss
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            float(loss)  # any loop logs its loss
        times.append(time.perf_counter() - started)
    return times


def hf_trainer_times(cfg, steps, layout: str, device: str, profiler: StepProfiler) -> list[float]:
    """transformers Trainer + peft + our layout's DeepSpeed config, fed the same micro-batches."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from gift_dist.memory_plan import model_shape
    from gift_dist.train.engine import (apply_liger_kernels, attention_implementation, build_ds_config,
                                        choose_layout)

    shape = model_shape(cfg.base_model, cfg.train.lora.r, cfg.train.lora.target_modules)
    ds_config = build_ds_config(cfg.train, choose_layout(cfg, 1, shape), 1, len(steps), shape)
    ds_config.update(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto",
                     train_batch_size="auto")
    ds_config["optimizer"]["params"]["lr"] = "auto"
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            sync()
            self.profiling = profiler.step(len(times))
            self.profiling.__enter__()
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            sync()
            times.append(time.perf_counter() - self.started)
            self.profiling.__exit__(None, None, None)

    # Created before the model: under ZeRO-3 it is what makes from_pretrained build the model partitioned.
    # Sequential: HF step i trains on micro-batch i, as every other row does (its default order is random).
    training_args = TrainingArguments(
        output_dir=str(Path(cfg.output_dir) / f"hf_{layout}"), per_device_train_batch_size=1, max_steps=len(steps),
        train_sampling_strategy="sequential",
        learning_rate=cfg.train.learning_rate, deepspeed=ds_config, report_to=[], save_strategy="no",
        logging_steps=10**6, gradient_checkpointing=cfg.train.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, remove_unused_columns=False,
        bf16=device == "cuda", dataloader_num_workers=0, lr_scheduler_type="constant",
        max_grad_norm=cfg.train.max_grad_norm, weight_decay=cfg.train.weight_decay,
    )
    attention = attention_implementation(cfg.train)
    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=torch.bfloat16 if device == "cuda"
                                                 else torch.float32, attn_implementation=attention)
    model.config.use_cache = False
    if cfg.train.liger_kernels:
        apply_liger_kernels(model)
    model.enable_input_require_grads()
    from gift_dist.models.lora_targets import resolve_target_modules

    lora = cfg.train.lora
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=resolve_target_modules(model, lora.target_modules),
                                             task_type="CAUSAL_LM"))
    flat = [mb for mbs in steps for mb in mbs]

    def collate(indices):
        return model_inputs(flat[indices[0]], "cpu", attention)

    trainer = Trainer(model=model, args=training_args, train_dataset=list(range(len(flat))), data_collator=collate,
                      callbacks=[StepTimer()])
    trainer.train()
    return times


def resolved_checkpointing(cfg) -> bool:
    from gift_dist.memory_plan import model_shape
    from gift_dist.train.engine import choose_checkpointing, choose_layout

    shape = model_shape(cfg.base_model, cfg.train.lora.r, cfg.train.lora.target_modules)
    return choose_checkpointing(cfg, choose_layout(cfg, 1, shape), 1, shape)[0]


def run_row(args) -> dict:
    root = Path(args.root)
    layout = ENGINE_LAYOUT.get(args.row, "replicate")
    cfg = run_config(root, args, layout)
    from gift_dist import dist

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init(use_deepspeed=True)
    steps = micro_batches(cfg, root / "prepared", total_steps(args))
    checkpointing = resolved_checkpointing(cfg)
    if args.row not in ("replicate", "zero3"):
        cfg.train.gradient_checkpointing = checkpointing  # "auto" made the same choice as our engine's
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    profiler = StepProfiler(args.profile, args.row, args.warmup + args.steps)
    if args.row == "plain":
        times = plain_times(cfg, steps, args.device, profiler)
    elif args.row in ("replicate", "zero3"):
        times = engine_times(cfg, steps, profiler)
    else:
        times = hf_trainer_times(cfg, steps, layout, args.device, profiler)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    tokens = [sum(mb.num_tokens for mb in mbs) for mbs in steps]
    timed = slice(args.warmup, args.warmup + args.steps)
    return {"row": args.row, "times": times[timed], "tokens": tokens[timed], "peak_gib": peak,
            "gpu_busy_s": profiler.gpu_busy_s, "checkpointing": checkpointing}


def count_flop_params(base: Path) -> int:
    """N for the 4N FLOPs per token: every parameter but the input embedding (a lookup, not a matmul)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


def summarise(result: dict, flop_params: int, peak_tflops: float) -> dict:
    step = statistics.median(result["times"])
    tokens_per_s = sum(result["tokens"]) / sum(result["times"])
    tflops = 4 * flop_params * tokens_per_s / 1e12
    return {"row": result["row"], "step_s": step, "tokens_per_step": statistics.mean(result["tokens"]),
            "tokens_per_s": tokens_per_s, "tflops": tflops, "mfu": tflops / peak_tflops,
            "peak_gib": result["peak_gib"], "gpu_busy_s": result.get("gpu_busy_s"), "step_times": result["times"],
            "step_tokens": result["tokens"], "checkpointing": result["checkpointing"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.row:
        print("ROW " + json.dumps(run_row(args)), flush=True)
        return 0
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        print(f"bench_train_throughput: unknown rows {unknown}; choose from {ROWS}", file=sys.stderr)
        return 2
    root = Path(args.root or tempfile.mkdtemp(prefix="bench_throughput_"))
    # The model and samples depend on these only: later runs with the same --root (other rows, packing,
    # attention, kernels) reuse them instead of building a billion-parameter checkpoint again.
    stamp = json.dumps({key: getattr(args, key) for key in ("device", "hidden", "intermediate", "layers", "heads",
                                                            "kv_heads", "vocab", "seq", "micro_batch")}
                       | {"samples": sample_count(args)})
    stamp_file = root / "built.json"
    if not stamp_file.is_file() or stamp_file.read_text() != stamp:
        for built in (root / "base", root / "prepared"):
            shutil.rmtree(built, ignore_errors=True)
        build_model(root, args)
        build_prepared(root, args)
        stamp_file.write_text(stamp)
    flop_params = count_flop_params(root / "base")
    forwarded = list(argv if argv is not None else sys.argv[1:])
    results = []
    for row in rows:
        proc = subprocess.run([sys.executable, __file__, *forwarded, "--row", row, "--root", str(root)],
                              capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
        if proc.returncode != 0 or line is None:
            print(f"row {row} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}",
                  file=sys.stderr)
            return 1
        results.append(summarise(json.loads(line[4:]), flop_params, args.peak_tflops))
    by_row = {r["row"]: r for r in results}
    print(f"\nLlama hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}, N = {flop_params / 1e6:.1f}M "
          f"(4N FLOPs/token); micro-batch of "
          f"{f'up to {args.micro_batch_tokens} tokens' if args.micro_batch_tokens else f'{args.micro_batch} samples'}"
          f" of up to {args.seq} tokens, {'packed' if args.packing else 'padded'}, attention {args.attn}, "
          f"gradient checkpointing {args.checkpointing}; {args.steps} timed steps after "
          f"{args.warmup}; device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'})")
    print(f"{'row':<14}{'step s':>9}{'tokens/step':>13}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}"
          f"{'vs plain':>10}{'GPU busy s':>12}{'recompute':>11}")
    for r in results:
        ratio = r["tokens_per_s"] / by_row["plain"]["tokens_per_s"] if "plain" in by_row else math.nan
        busy = f"{r['gpu_busy_s']:>12.4f}" if r.get("gpu_busy_s") is not None else f"{'-':>12}"
        print(f"{r['row']:<14}{r['step_s']:>9.4f}{r['tokens_per_step']:>13.0f}{r['tokens_per_s']:>11.0f}"
              f"{r['tflops']:>9.2f}{r['mfu']:>7.1%}{r['peak_gib']:>10.2f}{ratio:>9.2f}x{busy}"
              f"{'on' if r['checkpointing'] else 'off':>11}")
    for ours, theirs in (("replicate", "hf_replicate"), ("zero3", "hf_zero3")):
        if ours in by_row and theirs in by_row:
            print(f"{ours} / {theirs} tokens/s: {by_row[ours]['tokens_per_s'] / by_row[theirs]['tokens_per_s']:.2f}x"
                  f" (target >= 1.3x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
