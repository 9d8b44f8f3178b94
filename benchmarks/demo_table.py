"""The README's demo comparison table, produced from a run instead of typed.

Runs ``gift-dist demo --output OUT --compare --seeds N`` (unless ``--from-run OUT`` points at a finished one),
reads ``OUT/compare/summary.json`` and writes the table, with the commit it ran at (``git describe --always
--dirty``: a ``-dirty`` suffix says the working tree had uncommitted changes), the date, the command and its
wall time, between the README's markers::

    <!-- demo-table:start -->
    ...
    <!-- demo-table:end -->

The table's first row is the BASE model the LoRAs train on, evaluated on the same held-out task prompts and
general set (``OUT/compare/base.json``; the comparison itself evaluates the instruct and the merged models only):
it shows where the pair starts, the instruct model's general skill against the base's, and both on the task.

``--check`` runs nothing: it only fails when the README's block is missing. ``--print`` prints the block instead
of writing it. Two runs on one machine give the same table (the demo is deterministic there); another machine
(other CPU, thread count, torch build) may give other numbers, which is why the block names where it came from.

    python benchmarks/demo_table.py --output runs/cmp            # run the comparison, then write the README
    python benchmarks/demo_table.py --from-run runs/cmp --print  # the block of a finished comparison
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"
COLUMNS = (  # (summary key, header, digits)
    ("task_accuracy", "task accuracy", 3),
    ("task_ce", "task CE", 3),
    ("general_exact_match", "general exact match", 3),
    ("general_ce", "general CE", 3),
    ("kl_to_instruct", "KL to instruct", 3),
)


def _cell(pair, digits: int, with_std: bool) -> str:
    mean, std = pair
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if with_std else f"{mean:.{digits}f}"


def _se(row: dict, metric: str) -> str:
    se = row.get(f"{metric}_se")
    return "" if se is None else f" (SE {se:.3f}, n={row[f'{metric}_n']})"


BASE_ROW = "base (no fine-tuning)"


def base_row(scores: dict, max_generate_samples: Optional[int]) -> dict:
    """A summary row of the base model's scores (a ``ModelScores`` as a dict), its standard errors computed as
    ``compare.summarise`` computes the instruct row's (it is summarised under that name, then renamed)."""
    from gift_dist.evaluate.stage import ModelScores
    from gift_dist.pipeline.compare import summarise

    return summarise([ModelScores(**{**scores, "name": "instruct"})], [], max_generate_samples)["instruct"]


def evaluate_base(out: Path, overrides: list[str]) -> Optional[dict]:
    """The base model's scores on the comparison's held-out task prompts and general set: read from
    ``OUT/compare/base.json``, or evaluated (and written there) when the run has its models; None otherwise."""
    path = out / "compare" / "base.json"
    if path.is_file():
        return json.loads(path.read_text())
    if not (out / "models" / "base" / "config.json").is_file():
        return None
    from dataclasses import asdict

    from gift_dist.evaluate.stage import evaluate_models
    from gift_dist.pipeline.demo import demo_config

    cfg = demo_config(out.resolve(), overrides)
    scores = asdict(evaluate_models(cfg, {"base": str(out.resolve() / "models" / "base")})[0])
    path.write_text(json.dumps(scores, indent=2) + "\n")
    return scores


def _versus_instruct(row: dict) -> str:
    """The task accuracy and general exact match differences to instruct (``compare.summarise``), each marked "≈"
    when it lies within noise; "—" for a row without them (base, instruct)."""
    parts = []
    for key in ("vs_instruct", "general_vs_instruct"):
        change = row.get(key)
        parts.append("—" if change is None else ("≈ " if change["within_noise"] else "") + f"{change['diff']:+.3f}")
    return " / ".join(parts)


def table(summary: dict, seeds: int) -> str:
    """The markdown table of a compare summary: one row per method (the base, when it is in the summary, and
    instruct first), mean ± std over seeds; the accuracies with their standard error over the n prompts, and each
    method's differences to instruct with those within noise marked; a note saying what the mark means."""
    from gift_dist.pipeline.compare import NOISE_SE

    header = (f"| method ({seeds} seed(s), mean ± std) | " + " | ".join(h for _, h, _ in COLUMNS)
              + " | vs instruct (task / general) |")
    lines = [header, "|---|" + "---|" * (len(COLUMNS) + 1)]
    for name, row in summary.items():
        cells = []
        for key, _, digits in COLUMNS:
            text = _cell(row[key], digits, with_std=name not in ("instruct", BASE_ROW))
            if key in ("task_accuracy", "general_exact_match") and text != "n/a":
                text += _se(row, key)
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_versus_instruct(row)} |")
    lines += ["", f"vs instruct: the method's task accuracy and general exact match minus the instruct model's; ≈: "
                  f"within {NOISE_SE:g} standard errors of the difference (sqrt(SE² + SE²)), not evidence either way."]
    return "\n".join(lines)


def block(summary: dict, seeds: int, commit: str, command: str, wall_s: Optional[float], when: str) -> str:
    took = f", {wall_s / 60:.1f} min" if wall_s is not None else ""
    cpus = os.cpu_count()
    return "\n".join([
        START,
        f"Produced by `python benchmarks/demo_table.py` from `{command}` at commit `{commit}` ({when}, "
        f"{platform.machine()}, {cpus} CPU(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
        f"{took}):",
        "",
        table(summary, seeds),
        END,
    ])


def replace_block(text: str, new_block: str) -> str:
    """``text`` with the part between the markers (markers included) replaced by ``new_block``."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"README has no {START} ... {END} block to replace")
    return text[:start] + new_block + text[end + len(END):]


def commit_of(repo: Path) -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=repo, check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/cmp", help="run folder for the comparison")
    parser.add_argument("--from-run", metavar="OUT", help="use a finished comparison instead of running one")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--readme", default=str(REPO / "README.md"))
    parser.add_argument("--print", action="store_true", help="print the block, do not write the README")
    parser.add_argument("--check", action="store_true", help="only check that the README has the block")
    parser.add_argument("overrides", nargs="*", help="demo overrides (section.key=value)")
    args = parser.parse_args(argv)
    readme = Path(args.readme)
    if args.check:
        replace_block(readme.read_text(encoding="utf-8"), "")
        return 0
    out = Path(args.from_run or args.output)
    command = f"gift-dist demo --output {out} --compare --seeds {args.seeds}" + "".join(
        f" {o}" for o in args.overrides)
    commit = commit_of(REPO)
    wall = None
    if not args.from_run:
        start = time.monotonic()
        subprocess.run([sys.executable, "-m", "gift_dist.cli", "demo", "--output", str(out), "--compare",
                        "--seeds", str(args.seeds), *args.overrides], check=True)
        wall = time.monotonic() - start
    summary = json.loads((out / "compare" / "summary.json").read_text())
    base = evaluate_base(out, args.overrides)
    if base is not None:
        from gift_dist.pipeline.demo import demo_config

        limit = demo_config(out.resolve(), args.overrides).eval.max_generate_samples
        summary = {BASE_ROW: base_row(base, limit), **summary}
    text = block(summary, args.seeds, commit, command, wall, date.today().isoformat())
    if args.print:
        print(text)
        return 0
    readme.write_text(replace_block(readme.read_text(encoding="utf-8"), text), encoding="utf-8")
    print(text + f"\nwritten into {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
