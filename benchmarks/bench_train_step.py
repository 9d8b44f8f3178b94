"""Training step time: GIFT weighting against its limit (uniform weighting) and its peers, measured in one run.

Rows (same model, same data, same DeepSpeed ZeRO-3 config, one process):
  uniform           the Shadow-FT step: the limit GIFT's weighting should reach (guidance is precomputed)
  gift              per-token weights from the scorer's shards            target <= 1.02x uniform
  online guidance   the instruct model's forward inside the step (what GIFT costs without a score stage)
  uniform, packed   the same step on a length-skewed dataset with sequence packing (tokens/s vs padded)
  HF Trainer        transformers Trainer + peft + the same DeepSpeed config, plain SFT (the uniform baseline)

Step times are medians over --steps timed steps after one warm-up step, variants interleaved --repeats times,
since these machines are shared and noisy. Runs on CPU (fp32, gloo) or GPU (bf16) with the same flags.

    python benchmarks/bench_train_step.py                       # CPU, a ~10M-parameter Llama, 2-4 minutes
    python benchmarks/bench_train_step.py --hidden 1024 --layers 16 --vocab 128256 --seq 2048   # GPU
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

def _device_from_argv(argv: list[str]) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default="cpu")
    return pre.parse_known_args(argv)[0].device


# DeepSpeed picks its accelerator at import: from the parsed --device, in either spelling (--device cuda too).
os.environ.setdefault("DS_ACCELERATOR", _device_from_argv(sys.argv[1:]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def build_models(root: Path, args) -> tuple[Path, Path]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                         num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 64, 1),
                         num_key_value_heads=max(args.hidden // 128, 1), max_position_embeddings=args.seq,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(root / "instruct")
    return root / "base", root / "instruct"


def build_data(root: Path, args) -> Path:
    """Prepared samples with a length-skewed distribution (most short, a few long), labels on the reply half,
    and a confidence/ folder of valid log-probabilities, through the real contracts."""
    from datasets import Dataset

    from gift_dist.contracts import confidence as conf
    from gift_dist.contracts import prepared as contract

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(args.seq / 6), 0.8, args.samples), 16, args.seq).astype(int)
    rows = {"input_ids": [], "labels": [], "record_index": [], "num_tokens": [], "num_target_tokens": []}
    for i, n in enumerate(lengths):
        ids = rng.integers(10, args.vocab, n).tolist()
        cut = n // 2
        labels = [-100] * cut + ids[cut:]
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        rows["record_index"].append(i)
        rows["num_tokens"].append(int(n))
        rows["num_target_tokens"].append(int(n - cut))
    shards = contract.plan_shards(rows["num_tokens"], rows["num_target_tokens"], 64)
    manifest = contract.PreparedManifest(
        fingerprint="bench", tokenizer={}, settings={}, sources=[],
        counts={"records_read": len(lengths), "kept": len(lengths), "dropped": {}},
        tokens={"total": int(sum(rows["num_tokens"])), "target": int(sum(rows["num_target_tokens"]))},
        eos_token_ids=[2], pad_token_id=0, shards=shards)
    contract.write_prepared(root / "prepared", Dataset.from_dict(rows), manifest)
    conf_manifest = conf.init_manifest(root / "confidence", conf.ConfidenceManifest(
        prepared_fingerprint="bench", instruct_model={"name": "bench", "hash": "bench"}, logprob_dtype="float32",
        num_shards=len(shards)))
    for spec in shards:
        counts = rows["num_target_tokens"][spec.start:spec.end]
        offsets = torch.tensor([0, *np.cumsum(counts)], dtype=torch.int64)
        values = torch.log(torch.rand(int(offsets[-1])).clamp_min(1e-6))
        conf.write_shard(root / "confidence", conf_manifest, spec.index, torch.arange(spec.start, spec.end),
                         offsets, values)
    return root


def run_config(root: Path, base: Path, instruct: Path, args, **train):
    from gift_dist.config import load_config

    cfg = load_config(None, [f"base_model={base}", f"instruct_model={instruct}", f"output_dir={root}",
                             f"train.micro_batch_size={args.micro_batch}", "train.progress=false",
                             f"train.max_steps={args.steps + 1}", "train.ce_chunk_tokens=1024"])
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


class Variant:
    def __init__(self, name, cfg, prepared, instruct=None):
        from gift_dist.train.data import ConfidenceReader, TrainBatches
        from gift_dist.train.engine import build_engine
        from gift_dist.train.weighting import needs_confidence

        self.name, self.cfg = name, cfg
        reader = (ConfidenceReader(cfg.paths.confidence, prepared, 60, 0.1)
                  if needs_confidence(cfg.train) else None)
        self.batches = TrainBatches(prepared, cfg.train, 0, 1, reader, seed=0)
        self.te = build_engine(cfg, 1, self.batches.total_steps)
        self.instruct = instruct
        self.times, self.tokens = [], []
        self.step = 0

    def online_guidance(self, micro_batches):
        """The instruct model's own forward, inside the step, replacing the precomputed shards."""
        from gift_dist.train.loss import target_token_ce

        device = self.te.engine.device
        with torch.no_grad():
            for mb in micro_batches:
                hidden = self.instruct.model(input_ids=mb.input_ids.to(device),
                                             attention_mask=mb.attention_mask.to(device)).last_hidden_state
                mb.inst_logprobs = -target_token_ce(hidden, self.instruct.lm_head, mb.labels.to(device),
                                                    1024).float().cpu()

    def run_step(self, timed: bool):
        from gift_dist.train.recipe import train_step

        started = time.perf_counter()
        micro_batches = self.batches.micro_batches(self.step)
        if self.instruct is not None:
            self.online_guidance(micro_batches)
        values = train_step(self.te, self.cfg, micro_batches, 1, None, self.step + 1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if timed:
            self.times.append(time.perf_counter() - started)
            self.tokens.append(sum(mb.num_tokens for mb in micro_batches))
        self.step = (self.step + 1) % self.batches.total_steps
        return values


def hf_trainer_step_times(cfg, prepared, ds_config: dict, args) -> list[float]:
    """transformers Trainer + peft LoRA + the same DeepSpeed config on the same samples (plain SFT)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.started)

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
        return {
            "input_ids": torch.tensor([pad(r["input_ids"], 0) for r in rows]),
            "labels": torch.tensor([pad(r["labels"], -100) for r in rows]),
            "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows]),
        }

    hf_ds = copy.deepcopy(ds_config)
    hf_ds.update(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto", train_batch_size="auto",
                 gradient_clipping="auto")
    hf_ds.get("optimizer", {}).get("params", {}).update(lr="auto", weight_decay="auto")
    training_args = TrainingArguments(
        output_dir=str(Path(cfg.output_dir) / "hf_trainer"), per_device_train_batch_size=args.micro_batch,
        max_steps=args.steps + 1, learning_rate=cfg.train.learning_rate, deepspeed=hf_ds, report_to=[],
        save_strategy="no", logging_steps=10**6, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, remove_unused_columns=False,
        bf16=torch.cuda.is_available(), dataloader_num_workers=0, lr_scheduler_type="constant",
    )
    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=torch.bfloat16 if torch.cuda.is_available()
                                                 else torch.float32)
    model.config.use_cache = False
    model.enable_input_require_grads()
    from gift_dist.models.lora_targets import resolve_target_modules

    lora = cfg.train.lora
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=resolve_target_modules(model, lora.target_modules),
                                             task_type="CAUSAL_LM"))
    data = prepared.dataset.select(range((args.steps + 1) * args.micro_batch)).select_columns(["input_ids", "labels"])
    trainer = Trainer(model=model, args=training_args, train_dataset=data, data_collator=collate,
                      callbacks=[StepTimer()])
    trainer.train()
    return times[1:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-hf", action="store_true", help="leave out the HF Trainer row")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from gift_dist import dist
    from gift_dist.contracts.prepared import load_prepared

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init(use_deepspeed=True)
    root = Path(tempfile.mkdtemp(prefix="bench_train_"))
    base, instruct_dir = build_models(root, args)
    build_data(root, args)
    prepared = load_prepared(root / "prepared")
    instruct = AutoModelForCausalLM.from_pretrained(
        instruct_dir, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32).to(args.device).eval()
    instruct.requires_grad_(False)

    variants = [
        Variant("uniform", run_config(root, base, instruct_dir, args, weighting="uniform"), prepared),
        Variant("gift", run_config(root, base, instruct_dir, args, weighting="gift"), prepared),
        Variant("online guidance", run_config(root, base, instruct_dir, args, weighting="gift"), prepared, instruct),
        Variant("uniform, packed", run_config(root, base, instruct_dir, args, weighting="uniform", packing=True),
                prepared),
    ]
    for variant in variants:
        variant.run_step(timed=False)
    for _ in range(args.repeats):
        for variant in variants:
            for _ in range(args.steps):
                variant.run_step(timed=True)

    med = {v.name: statistics.median(v.times) for v in variants}
    tok_s = {v.name: sum(v.tokens) / sum(v.times) for v in variants}
    print(f"\nmodel: Llama hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}; {args.samples} samples "
          f"up to {args.seq} tokens (length-skewed); micro batch {args.micro_batch}; device {args.device}")
    print(f"{'variant':<18}{'median step s':>15}{'tokens/s':>12}{'vs uniform':>12}")
    for name in med:
        print(f"{name:<18}{med[name]:>15.4f}{tok_s[name]:>12.0f}{med[name] / med['uniform']:>11.3f}x")
    print(f"\ngift / uniform step time:            {med['gift'] / med['uniform']:.3f}x  (target <= 1.02x)")
    print(f"online guidance / gift step time:    {med['online guidance'] / med['gift']:.3f}x")
    print(f"packed / padded tokens per second:   {tok_s['uniform, packed'] / tok_s['uniform']:.3f}x")
    if not args.skip_hf:
        hf = hf_trainer_step_times(variants[0].cfg, prepared, variants[0].te.ds_config, args)
        print(f"HF Trainer + peft step (median {statistics.median(hf):.4f} s) / gift_dist uniform step: "
              f"{statistics.median(hf) / med['uniform']:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
