"""Train-stage benchmarks: loss memory with and without chunked CE, and data-feed throughput vs a trainer's rate.

1. Peak memory of one loss forward + backward over a long sequence with a large vocabulary, full-logits CE vs
   ``target_token_ce`` (chunked, checkpointed). On GPU: ``torch.cuda.max_memory_allocated``. On CPU: each variant
   runs in its own subprocess and reports its peak RSS above the RSS after its inputs were built.
2. Samples/s that ``TrainBatches`` + ``ConfidenceReader`` deliver from a few-thousand-sample prepared dataset with
   real confidence shards, against the rate a trainer consumes samples.

Usage::

    python benchmarks/bench_train_memory.py                        # both, CPU-sized defaults (2-3 minutes)
    python benchmarks/bench_train_memory.py --seq-len 8192 --chunk-tokens 1024  # 8k x 150k: ~15 GB for "full"
    python benchmarks/bench_train_memory.py --only data --trainer-samples-per-s 400
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gift_dist.train.loss import target_token_ce  # noqa: E402


def _inputs(seq_len: int, vocab: int, hidden: int, device: str):
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False).to(device)
    states = torch.randn(1, seq_len, hidden, device=device, requires_grad=True)
    labels = torch.randint(0, vocab, (1, seq_len), device=device)
    labels[:, : seq_len // 8] = -100  # a prompt
    return head, states, labels


def _loss(variant: str, head, states, labels, chunk_tokens: int) -> torch.Tensor:
    if variant == "chunked":
        return target_token_ce(states, head, labels, chunk_tokens).sum()
    logits = head(states[:, :-1]).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum")


def measure_variant(variant: str, seq_len: int, vocab: int, hidden: int, chunk_tokens: int, device: str) -> dict:
    """Peak bytes above the inputs for one loss forward + backward (run in a fresh process on CPU)."""
    head, states, labels = _inputs(seq_len, vocab, hidden, device)
    started = time.perf_counter()
    if device == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _loss(variant, head, states, labels, chunk_tokens).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        import resource

        import psutil

        baseline = psutil.Process().memory_info().rss
        _loss(variant, head, states, labels, chunk_tokens).backward()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {"variant": variant, "peak_bytes": int(peak), "seconds": time.perf_counter() - started}


def bench_memory(args) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    for variant in ("full", "chunked"):
        if device == "cuda":
            results[variant] = measure_variant(
                variant, args.seq_len, args.vocab, args.hidden, args.chunk_tokens, device
            )
            continue
        child = subprocess.run(
            [sys.executable, __file__, "--measure", variant, "--seq-len", str(args.seq_len), "--vocab",
             str(args.vocab), "--hidden", str(args.hidden), "--chunk-tokens", str(args.chunk_tokens)],
            capture_output=True, text=True, check=False,
        )
        if child.returncode != 0:
            raise SystemExit(f"memory measurement of {variant!r} failed:\n{child.stderr[-2000:]}")
        results[variant] = json.loads(child.stdout.strip().splitlines()[-1])
    logits_bytes = args.seq_len * args.vocab * 4
    print(f"loss memory on {device}: {args.seq_len} tokens x {args.vocab} vocab, hidden {args.hidden} "
          f"(fp32 logits alone: {logits_bytes / 2**20:.0f} MiB), chunk {args.chunk_tokens} tokens")
    for variant, result in results.items():
        print(f"  {variant:8s} peak {result['peak_bytes'] / 2**20:9.1f} MiB above inputs   "
              f"forward+backward {result['seconds']:.2f}s")
    ratio = results["full"]["peak_bytes"] / max(results["chunked"]["peak_bytes"], 1)
    print(f"  full / chunked peak memory ratio: {ratio:.1f}x")


def _build_dataset(root: Path, num_samples: int, vocab: int, samples_per_shard: int):
    """A prepared dataset with lengths spread like chat data, plus a finished confidence directory."""
    from datasets import Dataset

    from gift_dist.contracts import confidence as conf_contract
    from gift_dist.contracts import prepared as prep_contract

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(64, 1024, (num_samples,), generator=gen).tolist()
    input_ids, labels = [], []
    for length in lengths:
        ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
        prompt = length // 3
        input_ids.append(ids)
        labels.append([-100] * prompt + ids[prompt:])
    num_tokens = lengths
    num_targets = [length - length // 3 for length in lengths]
    dataset = Dataset.from_dict({
        "input_ids": input_ids, "labels": labels, "record_index": list(range(num_samples)),
        "num_tokens": num_tokens, "num_target_tokens": num_targets,
    })
    manifest = prep_contract.PreparedManifest(
        fingerprint="bench", tokenizer={}, settings={}, sources=[], counts={"kept": num_samples},
        tokens={"total": sum(num_tokens), "target": sum(num_targets)}, eos_token_ids=[2], pad_token_id=0,
        shards=prep_contract.plan_shards(num_tokens, num_targets, samples_per_shard),
    )
    prep_contract.write_prepared(root / "prepared", dataset, manifest)
    prepared = prep_contract.load_prepared(root / "prepared")
    conf = conf_contract.init_manifest(root / "confidence", conf_contract.ConfidenceManifest(
        prepared_fingerprint="bench", instruct_model={"name": "bench", "hash": "bench"}, logprob_dtype="float32",
        num_shards=len(manifest.shards)))
    for spec in manifest.shards:
        counts = num_targets[spec.start : spec.end]
        offsets = torch.tensor([0] + counts).cumsum(0)
        conf_contract.write_shard(root / "confidence", conf, spec.index, torch.arange(spec.start, spec.end), offsets,
                                  -torch.rand(int(offsets[-1]), generator=gen))
    return prepared


def bench_data(args) -> None:
    from gift_dist.config import TrainConfig
    from gift_dist.train.data import ConfidenceReader, TrainBatches

    with tempfile.TemporaryDirectory() as tmp:
        prepared = _build_dataset(Path(tmp), args.samples, args.vocab, args.samples_per_shard)
        for packing in (False, True):
            cfg = TrainConfig(micro_batch_size=args.micro_batch_size, gradient_accumulation_steps=args.grad_accum,
                              packing=packing)
            reader = ConfidenceReader(Path(tmp) / "confidence", prepared, wait_seconds=0, poll_seconds=1)
            batches = TrainBatches(prepared, cfg, rank=0, world=1, confidence=reader, seed=0)
            started = time.perf_counter()
            samples = tokens = 0
            for step in range(batches.total_steps):
                for micro_batch in batches.micro_batches(step):
                    samples += len(micro_batch.sample_indices)
                    tokens += micro_batch.num_tokens
            rate = samples / (time.perf_counter() - started)
            ratio = rate / args.trainer_samples_per_s
            print(f"data feed ({'packed' if packing else 'padded'}): {samples} samples / {tokens} tokens in "
                  f"{batches.total_steps} steps: {rate:.0f} samples/s on one rank; trainer consumes "
                  f"{args.trainer_samples_per_s:.0f} samples/s -> feed/consume ratio {ratio:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["memory", "data"], help="run one of the two benchmarks")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens of the loss benchmark's sequence")
    parser.add_argument("--vocab", type=int, default=150_000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk-tokens", type=int, default=256,
                        help="the saving is about seq-len / chunk-tokens: 2048/256 here, 8192/1024 with train defaults")
    parser.add_argument("--samples", type=int, default=3000, help="samples of the data-feed benchmark's dataset")
    parser.add_argument("--samples-per-shard", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--trainer-samples-per-s", type=float, default=100.0,
                        help="the rate one rank's trainer consumes samples (measure it with bench_train_step.py)")
    parser.add_argument("--measure", choices=["full", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_variant(args.measure, args.seq_len, args.vocab, args.hidden, args.chunk_tokens,
                                         "cpu")))
        return
    if args.only in (None, "memory"):
        bench_memory(args)
    if args.only in (None, "data"):
        bench_data(args)


if __name__ == "__main__":
    main()
