"""`gift-dist compare`: the paper's comparison on your own models and data.

GIFT's claim is a comparison: the merged model does the task better than direct fine-tuning and Shadow-FT while
staying closer to the instruct model elsewhere. This command runs it from one config:

1. ``prepare`` once, with a held-out split (``prepare.eval_fraction``); ``score`` once if any method needs it;
2. every method (``--methods``, presets of ``config.METHODS``) x ``--seeds`` seeds (``train.seed + k``) trains
   and merges in ``<output_dir>/compare/<method>/seed-<k>/`` on the shared ``prepared/`` and ``confidence/``
   (``gift-dist run`` per variant, so a killed comparison resumes: finished variants are skipped, a half-trained
   one continues from its checkpoint);
   With ``--quantize-variants nf4`` (or int8) every method also trains on its base quantized by bitsandbytes
   (``train.quantize_base``, QLoRA), as the row ``<method>+nf4`` beside the full-precision one, so the table
   shows what the quantized base costs;
3. ``gift-dist eval`` scores the instruct model and every merged model on the same held-out task samples and
   the same general chat set;
4. ``compare/report.md`` (mean +- std over seeds per method; for task accuracy also its standard error over the
   n evaluated prompts, and each method's difference to instruct and to gift marked "within noise" when it lies
   within 2 standard errors; the general set's greedy exact match with its standard error over its n prompts),
   ``compare/summary.json`` (the same numbers), ``compare/results.json`` and
   ``compare/tradeoff.png`` (task gain over the instruct model against KL to it).

Whatever the numbers are, they are reported as they come: the report shows the comparison, not a verdict.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

from gift_dist.config import (
    METHOD_NAMES,
    METHODS,
    QUANTIZE_BASES,
    ConfigError,
    RunConfig,
    add_config_arguments,
    apply_method,
    config_from_args,
    dump_config,
)
from gift_dist.contracts import atomic_write_text
from gift_dist.pipeline.run import (
    Launch,
    add_launch_arguments,
    confidence_is_complete,
    launch_from_args,
    prepared_is_current,
    run_pipeline,
    score_and_train,
)

log = logging.getLogger(__name__)

# Every method, in config.METHODS' order (the one list of methods).
DEFAULT_METHODS = METHOD_NAMES
METRICS = ("task_accuracy", "task_ce", "general_exact_match", "general_ce", "kl_to_instruct")
# The train.quantize_base values --quantize-variants takes, and what joins one to its method in a row's name.
QUANTIZE_VARIANTS = tuple(q for q in QUANTIZE_BASES if q != "none")
QUANTIZED_MARK = "+"


def compared_rows(methods: list[str], quantize_variants: list[str]) -> list[str]:
    """The rows compared: each method, followed by its quantized-base variants (``gift``, ``gift+nf4``, ...)."""
    return [row for method in methods for row in (method, *(method + QUANTIZED_MARK + q for q in quantize_variants))]


def split_row(row: str) -> tuple[str, str]:
    """A row's method and train.quantize_base: ``gift+nf4`` -> (``gift``, ``nf4``), ``gift`` -> (``gift``,
    ``none``)."""
    method, _, quantize = row.partition(QUANTIZED_MARK)
    return method, quantize or "none"


def variant_config(cfg: RunConfig, row: str, seed_index: int) -> RunConfig:
    """The run config of one row (a method, with its base quantized for a ``+nf4`` row) and seed: its own output
    folder, the shared data linked into it."""
    method, quantize = split_row(row)
    train = replace(cfg.train, seed=cfg.train.seed + seed_index, quantize_base=quantize)
    variant = apply_method(replace(cfg, train=train), method)
    variant.output_dir = str(cfg.paths.root / "compare" / row / f"seed-{seed_index}")
    root = variant.paths.root
    root.mkdir(parents=True, exist_ok=True)
    for shared, link in ((cfg.paths.prepared, variant.paths.prepared), (cfg.paths.confidence,
                                                                        variant.paths.confidence)):
        if shared.exists() and not link.exists():
            link.symlink_to(shared.resolve(), target_is_directory=True)
    return variant


def compare(cfg: RunConfig, methods: list[str], seeds: int, launch: Optional[Launch] = None,
            quantize_variants: tuple[str, ...] = ()) -> Path:
    from gift_dist.contracts import prepared as prepared_contract
    from gift_dist.evaluate.stage import evaluate_models, markdown_table, tradeoff_plot
    from gift_dist.prepare.stage import prepare
    from gift_dist.train.weighting import needs_confidence

    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ConfigError(f"compare: unknown methods {unknown}; choose from {sorted(METHODS)}")
    if seeds < 1:
        raise ConfigError(f"compare: --seeds must be >= 1, got {seeds}")
    unknown = sorted(set(quantize_variants) - set(QUANTIZE_VARIANTS))
    if unknown:
        raise ConfigError(f"compare: unknown --quantize-variants {unknown}; choose from {list(QUANTIZE_VARIANTS)}")
    if quantize_variants and cfg.train.quantize_base != "none":
        raise ConfigError(f"compare --quantize-variants puts quantized-base rows beside full-precision ones, but "
                          f"train.quantize_base={cfg.train.quantize_base} quantizes them all: set "
                          f"train.quantize_base=none")
    for quantize in quantize_variants:
        # The train section's own checks (bitsandbytes installed, the layout) before any row trains.
        replace(cfg.train, quantize_base=quantize)
    rows = compared_rows(methods, list(quantize_variants))
    if cfg.prepare.eval_fraction <= 0:
        raise ConfigError("compare evaluates on held-out data: set prepare.eval_fraction (e.g. 0.1)")
    if not cfg.eval.general_files:
        log.warning("compare: no eval.general_files, so no preservation metrics (CE and KL to instruct)")
    launch = launch or Launch(train_procs=1, score_workers=1)
    cfg.paths.logs.mkdir(parents=True, exist_ok=True)
    if not prepared_is_current(cfg):
        prepare(cfg)
    fingerprint = prepared_contract.read_manifest(cfg.paths.prepared).fingerprint
    if any(needs_confidence(apply_method(cfg, m).train) for m in methods) and not confidence_is_complete(
            cfg, fingerprint):
        config_file = cfg.paths.logs / "compare_config.yaml"
        dump_config(cfg, config_file)
        score_and_train(cfg, config_file, launch, needs_scoring=True, needs_training=False)

    merged: dict[str, str] = {}
    for row in rows:
        for seed_index in range(seeds):
            variant = variant_config(cfg, row, seed_index)
            log.info("compare: %s seed %d in %s", row, seed_index, variant.paths.root)
            run_pipeline(variant, launch)
            merged[f"{row}/seed-{seed_index}"] = str(variant.paths.merged)

    results = evaluate_models(cfg, {"instruct": cfg.instruct_model, **merged})
    out = cfg.paths.root / "compare"
    atomic_write_text(out / "results.json", json.dumps([asdict(r) for r in results], indent=2) + "\n")
    summary = summarise(results, rows, cfg.eval.max_generate_samples)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "report.md", compare_report(summary, seeds, markdown_table(results)))
    instruct = summary["instruct"]
    gain_key = "task_accuracy" if instruct["task_accuracy"][0] is not None else "task_ce"
    sign = 1.0 if gain_key == "task_accuracy" else -1.0
    tradeoff_plot([(name, sign * (row[gain_key][0] - instruct[gain_key][0]), row["kl_to_instruct"][0])
                   for name, row in summary.items()], out / "tradeoff.png",
                  "task accuracy gain over instruct" if sign > 0 else "task CE saved over instruct",
                  "KL to instruct (general set, per token; mean over seeds)")
    return out / "report.md"


# A difference within this many standard errors is reported as "within noise".
NOISE_SE = 2.0


def accuracy_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` prompts: sqrt(p(1-p)/n)."""
    if n < 1:
        raise ValueError(f"an accuracy needs at least one prompt, got n={n}")
    return math.sqrt(p * (1.0 - p) / n)


def difference(row: dict, reference: dict, metric: str = "task_accuracy") -> Optional[dict]:
    """An accuracy of ``row`` (``metric``: task accuracy or general exact match) minus ``reference``'s, with the
    difference's standard error (the two rows' SEs combined as if independent, sqrt(se_a^2 + se_b^2):
    conservative, since both are measured on the same prompts) and whether it lies within NOISE_SE of them; None
    when either was not measured."""
    (mean, _), (ref_mean, _) = row[metric], reference[metric]
    se_a, se_b = row[f"{metric}_se"], reference[f"{metric}_se"]
    if mean is None or ref_mean is None or se_a is None or se_b is None:
        return None
    se = math.hypot(se_a, se_b)
    diff = mean - ref_mean
    return {"diff": diff, "se": se, "within_noise": bool(abs(diff) <= NOISE_SE * se)}


def summarise(results, methods: list[str], max_generate_samples: Optional[int] = None) -> dict[str, dict]:
    """Per row (instruct, then each method): (mean, std over seeds) of each metric, None where not measured; for
    task accuracy also ``task_accuracy_n`` (prompts whose replies were generated and checked: the held-out
    samples, at most ``max_generate_samples``), ``task_accuracy_se`` (sqrt(p(1-p)/n) at the mean p: the
    uncertainty from the choice of prompts, which averaging seeds on the same prompts does not reduce), and the
    difference to instruct (``vs_instruct``) and, for the other methods, to gift (``vs_gift``): see `difference`;
    the same for general exact match (``general_exact_match_n``, ``_se``, ``general_vs_instruct``,
    ``general_vs_gift``): whether a method kept the instruct model's skill, or only looks as if it lost some."""
    groups = {"instruct": [r for r in results if r.name == "instruct"]}
    for method in methods:
        groups[method] = [r for r in results if r.name.split("/")[0] == method]
    summary: dict[str, dict] = {}
    for name, rows in groups.items():
        summary[name] = {}
        for metric in METRICS:
            values = [getattr(r, metric) for r in rows if getattr(r, metric) is not None]
            if not values:
                summary[name][metric] = (None, None)
            else:
                summary[name][metric] = (statistics.fmean(values),
                                         statistics.stdev(values) if len(values) > 1 else 0.0)
        scored = [r for r in rows if r.task_accuracy is not None]
        n = min(r.task_samples for r in scored) if scored else 0
        if max_generate_samples is not None:
            n = min(n, max_generate_samples)
        measured = summary[name]["task_accuracy"][0] is not None and n > 0
        summary[name]["task_accuracy_n"] = n if measured else None
        summary[name]["task_accuracy_se"] = accuracy_se(summary[name]["task_accuracy"][0], n) if measured else None
        matched = [r for r in rows if r.general_exact_match is not None and r.general_generated > 0]
        general_n = min(r.general_generated for r in matched) if matched else 0
        measured = summary[name]["general_exact_match"][0] is not None and general_n > 0
        summary[name]["general_exact_match_n"] = general_n if measured else None
        summary[name]["general_exact_match_se"] = (accuracy_se(summary[name]["general_exact_match"][0], general_n)
                                                   if measured else None)
    for name, row in summary.items():
        if name == "instruct":
            continue
        row["vs_instruct"] = difference(row, summary["instruct"])
        row["general_vs_instruct"] = difference(row, summary["instruct"], "general_exact_match")
        if name != "gift" and "gift" in summary:
            row["vs_gift"] = difference(row, summary["gift"])
            row["general_vs_gift"] = difference(row, summary["gift"], "general_exact_match")
    return summary


def compare_report(summary: dict, seeds: int, per_model: str) -> str:
    def cell(pair, digits: int) -> str:
        mean, std = pair
        return "n/a" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"

    def se_cell(row: dict, metric: str = "task_accuracy") -> str:
        se = row.get(f"{metric}_se")
        return "n/a" if se is None else f"{se:.3f} (n={row[f'{metric}_n']})"

    def diff_cell(change: Optional[dict]) -> str:
        if change is None:
            return "—"
        bound = f"{NOISE_SE:g} SE = {NOISE_SE * change['se']:.3f}"
        return f"{change['diff']:+.3f} (within noise: {bound})" if change["within_noise"] else \
            f"{change['diff']:+.3f} ({bound})"

    lines = [f"# GIFT vs Shadow-FT vs DFT vs direct fine-tuning ({seeds} seed(s) each, mean ± std over seeds)", "",
             "| method | task accuracy | SE of accuracy | vs instruct | vs gift | task CE | general exact match | "
             "SE of general match | general vs instruct | general vs gift | general CE | KL to instruct |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in summary.items():
        lines.append(f"| {name} | {cell(row['task_accuracy'], 3)} | {se_cell(row)} | "
                     f"{diff_cell(row.get('vs_instruct'))} | {diff_cell(row.get('vs_gift'))} | "
                     f"{cell(row['task_ce'], 4)} | {cell(row['general_exact_match'], 3)} | "
                     f"{se_cell(row, 'general_exact_match')} | {diff_cell(row.get('general_vs_instruct'))} | "
                     f"{diff_cell(row.get('general_vs_gift'))} | {cell(row['general_ce'], 4)} | "
                     f"{cell(row['kl_to_instruct'], 4)} |")
    lines += ["", "Task: held-out samples of the prepared data (accuracy of greedy answers, teacher-forced CE).",
              "Preservation: the general chat set (greedy exact match of its replies, with its standard error "
              "sqrt(p(1-p)/n) over the n prompts generated; CE of its replies; per-token KL(instruct || model)).",
              "SE of accuracy: sqrt(p(1-p)/n) over the n prompts evaluated, the uncertainty from which prompts were "
              "drawn (the ± std is the spread over seeds on the same prompts). vs instruct / vs gift: the difference "
              "in task accuracy (general ...: in general exact match); \"within noise\" when it lies within "
              f"{NOISE_SE:g} standard errors of the "
              "difference (the two rows' SEs combined, sqrt(se1² + se2²)): such a difference is not evidence that "
              "either is better.", "",
              "## Every model", "", per_model]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, from {sorted(METHODS)} (default: all)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method (train.seed + 0..N-1)")
    parser.add_argument("--quantize-variants", default="",
                        help=f"comma-separated train.quantize_base values from {list(QUANTIZE_VARIANTS)}: every "
                             f"method also trains on its base so quantized (QLoRA), as rows like gift+nf4 beside the "
                             f"full-precision ones")
    add_launch_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from gift_dist.pipeline.run import exit_status

    def work() -> None:
        path = compare(config_from_args(args), [m for m in args.methods.split(",") if m], args.seeds,
                       launch_from_args(args), tuple(q for q in args.quantize_variants.split(",") if q))
        print(path.read_text())
        print(f"report: {path}")

    return exit_status("compare", work)
