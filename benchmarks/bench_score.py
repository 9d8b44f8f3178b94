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

``--tensor-parallel K``: one scoring replica of K tensor-parallel ranks (``score.parallel: tensor``, the
vocabulary-parallel log-prob) against the same model in one process, on the same batches, in one run: tokens/s and
the largest difference from the one-process values. On CPU a rank is a process with one thread (a core is the
device) and the rows are: one device (1 process, 1 thread), which is also what ``device_map`` over K devices
achieves (its layers run one after another, one device busy at a time, so at most one device's throughput), K
threads in one process (intra-op parallelism, for reference), and the K-rank replica. On CUDA with K GPUs the
``device_map`` row is measured (``device_map="auto"`` over K GPUs). Target: the replica >= 0.8 K x device_map.

    python benchmarks/bench_score.py --tensor-parallel 2 --hidden 1024 --layers 4 --samples 12 --threads 1
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
from gift_dist.models.batch import collate  # noqa: E402
from gift_dist.score.logprobs import length_batches, reference_logprobs, score_batch  # noqa: E402

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


def build_batches(args, device=None):
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
    return [collate([rows[i] for i in b], [labels[i] for i in b], 0, device or args.device) for b in batches]


@torch.no_grad()
def run_method(method: str, model, batches, chunk: int) -> None:
    for ids, mask, lab in batches:
        if method == "forward":
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        elif method == "score":
            score_batch(model, ids, mask, lab, chunk_tokens=chunk)
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


def _tensor_parallel_rank(rank: int, args, model_dir: str, port: int, out_dir: str) -> None:
    """One rank of the K-rank replica: load this rank's slices, score every batch ``--repeats`` times."""
    import os

    import torch.distributed as torch_dist
    from transformers import AutoModelForCausalLM

    from gift_dist.score.parallel import Replica, vocab_slice

    on_gpu = args.device.startswith("cuda")
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(args.tensor_parallel))
    torch.set_num_threads(1)
    if on_gpu:
        torch.cuda.set_device(rank)
    torch_dist.init_process_group("nccl" if on_gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                  world_size=args.tensor_parallel)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype), tp_plan="auto",
                                                     tp_size=args.tensor_parallel, attn_implementation="sdpa").eval()
        replica = Replica(size=args.tensor_parallel, rank=rank, group=torch_dist.group.WORLD)
        part = vocab_slice(model, replica)
        device = f"cuda:{rank}" if on_gpu else "cpu"
        batches = [tuple(t.to(device) for t in b) for b in build_batches(args, "cpu")]
        values = [score_batch(model, *b, chunk_tokens=args.chunk, vocab_part=part).logprobs for b in batches[:1]]
        seconds = []
        for _ in range(args.repeats):
            torch_dist.barrier()
            _sync(args.device)
            start = time.perf_counter()
            values = [score_batch(model, *b, chunk_tokens=args.chunk, vocab_part=part).logprobs
                      for b in batches]
            _sync(args.device)
            torch_dist.barrier()
            seconds.append(time.perf_counter() - start)
        if rank == 0:
            torch.save({"seconds": seconds, "logprobs": torch.cat(values)}, Path(out_dir) / "tensor.pt")
    finally:
        torch_dist.destroy_process_group()


def _time_one_process(args, model, batches, threads: int) -> tuple[float, torch.Tensor]:
    torch.set_num_threads(threads)
    score_batch(model, *batches[0], chunk_tokens=args.chunk)
    seconds, values = [], None
    for _ in range(args.repeats):
        _sync(args.device)
        start = time.perf_counter()
        values = [score_batch(model, *b, chunk_tokens=args.chunk).logprobs for b in batches]
        _sync(args.device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), torch.cat(values)


def tensor_parallel_table(args) -> int:
    """The K-rank replica against one process (and device_map on K GPUs), same batches, one run."""
    import socket
    import tempfile

    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    from gift_dist.score.parallel import tensor_parallel_problem

    k = args.tensor_parallel
    on_gpu = args.device.startswith("cuda")
    model = build_model(args)
    problem = tensor_parallel_problem(model.config, k)
    if problem:
        print(f"error: --tensor-parallel {k}: {problem} (--hidden sets hidden/64 heads, hidden/128 key/value heads)",
              file=sys.stderr)
        return 2
    batches = build_batches(args)
    tokens = sum(int(mask.sum()) for _, mask, _ in batches)
    params = sum(p.numel() for p in model.parameters())
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        one_device, reference = _time_one_process(args, model, batches, 1 if not on_gpu else torch.get_num_threads())
        rows.append(("one device" + (" (1 process, 1 thread)" if not on_gpu else ""), one_device))
        if on_gpu:
            del model
            torch.cuda.empty_cache()
            spread = AutoModelForCausalLM.from_pretrained(
                tmp, dtype=getattr(torch, args.dtype), attn_implementation="sdpa", device_map="auto",
                max_memory={i: ("80GiB" if i < k else 0) for i in range(torch.cuda.device_count())}).eval()
            rows.append((f"device_map over {k} GPUs", _time_one_process(args, spread, batches, 1)[0]))
            del spread
            torch.cuda.empty_cache()
        else:
            rows.append((f"device_map over {k} devices (= one device: layers run in turn)", one_device))
            rows.append((f"1 process, {k} threads", _time_one_process(args, model, batches, k)[0]))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(_tensor_parallel_rank, args=(args, tmp, port, tmp), nprocs=k, join=True)
        result = torch.load(Path(tmp) / "tensor.pt")
    replica_seconds = statistics.median(result["seconds"])
    rows.append((f"tensor-parallel replica, {k} ranks" + (" x 1 thread" if not on_gpu else ""), replica_seconds))
    difference = float((result["logprobs"] - reference).abs().max())
    device_map_seconds = rows[1][1]

    print(f"model: llama {params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}), "
          f"{args.dtype} on {args.device}; {len(batches)} batches, {tokens} tokens, median of {args.repeats} passes")
    print(f"{'layout':<58} {'tokens/s':>10} {'vs device_map':>14}")
    for name, seconds in rows:
        print(f"{name:<58} {tokens / seconds:>10.0f} {device_map_seconds / seconds:>13.2f}x")
    speedup = device_map_seconds / replica_seconds
    print(f"largest |replica - one process| log-prob difference: {difference:.2e}")
    print(f"target: replica >= {0.8 * k:.1f}x device_map over the same {k} devices: "
          f"{'met' if speedup >= 0.8 * k else 'MISSED'} ({speedup:.2f}x)")
    return 0


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
    parser.add_argument("--tensor-parallel", type=int, default=0, metavar="K",
                        help="compare a K-rank tensor-parallel replica with one process (see above)")
    parser.add_argument("--memory-of", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tensor_parallel:
        return tensor_parallel_table(args)

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
