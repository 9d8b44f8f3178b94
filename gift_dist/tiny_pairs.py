"""Tiny paired BASE/INSTRUCT models, built offline, as ordinary HF checkpoint directories.

Used by the tests and by ``gift-dist demo``. A real pair shares architecture, shapes and tokenizer, and the
instruct model is the base model further trained on chat data; the tiny pair is made the same way: a BPE
tokenizer (``tokenizers``) with a ChatML chat template is trained on the bundled data, the BASE model is
pre-trained for a few steps on the raw text, and the INSTRUCT model continues from it on chat-formatted
records with the loss on assistant tokens.

Building runs hundreds of tiny optimizer steps: it logs its progress, and it runs on one intra-op thread (unless
``OMP_NUM_THREADS`` says otherwise). On a tiny model a step is a few milliseconds of kernels and the rest is
overhead, so a second thread gains little alone (measured 31 against 42 ms per demo-pair step on 2 idle cores),
while several builds or ranks on a shared machine, each spinning a thread per core, ran 15-30x slower than alone.
One thread also makes the pair the same on every machine, whatever its core count (a reduction's order
depends on the thread count).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from gift_dist import bundled
from gift_dist.models.batch import collate

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Gemma 2's shape: turns of "user" and "model", and a system turn refused with an error (gift_dist's prepare folds
# system text into the first user turn for such a template: chat.py). The tiny tokenizer's special
# tokens stand in for Gemma's <start_of_turn> / <end_of_turn>.
GEMMA_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{%- endif %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<|im_start|>' + role + '\n' + message['content'] | trim + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>model\n' }}{%- endif %}"
)
# The tiny families (``tiny_config``): what each stands for and what it exercises.
FAMILIES = {
    "llama": "Llama 2/3 layout: GQA, untied output layer",
    "llama3": "Llama 3: GQA, llama3 rope scaling",
    "qwen2": "Qwen2: q/k/v biases, untied output layer",
    "qwen2_tied": "Qwen2.5 up to 3B: q/k/v biases, tied input/output embeddings",
    "qwen3": "Qwen3: q/k norms",
    "qwen3_moe": "Qwen3-MoE: mixture-of-experts MLPs (LoRA on attention; experts and router left alone)",
    "mixtral": "Mixtral: mixture-of-experts MLPs, sliding window (LoRA on attention; experts, router left alone)",
    "mistral": "Mistral: sliding-window attention",
    "gemma2": "Gemma 2: final logit soft-capping, tied embeddings, sliding window, no system turn",
    "gemma3_text": "Gemma 3 (text): q/k norms, tied embeddings, sliding window, no system turn",
    "phi3": "Phi-3: fused qkv_proj and gate_up_proj",
    "olmo2": "OLMo 2: q/k norms over the whole projection, post-norms",
}
ARCHITECTURES = tuple(FAMILIES)
# Families whose chat template has Gemma's shape (no system turn).
GEMMA_SHAPED = ("gemma2", "gemma3_text")


def chat_template_of(arch: str) -> str:
    return GEMMA_TEMPLATE if arch in GEMMA_SHAPED else CHATML_TEMPLATE


@dataclass(frozen=True)
class TinyPair:
    base: Path
    instruct: Path
    arch: str


def build_tokenizer(out_dir: str | Path, texts: list[str], vocab_size: int = 384, chat_template: Optional[str] = CHATML_TEMPLATE):
    """Train a byte-level BPE on ``texts`` and save it as an HF fast tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.model_max_length = 512
    fast.save_pretrained(str(out_dir))
    return fast


def tiny_config(arch: str, vocab_size: int, hidden_size: int = 64, num_layers: int = 2, kv_heads: int = 2):
    """A tiny config of one of ``FAMILIES`` (4 attention heads, ``kv_heads`` key/value heads)."""
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=None,
    )
    head_dim = hidden_size // 4
    # A window shorter than the tiny pair's records, so sliding-window attention differs from full attention.
    window = 16
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return transformers.LlamaConfig(**common, rope_parameters=rope)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "qwen2_tied":
        return transformers.Qwen2Config(**{**common, "tie_word_embeddings": True})
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=head_dim)
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, head_dim=head_dim, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=hidden_size, decoder_sparse_step=1,
                                           mlp_only_layers=[], norm_topk_prob=True)
    if arch == "mixtral":
        return transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2,
                                          sliding_window=window)
    if arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=window)
    if arch == "gemma2":
        return transformers.Gemma2Config(**{**common, "tie_word_embeddings": True}, head_dim=head_dim,
                                         sliding_window=window, final_logit_softcapping=10.0,
                                         attn_logit_softcapping=50.0)
    if arch == "gemma3_text":
        return transformers.Gemma3TextConfig(**{**common, "tie_word_embeddings": True}, head_dim=head_dim,
                                             sliding_window=window)
    # Their defaults name token ids of the real vocabularies; the tiny tokenizer sets them in generation_config.
    if arch == "phi3":
        return transformers.Phi3Config(**common, bos_token_id=None, eos_token_id=None)
    if arch == "olmo2":
        return transformers.Olmo2Config(**common, bos_token_id=None, eos_token_id=None)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHITECTURES}")


# How often a build logs its progress: this many times per training phase.
PROGRESS_LOGS_PER_PHASE = 5


def _on_one_thread(build):
    """Run a pair build on one intra-op thread (the module docstring says why), restoring the count afterwards."""

    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        if os.environ.get("OMP_NUM_THREADS"):
            return build(*args, **kwargs)
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return build(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


def _batches(token_lists: list[list[int]], label_lists: list[list[int]], batch_size: int, pad_id: int, rng):
    """Shuffled full batches of ``batch_size`` rows, padded as every stage pads (``models.batch.collate``)."""
    order = torch.randperm(len(token_lists), generator=rng).tolist()
    for start in range(0, len(order) - batch_size + 1, batch_size):
        rows = order[start : start + batch_size]
        yield collate([token_lists[r] for r in rows], [label_lists[r] for r in rows], pad_id)


def _train(model, token_lists, label_lists, steps: int, pad_id: int, seed: int, lr: float = 3e-3,
           phase: str = "training") -> float:
    """A few AdamW steps: enough for the models to be a meaningful pair, fast enough for a test fixture."""
    rng = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss_value, step = float("nan"), 0
    log_every, started = max(1, steps // PROGRESS_LOGS_PER_PHASE), time.monotonic()
    while step < steps:
        for ids, mask, labels in _batches(token_lists, label_lists, 16, pad_id, rng):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            loss_value, step = loss.item(), step + 1
            if step % log_every == 0 or step == steps:
                log.info("tiny pair, %s: step %d/%d, loss %.3f (%.0f s)", phase, step, steps, loss_value,
                         time.monotonic() - started)
            if step >= steps:
                break
    model.eval()
    return loss_value


def _chat_examples(tokenizer, records: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
    """Chat-formatted token ids with labels on the assistant replies (prefix rendering, like `prepare`)."""
    token_lists, label_lists = [], []
    from gift_dist.chat import template_messages

    for record in records:
        messages = template_messages(tokenizer, record["messages"])
        ids: list[int] = []
        labels: list[int] = []
        for i, message in enumerate(messages):
            prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False) if i else ""
            text = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            new = tokenizer(text[len(prefix) :], add_special_tokens=False)["input_ids"]
            ids += new
            labels += new if message["role"] == "assistant" else [-100] * len(new)
        token_lists.append(ids)
        label_lists.append(labels)
    return token_lists, label_lists


@_on_one_thread
def build_tiny_pair(
    out_dir: str | Path,
    arch: str = "llama",
    seed: int = 0,
    base_steps: int = 40,
    instruct_steps: int = 40,
    hidden_size: int = 64,
    num_layers: int = 2,
    max_shard_size: Optional[str] = None,
    num_records: int = 400,
    kv_heads: int = 2,
    vocab_rows: Optional[int] = None,
) -> TinyPair:
    """Write ``out_dir/base`` and ``out_dir/instruct``: same tokenizer and shapes, instruct tuned on chat data.

    ``kv_heads``: key/value heads of the 4 attention heads (4 lets 4 tensor-parallel ranks split them);
    ``vocab_rows``: embedding rows (default: the vocabulary rounded up to a multiple of 64)."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    base_dir, inst_dir = out_dir / "base", out_dir / "instruct"
    torch.manual_seed(seed)
    records = bundled.read_jsonl(bundled.bundled_data_path())[:num_records]
    plain = [" ".join(m["content"] for m in r["messages"]) for r in records]
    tokenizer = build_tokenizer(base_dir, plain + [json.dumps(r["messages"]) for r in records[:50]],
                                chat_template=chat_template_of(arch))
    tokenizer.save_pretrained(str(inst_dir))
    vocab = ((len(tokenizer) + 63) // 64) * 64  # embedding rows rounded up, as real models do
    if vocab_rows is not None:
        if vocab_rows < len(tokenizer):
            raise ValueError(f"vocab_rows={vocab_rows} is below the vocabulary's {len(tokenizer)} tokens")
        vocab = vocab_rows

    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab, hidden_size, num_layers, kv_heads))
    plain_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.pad_token_id] for t in plain]
    base_loss = _train(model, plain_ids, plain_ids, base_steps, tokenizer.pad_token_id, seed,
                       phase="base pre-training")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(base_dir), max_shard_size=max_shard_size or "2GB")

    chat_ids, chat_labels = _chat_examples(tokenizer, records)
    inst_loss = _train(model, chat_ids, chat_labels, instruct_steps, tokenizer.pad_token_id, seed + 1,
                       phase="instruct chat-tuning")
    model.save_pretrained(str(inst_dir), max_shard_size=max_shard_size or "2GB")
    log.info("tiny %s pair in %s: base loss %.3f, instruct chat loss %.3f", arch, out_dir, base_loss, inst_loss)
    return TinyPair(base_dir, inst_dir, arch)


# The demo's pair: big enough to learn one-digit arithmetic in the demo's budget, small enough to build in ~30 s.
DEMO_SHAPE = {"hidden_size": 96, "num_layers": 3}
DEMO_MAX_OPERAND = 9
# Budgets of the demo pair: base pre-training steps, the times each word task is in its corpus, the share of its
# documents written as a chat user turn, and the instruct chat-tuning (word-task records, maths records, steps,
# learning rate).
DEMO_BASE_STEPS = 1000
DEMO_KNOWLEDGE_REPEATS = 6
DEMO_BASE_CHAT_SHARE = 0.3
DEMO_INSTRUCT_RECORDS = 300
DEMO_INSTRUCT_MATHS = 100
DEMO_INSTRUCT_STEPS = 400
DEMO_INSTRUCT_LR = 1e-3


def demo_instruct_records(seed: int = 0) -> list[dict]:
    """What the demo's instruct model is chat-tuned on: ``tuning`` word tasks and a little maths in its own shape
    (``bundled.generate_chat_maths``), shuffled together."""
    import random

    records = (bundled.generate_general_chat(DEMO_INSTRUCT_RECORDS, seed=seed + 2, split="tuning")
               + bundled.generate_chat_maths(DEMO_INSTRUCT_MATHS, seed=seed + 3, max_operand=DEMO_MAX_OPERAND))
    random.Random(seed + 4).shuffle(records)
    return records


@_on_one_thread
def build_demo_pair(out_dir: str | Path, arch: str = "llama", seed: int = 0) -> TinyPair:
    """The pair ``gift-dist demo`` shows the method on, built like a real pair:

    - BASE: pre-trained on plain text: one-digit arithmetic word problems with worked answers (problems of their
      own, not the demo's data) and every word task of ``bundled.word_tasks`` (its "knowledge"). A share of those
      documents (``DEMO_BASE_CHAT_SHARE``) is written as a single chat user turn, as a real base model has met
      chat-formatted text in pre-training, so the template's tokens are not new to it; it has never seen a request
      answered in an assistant turn. Without it (a pair tried while choosing these budgets) a LoRA trained on the
      base learnt the template's tokens from scratch, and merged into the instruct model (Shadow-FT) it kept
      29-49% of the instruct model's general exact match over 3 seeds at a KL of 0.23-0.26; with it, 61-66% at
      0.07-0.10.
    - INSTRUCT: BASE briefly chat-tuned (``demo_instruct_records``) on the ``tuning`` word tasks and a little
      arithmetic in a shape of its own (``bundled.generate_chat_maths``: no prompt of it is a prompt of the demo's
      task), so it is a small change from BASE (``gift-dist check`` prints how small) with a skill of its own:
      answering a request in chat form. The demo's general set is the ``held_out`` word tasks, which it was never
      tuned on, so its exact match there is that skill, not memory; on the demo's task it starts about where the
      base does, and the fine-tuning has most of the task to learn.
    """
    import random

    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    base_dir, inst_dir = out_dir / "base", out_dir / "instruct"
    torch.manual_seed(seed)
    arithmetic = bundled.generate_arithmetic(4000, seed=seed + 123, max_operand=DEMO_MAX_OPERAND)
    knowledge = [bundled._chat(q, a) for q, a in bundled.word_tasks("all")] * DEMO_KNOWLEDGE_REPEATS
    chat_skill = demo_instruct_records(seed)
    plain = [" ".join(m["content"] for m in r["messages"]) for r in arithmetic + knowledge]
    tokenizer = build_tokenizer(base_dir, plain + [json.dumps(r["messages"]) for r in chat_skill[:50]])
    tokenizer.save_pretrained(str(inst_dir))
    rng = random.Random(seed + 5)
    plain = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
             if rng.random() < DEMO_BASE_CHAT_SHARE else text for text in plain]
    vocab = ((len(tokenizer) + 63) // 64) * 64
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab, **DEMO_SHAPE))
    plain_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.pad_token_id] for t in plain]
    base_loss = _train(model, plain_ids, plain_ids, DEMO_BASE_STEPS, tokenizer.pad_token_id, seed,
                       phase="base pre-training")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(base_dir))
    chat_ids, chat_labels = _chat_examples(tokenizer, chat_skill)
    inst_loss = _train(model, chat_ids, chat_labels, DEMO_INSTRUCT_STEPS, tokenizer.pad_token_id, seed + 1,
                       lr=DEMO_INSTRUCT_LR, phase="instruct chat-tuning")
    model.save_pretrained(str(inst_dir))
    log.info("demo %s pair in %s: base loss %.3f, instruct chat loss %.3f", arch, out_dir, base_loss, inst_loss)
    return TinyPair(base_dir, inst_dir, arch)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="folder to write base/ and instruct/ into")
    parser.add_argument("--arch", default="llama", choices=ARCHITECTURES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=40, help="training steps for base and for instruct")
    parser.add_argument("--max-shard-size", default=None, help="e.g. 200KB to write a sharded checkpoint")


def run(args: argparse.Namespace) -> int:
    pair = build_tiny_pair(
        args.output, args.arch, args.seed, args.steps, args.steps, max_shard_size=args.max_shard_size
    )
    print(f"base: {pair.base}\ninstruct: {pair.instruct}")
    return 0
