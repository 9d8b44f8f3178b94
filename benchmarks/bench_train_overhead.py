"""Framework overhead of `gift-dist train` against a plain peft + torch AdamW loop, on the demo's tiny model.

On a tiny model the arithmetic is negligible, so step time is what a GPU step is dominated by: hooks, gathers,
host syncs, per-step collectives. Measured in one run, one process each, the same thread count:

  plain loop       peft LoRA + torch.optim.AdamW + transformers' loss, the prepared rows in order, padded
  train uniform    `python -m gift_dist.cli train` (one process), Shadow-FT weighting      target <= 1.5x plain
  train gift       the same with the scorer's confidence                                 target <= 1.02x uniform

Our step times come from the trainer's own metrics log (`seconds` per step); the plain loop times the same
forward, backward, clipping and optimizer step over the same micro-batches. Each job runs --rounds times,
interleaved (plain, uniform, gift, plain, uniform, gift, ...), and keeps the lowest of its per-round medians:
shared 2-core machines drift by 20-30% over minutes, and interleaving spreads that over every job.

    python benchmarks/bench_train_overhead.py               # ~4 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def demo_run_config(root: Path, args, weighting: str, extra: list[str]):
    from gift_dist.pipeline.demo import demo_config

    return demo_config(root, [f"output_dir={root / weighting}", f"train.weighting={weighting}",
                              f"train.max_steps={args.steps}", "train.save_every_steps=100000",
                              "train.progress=false", *extra])


def cli_step_seconds(cfg, threads: int) -> list[float]:
    """`gift-dist train` in its own process; per-step seconds from its metrics log."""
    from gift_dist.config import dump_config
    from gift_dist.train.metrics import METRICS_NAME, read_metrics

    cfg.paths.root.mkdir(parents=True, exist_ok=True)
    config_file = cfg.paths.root / "run.yaml"
    dump_config(cfg, config_file)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "gift_dist.cli", "--log-level", "WARNING", "train", "--config",
                    str(config_file)], env=env, check=True)
    return [row["seconds"] for row in read_metrics(cfg.paths.logs / METRICS_NAME)]


def plain_loop_step_seconds(cfg, steps: int) -> list[float]:
    """peft + torch AdamW + the model's own loss over the prepared rows in order (the single-device limit)."""
    from plain_loop import plain_lora_model

    from gift_dist.contracts.prepared import load_prepared

    prepared = load_prepared(cfg.paths.prepared)
    rows = prepared.dataset.select_columns(["input_ids", "labels"])
    pad = prepared.manifest.pad_token_id
    torch.manual_seed(cfg.train.seed)
    model, params, optimizer = plain_lora_model(cfg)
    size = cfg.train.micro_batch_size
    times = []
    for step in range(steps):
        batch = rows[step * size:(step + 1) * size]
        width = max(len(ids) for ids in batch["input_ids"])
        started = time.perf_counter()
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in batch["input_ids"]])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for lab in batch["labels"]])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch["input_ids"]])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss)
        times.append(time.perf_counter() - started)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of the medians (warm-up)")
    parser.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--extra", nargs="*", default=[], metavar="section.key=value",
                        help="overrides for both trainer runs, e.g. train.sharding=zero3")
    args = parser.parse_args()

    from gift_dist.tiny_pairs import build_demo_pair
    from gift_dist.pipeline.demo import demo_data
    from gift_dist.prepare.stage import prepare
    from gift_dist.score.stage import score

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench_overhead_"))
    build_demo_pair(root / "models")
    demo_data(root)
    uniform = demo_run_config(root, args, "uniform", args.extra)
    gift = demo_run_config(root, args, "gift", args.extra)
    prepare(uniform)
    gift.paths.root.mkdir(parents=True)
    (gift.paths.root / "prepared").symlink_to(uniform.paths.prepared, target_is_directory=True)
    score(gift)

    jobs = {"plain loop": lambda: plain_loop_step_seconds(uniform, args.steps),
            "train uniform": lambda: cli_step_seconds(uniform, args.threads),
            "train gift": lambda: cli_step_seconds(gift, args.threads)}
    rounds: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(args.rounds):
        for name, job in jobs.items():
            rounds[name].append(statistics.median(job()[args.skip:]))
    med = {name: min(values) for name, values in rounds.items()}
    print(f"\ndemo tiny model, micro batch {uniform.train.micro_batch_size}, {args.steps} steps (median of the last "
          f"{args.steps - args.skip}, lowest of {args.rounds} interleaved rounds: "
          + "; ".join(f"{n} {', '.join(f'{v * 1e3:.1f}' for v in vs)} ms" for n, vs in rounds.items())
          + f"), {args.threads} threads, extra overrides {args.extra or 'none'}")
    print(f"{'job':<16}{'median step ms':>16}{'vs plain':>10}")
    for name, value in med.items():
        print(f"{name:<16}{value * 1e3:>16.2f}{value / med['plain loop']:>9.2f}x")
    print(f"train uniform / plain loop: {med['train uniform'] / med['plain loop']:.2f}x (target <= 1.5x)")
    print(f"train gift / train uniform: {med['train gift'] / med['train uniform']:.3f}x (target <= 1.02x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
