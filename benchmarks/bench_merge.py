"""Streaming merge vs peft's merge_and_unload vs a plain copy: peak RSS and wall time, each in its own process.

    PYTHONPATH=. python benchmarks/bench_merge.py --workdir /tmp/bench_merge --repeats 3

Builds (once, reused) a randomly initialised llama checkpoint from a config (default: hidden 1024, 12 layers,
vocab 32000, bf16, 100MB shards, ~400 MB in 5 shards) and a LoRA on all linear layers with non-zero lora_B, then
runs, in alternating order per repeat, each in a fresh subprocess:
  ours      gift_dist.merge.stage.merge (verify off)
  peft      AutoModelForCausalLM.from_pretrained(instruct) + PeftModel.from_pretrained + merge_and_unload +
            save_pretrained (same shard size)
  copy      read + write of the same safetensors files, byte for byte (the I/O floor)
Peak RSS is the child's VmHWM from /proc (ru_maxrss is not used: Linux carries it over an exec from the parent);
"above imports" subtracts the RSS measured after the child's imports, before any work.
Targets (issue #7 part 3): ours wall <= 1.3x copy; ours peak RSS ~ one shard and <= 1/3 of peft's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

MB = 1024**2


def rss_now() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """This process's high-water resident set (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def build(workdir: Path, hidden: int, layers: int, vocab: int, dtype: str, shard: str) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    instruct, adapter = workdir / "instruct", workdir / "adapter"
    if (instruct / "config.json").is_file() and (adapter / "adapter_config.json").is_file():
        return instruct, adapter
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                         tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(str(instruct), max_shard_size=shard)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"])
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.01)
    peft_model.save_pretrained(str(adapter))
    return instruct, adapter


def child(kind: str, instruct: Path, adapter: Path, output: Path, shard: str, threads: int) -> dict:
    """Run one measured job in this (fresh) process and return its numbers."""
    # Every job imports the same libraries before the baseline, so RSS and wall time compare the work alone.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401  (ours maps names through it)
    from transformers.utils.hub import convert_file_size_to_int  # noqa: F401

    from gift_dist.config import RunConfig
    from gift_dist.merge.stage import merge

    baseline = rss_now()
    started = time.perf_counter()
    if kind == "ours":
        cfg = RunConfig(instruct_model=str(instruct), output_dir=str(output.parent))
        cfg.merge.verify, cfg.merge.progress, cfg.merge.threads = False, False, threads
        merge(cfg, adapter_dir=str(adapter), output_dir=str(output))
    elif kind == "peft":
        model = AutoModelForCausalLM.from_pretrained(str(instruct))
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model.save_pretrained(str(output), max_shard_size=shard)
    else:
        output.mkdir(parents=True)
        for path in sorted(instruct.glob("*.safetensors")):
            with open(path, "rb") as src, open(output / path.name, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 * MB)
    wall = time.perf_counter() - started
    peak = peak_rss()
    return {"kind": kind, "wall_s": wall, "peak_rss": peak, "baseline_rss": baseline}


def measure(kind: str, instruct: Path, adapter: Path, workdir: Path, shard: str, threads: int) -> dict:
    output = workdir / f"out_{kind}"
    shutil.rmtree(output, ignore_errors=True)
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--workdir", str(workdir), "--shard", shard,
                           "--threads", str(threads)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    shutil.rmtree(output, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/bench_merge")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--shard", default="100MB", help="max shard size of the checkpoint (and of peft's output)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="merge.threads for our merge")
    parser.add_argument("--child", choices=["ours", "peft", "copy"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    if args.child:
        print(json.dumps(child(args.child, workdir / "instruct", workdir / "adapter", workdir / f"out_{args.child}",
                               args.shard, args.threads)))
        return
    workdir.mkdir(parents=True, exist_ok=True)
    instruct, adapter = build(workdir, args.hidden, args.layers, args.vocab, args.dtype, args.shard)
    shards = sorted(instruct.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in shards)
    largest = max(p.stat().st_size for p in shards)
    print(f"checkpoint: {len(shards)} shards, {total / MB:.0f} MiB (largest shard {largest / MB:.0f} MiB); "
          f"our merge with {args.threads} threads")
    kinds = ["ours", "peft", "copy"]
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    measure("copy", instruct, adapter, workdir, args.shard, args.threads)  # warm the page cache once for everyone
    for repeat in range(args.repeats):
        for kind in kinds[repeat % 3:] + kinds[: repeat % 3]:
            results[kind].append(measure(kind, instruct, adapter, workdir, args.shard, args.threads))
    med = {k: {f: statistics.median(r[f] for r in rs) for f in ("wall_s", "peak_rss", "baseline_rss")}
           for k, rs in results.items()}
    print(f"{'job':<6} {'wall s':>8} {'peak RSS MiB':>13} {'above imports MiB':>18}   (medians of {args.repeats})")
    for kind in kinds:
        m = med[kind]
        above = (m["peak_rss"] - m["baseline_rss"]) / MB
        print(f"{kind:<6} {m['wall_s']:>8.2f} {m['peak_rss'] / MB:>13.0f} {above:>18.0f}")
    ours, peft, copy = med["ours"], med["peft"], med["copy"]
    print(f"wall: ours / copy = {ours['wall_s'] / copy['wall_s']:.2f} (target <= 1.3); "
          f"ours / peft = {ours['wall_s'] / peft['wall_s']:.2f}")
    print(f"peak RSS: ours / peft = {ours['peak_rss'] / peft['peak_rss']:.2f} (target <= 0.33); above imports: "
          f"{(ours['peak_rss'] - ours['baseline_rss']) / max(1, peft['peak_rss'] - peft['baseline_rss']):.2f}; "
          f"ours above imports / largest shard = {(ours['peak_rss'] - ours['baseline_rss']) / largest:.2f}")


if __name__ == "__main__":
    main()
