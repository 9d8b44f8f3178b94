"""`gift-dist eval`: does the merged model do the task better, and is it still the instruct model elsewhere?

For each model (the instruct model, the run's merged model, any others named) on the same token ids:

- **task**, on the held-out split of ``prepared/`` (``prepare.eval_fraction``), never trained on:
  teacher-forced CE of the reference replies (``task_ce``), and the accuracy of greedy generations: the prompt is
  the sample's tokens up to its first reply, the answer is extracted from the generation and from the reference
  reply by ``eval.answer_pattern`` (presets ``answer_is``, ``gsm8k`` (``#### N``), ``boxed``, ``last_number``, or a
  regex whose first group is the answer) and compared as strings (``task_accuracy``);
- **preservation**, on a general chat set the user supplies (``eval.general_files``, messages jsonl): CE of its
  last assistant replies (``general_ce``) and the mean per-token KL(instruct || model) over them
  (``kl_to_instruct``), i.e. how far the model's next-token distribution moved from the instruct model's, and
  the greedy exact match of those replies (``general_exact_match`` over ``general_generated`` prompts, at most
  ``eval.max_generate_samples``): the prompt is the record up to its last reply, the generation (decoded up to its
  first stop token, like task accuracy) must equal the reference reply, surrounding whitespace aside. That is the
  instruct model's skill as a number, beside how far the distributions moved.

Writes ``<output>/results.json``, ``results.md`` (a table) and ``tradeoff.png`` (task gain over the instruct model
against KL to it). Batched on the GPU when there is one. Standard suites (GSM8K, IFEval, MMLU) are
lm-evaluation-harness's job: ``--lm-eval gsm8k,ifeval`` runs it (its Python API, its hf backend) on every model too,
``--lm-eval-include DIR`` adds task YAMLs of your own, ``--lm-eval-chat-template``, ``--lm-eval-fewshot N`` and
``--lm-eval-limit N`` are its apply_chat_template, num_fewshot and limit. Its table shows each metric with its
standard error beside it (``0.4167 ± 0.1486``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from gift_dist import dist
from gift_dist.config import ConfigError, EvalConfig, RunConfig, add_config_arguments, config_from_args
from gift_dist.contracts import ContractError, atomic_write, atomic_write_text, file_sha256
from gift_dist.contracts.prepared import IGNORE_INDEX, load_eval_split, read_manifest
from gift_dist.models.batch import collate
from gift_dist.models.logprob import log_softmax_chunks, softcap_of, target_hidden, target_logprobs

log = logging.getLogger(__name__)

ANSWER_PATTERNS = {
    "answer_is": r"[Tt]he answer is\s*\$?(-?[\d,]*\.?\d+)",
    "gsm8k": r"####\s*\$?(-?[\d,]*\.?\d+)",
    "boxed": r"\\boxed\{([^{}]*)\}",
    "last_number": r"(-?[\d,]*\.?\d+)(?!.*\d)",
}
RESULTS_NAME = "results.json"


@dataclass
class ModelScores:
    name: str
    path: str
    task_ce: float
    task_accuracy: Optional[float]
    task_samples: int
    general_ce: Optional[float]
    kl_to_instruct: Optional[float]
    general_tokens: int
    # lm-evaluation-harness: task -> {metric: value}, when eval.lm_eval_tasks names any.
    lm_eval: Optional[dict] = None
    # Greedy exact match of the general set's replies (see `exact_match_rate`), over general_generated prompts.
    general_exact_match: Optional[float] = None
    general_generated: int = 0


def answer_regex(pattern: str) -> re.Pattern:
    """A preset name or a regex whose first group is the answer; a bad one is a ConfigError naming the key."""
    text = ANSWER_PATTERNS.get(pattern, pattern)
    try:
        compiled = re.compile(text, re.DOTALL)
    except re.error as exc:
        raise ConfigError(f"eval.answer_pattern={pattern!r} is not a preset {sorted(ANSWER_PATTERNS)} nor a valid "
                          f"regex: {exc}") from exc
    if compiled.groups < 1:
        raise ConfigError(f"eval.answer_pattern={pattern!r} needs a group around the answer, e.g. 'answer: (\\d+)'")
    return compiled


def extract_answer(regex: re.Pattern, text: str) -> Optional[str]:
    match = regex.search(text)
    return None if match is None else match.group(1).replace(",", "").strip()


def exact_match_rate(replies: list[str], references: list[str]) -> float:
    """Share of generated replies equal to their reference reply (both stripped of surrounding whitespace)."""
    if len(replies) != len(references) or not replies:
        raise ValueError(f"exact match needs as many replies as references, at least one: got {len(replies)} "
                         f"and {len(references)}")
    return sum(reply.strip() == ref.strip() for reply, ref in zip(replies, references)) / len(replies)


# ------------------------------------------------------------------------------------------------ token batches


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]


def _batches(samples: list[Sample], size: int, desc: str = "") -> Iterator[list[Sample]]:
    """Batches of ``size``, with a progress bar named ``desc`` (shown when the output is a terminal)."""
    from tqdm.auto import tqdm

    starts = range(0, len(samples), size)
    for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=not desc or None):
        yield samples[start:start + size]


# Positions per chunk of the output layer: one [chunk, vocabulary] fp32 block of logits alive at a time.
CHUNK_TOKENS = 1024


def _target_states(model, ids, mask, labels):
    """The decoder's hidden states at the N target positions [N, H] and the targets [N], on the output layer's
    device, with the output layer and the model's final logit soft-cap: the inputs of ``models.logprob``, the
    target log-prob the scorer and the training loss use too."""
    hidden, targets, _ = target_hidden(model, ids, mask, labels)
    head = model.get_output_embeddings()
    device = head.weight.device
    return hidden.to(device), targets.to(device), head, softcap_of(model)


@torch.no_grad()
def teacher_forced_ce(model, samples: list[Sample], batch_size: int, pad: int) -> tuple[float, int]:
    """Mean CE per target token, and the number of target tokens."""
    total, count = 0.0, 0
    for batch in _batches(samples, batch_size, "task CE"):
        ids, mask, labels = collate([s.input_ids for s in batch], [s.labels for s in batch], pad, model.device)
        hidden, targets, head, cap = _target_states(model, ids, mask, labels)
        logprobs, _ = target_logprobs(head, hidden, targets, cap, CHUNK_TOKENS)
        total += float(-logprobs.sum())
        count += targets.numel()
    return total / max(count, 1), count


@torch.no_grad()
def ce_and_kl(model, reference, samples: list[Sample], batch_size: int, pad: int) -> tuple[float, float, int]:
    """Mean CE per target token and mean per-token KL(reference || model) over the same targets."""
    ce_total, kl_total, count = 0.0, 0.0, 0
    for batch in _batches(samples, batch_size, "general CE / KL"):
        ids, mask, labels = collate([s.input_ids for s in batch], [s.labels for s in batch], pad, model.device)
        hidden, targets, head, cap = _target_states(model, ids, mask, labels)
        count += targets.numel()
        if reference is model:
            logprobs, _ = target_logprobs(head, hidden, targets, cap, CHUNK_TOKENS)
            ce_total += float(-logprobs.sum())
            continue
        ref_hidden, _, ref_head, ref_cap = _target_states(reference, ids.to(reference.device),
                                                          mask.to(reference.device), labels.to(reference.device))
        for (rows, log_p), (_, ref_log_p) in zip(log_softmax_chunks(head, hidden, cap, CHUNK_TOKENS),
                                                 log_softmax_chunks(ref_head, ref_hidden, ref_cap, CHUNK_TOKENS)):
            ref_log_p = ref_log_p.to(log_p.device)
            ce_total += float(-log_p.gather(1, targets[rows, None]).sum())
            kl_total += float((ref_log_p.exp() * (ref_log_p - log_p)).sum())
    return ce_total / max(count, 1), kl_total / max(count, 1), count


def first_reply(sample: Sample) -> tuple[list[int], list[int]]:
    """The prompt (every token before the first labelled one, chat template and reply header included) and the
    reference reply (the first contiguous run of labelled tokens)."""
    start = next(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX)
    end = start
    while end < len(sample.labels) and sample.labels[end] != IGNORE_INDEX:
        end += 1
    return sample.input_ids[:start], sample.input_ids[start:end]


@torch.no_grad()
def greedy_replies(model, tokenizer, prompts: list[list[int]], batch_size: int, max_new_tokens: int,
                   stop_ids: list[int]) -> list[str]:
    """Batched greedy decoding, left-padded; the text of each reply up to its first stop token."""
    from tqdm.auto import tqdm

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    replies = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch", leave=False, disable=None):
        batch = prompts[start:start + batch_size]
        # Left-padded, so that every row's new tokens follow its prompt's last; the labels (the prompts) go unused.
        ids, mask, _ = collate(batch, batch, pad, model.device, padding_side="left")
        width = ids.shape[1]
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=stop_ids)
        for row in out[:, width:].tolist():
            cut = next((i for i, token in enumerate(row) if token in stop_ids), len(row))
            replies.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return replies


# ------------------------------------------------------------------------------------------------ data


def task_samples(cfg: RunConfig) -> list[Sample]:
    held_out = load_eval_split(cfg.paths.prepared)
    if held_out is None:
        raise ConfigError(f"{cfg.paths.prepared} has no held-out split: run `gift-dist prepare` with "
                          f"prepare.eval_fraction > 0 (e.g. 0.1) to evaluate on data the training never saw")
    rows = held_out.dataset.select_columns(["input_ids", "labels"])
    return [Sample(list(r["input_ids"]), list(r["labels"])) for r in rows]


def general_samples(files: list[str], tokenizer, limit: int) -> list[Sample]:
    """The general chat set: each record's last assistant reply is the target (rendered like prepare does)."""
    from gift_dist.chat import render_conversation

    samples = []
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"eval.general_files: {path} does not exist")
        for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
                rendered = render_conversation(tokenizer, messages, "last_assistant")
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ContractError(f"{path}:{line_number}: not a chat record with 'messages' ({exc})") from exc
            if any(label != IGNORE_INDEX for label in rendered.labels[1:]):
                samples.append(Sample(rendered.input_ids, rendered.labels))
            if len(samples) >= limit:
                return samples
    return samples


def warn_unmeasured_general_files(cfg: RunConfig) -> None:
    """One warning per eval.general_files file whose overlap with the training data prepare did not measure: its
    sha256 is not among prepared.json's ``prompt_overlap.eval_files`` (added to the list, or edited, after
    prepare). Its scores may then be those of records the model was trained on."""
    overlap = read_manifest(cfg.paths.prepared).prompt_overlap
    measured = {entry.get("sha256") for entry in overlap.get("eval_files", [])}
    for file in cfg.eval.general_files:
        if file_sha256(file) not in measured:
            log.warning("eval: eval.general_files %s: its overlap with the training data was not measured (added "
                        "or edited after prepare); rerun `gift-dist prepare` with it in eval.general_files", file)


# ------------------------------------------------------------------------------------------------ the stage


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load(path: str, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(_device()).eval()


def models_to_evaluate(cfg: RunConfig, named: list[str]) -> dict[str, str]:
    """name -> path: the instruct model first, then the run's merged model (when there is one), then ``named``
    (``NAME=PATH`` or a path, its folder name becoming the name)."""
    models = {"instruct": cfg.instruct_model}
    if (cfg.paths.merged / "config.json").is_file():
        models["merged"] = str(cfg.paths.merged)
    for item in [*cfg.eval.models, *named]:
        name, _, path = item.partition("=") if "=" in item else (Path(item).name, "", item)
        if not Path(path).exists():
            raise ConfigError(f"model to evaluate {item!r}: {path} does not exist")
        models[name] = path
    return models


def evaluate_models(cfg: RunConfig, models: dict[str, str]) -> list[ModelScores]:
    from gift_dist.contracts.model_folder import require_model
    from gift_dist.models.pair import load_tokenizer

    # Every model checked before any is loaded: a folder that is no model is named, not found an hour in.
    for name, path in {"instruct": cfg.instruct_model, **models}.items():
        require_model(path, f"model to evaluate {name!r}:")
    settings: EvalConfig = cfg.eval
    regex = answer_regex(settings.answer_pattern)
    if settings.lm_eval_tasks:
        require_lm_eval()
        lm_eval_options(settings)  # a bad count refused before any model loads
    tokenizer = load_tokenizer(cfg.instruct_model, cfg.trust_remote_code)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    task = task_samples(cfg)
    general = general_samples(settings.general_files, tokenizer, settings.max_general_samples)
    warn_unmeasured_general_files(cfg)
    generated = task[: settings.max_generate_samples]
    prompts_refs = [first_reply(s) for s in generated]
    references = [extract_answer(regex, tokenizer.decode(ref, skip_special_tokens=True)) for _, ref in prompts_refs]
    # The general set's replies are generated the same way: its samples label only the last reply, so their
    # "first reply" is it, and its prompt is the whole conversation before it.
    general_prompts_refs = [first_reply(s) for s in general[: settings.max_generate_samples]]
    general_references = [tokenizer.decode(ref, skip_special_tokens=True) for _, ref in general_prompts_refs]
    stop_ids = sorted({tokenizer.eos_token_id, *[ref[-1] for _, ref in prompts_refs + general_prompts_refs if ref]}
                      - {None})
    instruct = _load(cfg.instruct_model, cfg.trust_remote_code)
    results = []
    for name, path in models.items():
        model = instruct if name == "instruct" else _load(path, cfg.trust_remote_code)
        log.info("eval: %s (%s): task CE on %d held-out samples", name, path, len(task))
        task_ce, _ = teacher_forced_ce(model, task, settings.batch_size, pad)
        accuracy = None
        if settings.max_generate_samples > 0 and generated:
            replies = greedy_replies(model, tokenizer, [p for p, _ in prompts_refs], settings.batch_size,
                                     settings.max_new_tokens, stop_ids)
            hits = [ref is not None and extract_answer(regex, reply) == ref
                    for reply, ref in zip(replies, references)]
            accuracy = sum(hits) / len(hits)
        general_ce = kl = general_match = None
        general_tokens = 0
        if general:
            general_ce, kl, general_tokens = ce_and_kl(model, instruct, general, settings.batch_size, pad)
        if general_prompts_refs:
            replies = greedy_replies(model, tokenizer, [p for p, _ in general_prompts_refs], settings.batch_size,
                                     settings.max_new_tokens, stop_ids)
            general_match = exact_match_rate(replies, general_references)
        harness = run_lm_eval(path, settings) if settings.lm_eval_tasks else None
        results.append(ModelScores(name, path, task_ce, accuracy, len(task), general_ce, kl, general_tokens,
                                   harness, general_exact_match=general_match,
                                   general_generated=len(general_prompts_refs)))
        if model is not instruct:
            del model
    return results


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise ConfigError("eval.lm_eval_tasks needs lm-evaluation-harness: pip install 'gift-dist[eval]' "
                          "(or pip install lm-eval)") from exc


def lm_eval_options(settings: EvalConfig) -> dict:
    """The keywords of lm-evaluation-harness's ``simple_evaluate`` that eval.lm_eval_* set (as its own CLI's
    --apply_chat_template, --num_fewshot, --limit would)."""
    if settings.lm_eval_fewshot is not None and settings.lm_eval_fewshot < 0:
        raise ConfigError(f"eval.lm_eval_fewshot must be 0 or more, got {settings.lm_eval_fewshot}")
    if settings.lm_eval_limit is not None and settings.lm_eval_limit < 1:
        raise ConfigError(f"eval.lm_eval_limit must be 1 or more (or null for all), got {settings.lm_eval_limit}")
    return {"apply_chat_template": bool(settings.lm_eval_chat_template), "num_fewshot": settings.lm_eval_fewshot,
            "limit": settings.lm_eval_limit}


def run_lm_eval(path: str, settings: EvalConfig) -> dict:
    """lm-evaluation-harness's own evaluation of one HF checkpoint (its Python API, its hf backend): task ->
    {metric: value}, the numeric entries of its results."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    manager = TaskManager(include_path=settings.lm_eval_include) if settings.lm_eval_include else TaskManager()
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={path},dtype={dtype}",
                                  tasks=list(settings.lm_eval_tasks), task_manager=manager,
                                  batch_size=settings.batch_size, device=str(_device()),
                                  **lm_eval_options(settings))
    return {task: {metric: value for metric, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
            for task, values in out["results"].items()}


def markdown_table(results: list[ModelScores]) -> str:
    def fmt(value: Optional[float], digits: int = 4) -> str:
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    def match(r: ModelScores) -> str:
        """Exact match with its standard error over the n prompts generated, sqrt(p(1-p)/n)."""
        if r.general_exact_match is None or not r.general_generated:
            return "n/a"
        p, n = r.general_exact_match, r.general_generated
        return f"{p:.3f} (SE {math.sqrt(p * (1 - p) / n):.3f}, n={n})"

    lines = ["| model | task accuracy | task CE | general exact match | general CE | KL to instruct |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {fmt(r.task_accuracy, 3)} | {fmt(r.task_ce)} | "
                     f"{match(r)} | {fmt(r.general_ce)} | {fmt(r.kl_to_instruct)} |")
    harness = harness_columns(results)
    if harness:
        lines += ["", "lm-evaluation-harness:", "",
                  "| model | " + " | ".join(harness_header(t, m) for t, m in harness) + " |",
                  "|---|" + "---|" * len(harness)]
        for r in results:
            lines.append(f"| {r.name} | " + " | ".join(harness_cell(r.lm_eval or {}, t, m) for t, m in harness)
                         + " |")
    return "\n".join(lines) + "\n"


def harness_columns(results: list[ModelScores]) -> list[tuple[str, str]]:
    """(task, metric key) of every lm-evaluation-harness metric, in the order first met over the models. Its
    metric keys read ``metric,filter``; the rest of a task's numbers (``sample_len``, ...) are no metric, and
    ``metric_stderr,filter`` is shown beside its metric, not as one."""
    columns: dict[tuple[str, str], None] = {}
    for r in results:
        for task, metrics in (r.lm_eval or {}).items():
            for key in metrics:
                name = key.split(",", 1)[0]
                if "," in key and not name.endswith("_stderr"):
                    columns[(task, key)] = None
    return list(columns)


def harness_header(task: str, key: str) -> str:
    metric, filter_name = key.split(",", 1)
    return f"{task} {metric}" if filter_name == "none" else f"{task} {metric} ({filter_name})"


def harness_cell(metrics_of: dict, task: str, key: str) -> str:
    """``0.4167 ± 0.1486``: the value and, when the harness gave one, its standard error."""
    metrics = metrics_of.get(task, {})
    value = metrics.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    metric, filter_name = key.split(",", 1)
    stderr = metrics.get(f"{metric}_stderr,{filter_name}")
    if isinstance(stderr, (int, float)) and not isinstance(stderr, bool) and not math.isnan(stderr):
        return f"{value:.4f} ± {stderr:.4f}"
    return f"{value:.4f}"


def measured_points(points: list[tuple[str, Optional[float], Optional[float]]]
                    ) -> tuple[list[tuple[str, float, float]], list[str]]:
    """The points with both values measured, and the names of the others (a None or NaN value)."""
    def measured(value: Optional[float]) -> bool:
        return value is not None and not math.isnan(value)

    shown = [(name, x, y) for name, x, y in points if measured(x) and measured(y)]
    return shown, [name for name, x, y in points if not (measured(x) and measured(y))]


def tradeoff_plot(points: list[tuple[str, Optional[float], Optional[float]]], out_path: Path, xlabel: str,
                  ylabel: str) -> Path:
    """Named points (x = task gain over the instruct model, y = distance from it). A point with a value that was
    not measured (None or NaN: no general set, hence no KL) is left out, and a note under the plot names it:
    drawn at 0 it would sit on the instruct model and read as "no distance"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown, left_out = measured_points(points)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for index, (name, x, y) in enumerate(shown):
        ax.scatter([x], [y])
        # Labels of nearby points are staggered vertically so that they stay readable.
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4 + 9 * (index % 3)))
    ax.axvline(0.0, color="grey", lw=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if left_out:
        fig.text(0.01, 0.01, f"not plotted (a value is n/a): {', '.join(left_out)}", fontsize=8)
    fig.tight_layout(rect=(0, 0.04 if left_out else 0, 1, 1))
    atomic_write(out_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return out_path


def task_gain(result: ModelScores, instruct: ModelScores) -> float:
    """Accuracy gain over the instruct model when generations were scored, else the task CE it saved."""
    if result.task_accuracy is not None and instruct.task_accuracy is not None:
        return result.task_accuracy - instruct.task_accuracy
    return instruct.task_ce - result.task_ce


def write_eval_report(results: list[ModelScores], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / RESULTS_NAME, json.dumps([asdict(r) for r in results], indent=2) + "\n")
    atomic_write_text(out_dir / "results.md", markdown_table(results))
    instruct = results[0]
    gain = "task accuracy gain" if instruct.task_accuracy is not None else "task CE saved"
    tradeoff_plot([(r.name, task_gain(r, instruct), r.kl_to_instruct) for r in results],
                  out_dir / "tradeoff.png", f"{gain} over instruct", "KL to instruct (general set, per token)")
    return out_dir / RESULTS_NAME


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, sections=("eval",))
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                        help="another model to evaluate (repeatable); instruct and the run's merged/ always are")
    parser.add_argument("--output", help="folder for results.json, results.md, tradeoff.png (default <run>/eval)")
    parser.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-evaluation-harness tasks to run too "
                        "(eval.lm_eval_tasks); --lm-eval-include DIR adds your own task YAMLs")
    parser.add_argument("--lm-eval-include", metavar="DIR", help="folder of lm-evaluation-harness task YAMLs")
    parser.add_argument("--lm-eval-chat-template", action=argparse.BooleanOptionalAction, default=None,
                        help="apply each model's chat template to the lm-evaluation-harness requests (its "
                        "apply_chat_template; eval.lm_eval_chat_template): how instruct models are prompted; "
                        "--no-lm-eval-chat-template sends them raw, whatever the config says")
    parser.add_argument("--lm-eval-fewshot", type=_count(0), metavar="N",
                        help="few-shot examples per lm-evaluation-harness request (eval.lm_eval_fewshot; default: "
                        "each task's own)")
    parser.add_argument("--lm-eval-limit", type=_count(1), metavar="N",
                        help="score at most N documents per lm-evaluation-harness task (eval.lm_eval_limit; a "
                        "smoke test, not a benchmark number)")


def _count(least: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected {least} or more, got {value}")
        return value
    return parse


def config_with_arguments(args: argparse.Namespace) -> RunConfig:
    """The run config with the command line's --lm-eval* flags laid over eval.lm_eval_*."""
    cfg = config_from_args(args)
    if args.lm_eval:
        cfg.eval.lm_eval_tasks = [task for task in args.lm_eval.split(",") if task]
    if args.lm_eval_include:
        cfg.eval.lm_eval_include = args.lm_eval_include
    if args.lm_eval_chat_template is not None:  # either flag given; neither: the config's value
        cfg.eval.lm_eval_chat_template = args.lm_eval_chat_template
    if args.lm_eval_fewshot is not None:
        cfg.eval.lm_eval_fewshot = args.lm_eval_fewshot
    if args.lm_eval_limit is not None:
        cfg.eval.lm_eval_limit = args.lm_eval_limit
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = config_with_arguments(args)
    out_dir = Path(args.output) if args.output else cfg.paths.root / "eval"
    root = cfg.paths.root.absolute()
    # One writer per report folder: the run folder's eval lock (or that of --output's parent, outside it).
    with dist.stage_lock(root if root in out_dir.absolute().parents else out_dir.absolute().parent, "eval"):
        results = evaluate_models(cfg, models_to_evaluate(cfg, args.model))
        path = write_eval_report(results, out_dir)
    print(markdown_table(results) + f"\nresults: {path}")
    return 0
