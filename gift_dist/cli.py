"""The ``gift-dist`` command: one subcommand per stage, each taking ``--config FILE`` plus ``key=value`` overrides.

Stage modules are imported only for the command that runs, so ``gift-dist --help`` stays fast and a scorer
job never imports DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional

from gift_dist.errors import UserError

# command -> (module defining add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS = {
    "prepare": ("gift_dist.prepare.stage", "tokenize the data once with the instruct chat template"),
    "check": ("gift_dist.models.pair", "check that base and instruct models are a compatible pair"),
    "score": ("gift_dist.score.stage", "write the instruct model's per-token confidence shards"),
    "verify-confidence": ("gift_dist.score.verify", "check confidence shards against manifest and dataset"),
    "train": ("gift_dist.train.recipe", "LoRA training of the base model with the weighted loss (DeepSpeed)"),
    "merge": ("gift_dist.merge.stage", "merge the adapter into the instruct model, shard by shard"),
    "verify-merge": ("gift_dist.merge.verify", "recompute merged tensors and compare logits with peft"),
    "eval": ("gift_dist.evaluate.stage", "task accuracy / CE on held-out data and KL to instruct on general chat"),
    "run": ("gift_dist.pipeline.run", "prepare -> score -> train -> merge on one machine"),
    "compare": ("gift_dist.pipeline.compare", "GIFT vs Shadow-FT vs DFT vs direct FT over seeds: trained, merged, "
                                              "evaluated, reported"),
    "demo": ("gift_dist.pipeline.demo", "the whole pipeline offline on tiny models and bundled data"),
    "plan": ("gift_dist.pipeline.plan", "memory plan for training, scoring and merging a model"),
    "make-tiny": ("gift_dist.models.tiny", "write a tiny offline base/instruct pair and the bundled data"),
}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gift-dist", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The first word naming a command (not the value of an option such as `--log-level INFO`).
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except UserError as exc:
        print(f"gift-dist {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
