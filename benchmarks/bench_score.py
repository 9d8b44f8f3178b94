"""Benchmark: `score`'s chunked target logprobs vs a bare forward pass vs the naive full log-softmax.

All three run over the same length-bucketed batches of one randomly initialised llama (built from a config, no
download, random token ids, no tokenizer):

- ``forward``: ``model(input_ids, attention_mask)``: what any use of the model costs (full logits, no softmax);
- ``score``  : ``gift_dist.score.logprobs.target_logprobs`` (hidden states at target positions only, lm_head +
               fp32 logsumexp over chunks of positions);
- ``naive``  : full logits -> fp32 log_softmax over [batch, seq, vocab] -> gather.

Speed: the three methods are timed interleaved, ``--repeats`` times, and the medians compared. Peak memory: on
CUDA ``max_memory_allocated`` above the loaded model; on CPU the peak resident set size above the loaded model,
sampled every millisecond in a fresh subprocess per method (so one method's freed-but-kept heap cannot hide
another's). Targets: score >= 0.90x forward tokens/s and <= 1.1x forward peak memory.

    python benchmarks/bench_score.py                                   # CPU, ~30M params, 32k vocab
    python benchmarks/bench_score.py --device cuda --dtype bfloat16 --vocab 151936 --hidden 1024 --layers 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gift_dist.contracts.prepared import IGNORE_INDEX  # noqa: E402
from gift_dist.score.logprobs import collate, length_batches, reference_logprobs, target_logprobs  # noqa: E402

METHODS = ("forward", "score", "naive")


def build_model(args):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=args.max_len,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype), attn_implementation="sdpa")
    return model.to(args.device).eval()


def build_batches(args):
    """Random samples (a prompt of ignored labels, then targets), grouped the way `score` groups a shard."""
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.samples,), generator=gen).tolist()
    rows, labels = [], []
    for n in lengths:
        ids = torch.randint(0, args.vocab, (n,), generator=gen).tolist()
        prompt = int(n * (1 - args.target_fraction))
        rows.append(ids)
        labels.append([IGNORE_INDEX] * prompt + ids[prompt:])
    batches = length_batches(lengths, args.batch_tokens, args.batch_size)
    return [collate([rows[i] for i in b], [labels[i] for i in b], 0, args.device) for b in batches]


@torch.no_grad()
def run_method(method: str, model, batches, chunk: int) -> None:
    for ids, mask, lab in batches:
        if method == "forward":
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        elif method == "score":
            target_logprobs(model, ids, mask, lab, chunk_tokens=chunk)
        else:
            reference_logprobs(model, ids, mask, lab)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_methods(args, model, batches) -> dict[str, float]:
    """Median seconds per pass over all batches, methods interleaved so drift affects all alike."""
    for method in METHODS:  # warm-up (allocator, kernels)
        run_method(method, model, batches[:1], args.chunk)
    seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(args.repeats):
        for method in METHODS:
            _sync(args.device)
            start = time.perf_counter()
            run_method(method, model, batches, args.chunk)
            _sync(args.device)
            seconds[method].append(time.perf_counter() - start)
    return {m: statistics.median(v) for m, v in seconds.items()}


def peak_memory_cuda(args, model, batches, method: str) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run_method(method, model, batches, args.chunk)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def peak_memory_cpu_child(args, model, batches, method: str) -> int:
    """Run in a fresh process: peak RSS above the RSS with the model and batches loaded."""
    import psutil

    process = psutil.Process()
    base = process.memory_info().rss
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run_method(method, model, batches, args.chunk)
    done.set()
    sampler.join()
    return peak[0] - base


def peak_memory_cpu(method: str) -> int:
    argv = [a for a in sys.argv[1:]]
    out = subprocess.run([sys.executable, __file__, *argv, "--memory-of", method], capture_output=True, text=True,
                         check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--target-fraction", type=float, default=0.6, help="share of each sample that is targets")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=1024, help="score.logprob_chunk_tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--memory-of", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(args)
    batches = build_batches(args)
    if args.memory_of:
        print(json.dumps({"peak_bytes": peak_memory_cpu_child(args, model, batches, args.memory_of)}))
        return 0

    params = sum(p.numel() for p in model.parameters())
    tokens = sum(int(mask.sum()) for _, mask, _ in batches)
    targets = sum(int((lab[:, 1:] != IGNORE_INDEX).sum()) for _, _, lab in batches)
    print(f"model: llama {params / 1e6:.1f}M params, vocab {args.vocab}, {args.dtype} on {args.device}; "
          f"{len(batches)} batches, {tokens} tokens ({targets} targets), median of {args.repeats} repeats")
    seconds = time_methods(args, model, batches)
    if args.device.startswith("cuda"):
        memory = {m: peak_memory_cuda(args, model, batches, m) for m in METHODS}
    else:
        memory = {m: peak_memory_cpu(m) for m in METHODS}
    print(f"{'method':<8} {'tokens/s':>10} {'peak MiB':>10} {'speed vs forward':>17} {'memory vs forward':>18}")
    for m in METHODS:
        print(f"{m:<8} {tokens / seconds[m]:>10.0f} {memory[m] / 2**20:>10.1f} "
              f"{seconds['forward'] / seconds[m]:>16.2f}x {memory[m] / max(memory['forward'], 1):>17.2f}x")
    speed = seconds["forward"] / seconds["score"]
    mem = memory["score"] / max(memory["forward"], 1)
    print(f"targets: speed >= 0.90x forward: {'met' if speed >= 0.9 else 'MISSED'} ({speed:.2f}x); "
          f"peak memory <= 1.1x forward: {'met' if mem <= 1.1 else 'MISSED'} ({mem:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
