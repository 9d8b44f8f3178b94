"""`gift-dist config`: the run config as every stage will see it (defaults, file and overrides resolved), each key
with its documentation, as YAML that can be saved and passed back with --config."""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
import typing
from typing import Any

import yaml

from gift_dist.config import RunConfig, add_config_arguments, config_from_args, config_to_dict, field_docs


def explain(cfg: Any, indent: int = 0) -> str:
    """``cfg`` as YAML, every key preceded by its documentation (the field's ``help`` metadata) as a comment."""
    docs = field_docs(type(cfg))
    hints = typing.get_type_hints(type(cfg))
    pad = " " * indent
    lines = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if docs.get(f.name):
            lines += _comment(docs[f.name], pad)
        # A list of sections (data.sources): the keys of one entry, documented under the list's own comment.
        item = next((t for t in typing.get_args(hints[f.name]) if dataclasses.is_dataclass(t)), None)
        if typing.get_origin(hints[f.name]) is list and item is not None:
            for key, text in field_docs(item).items():
                lines += _comment(f"{key}: {text}", pad, first="  - ", rest="    ")
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            lines.append(explain(value, indent + 2))
        else:
            dumped = yaml.safe_dump({f.name: config_to_dict(value) if dataclasses.is_dataclass(value) else
                                     _plain(value)}, sort_keys=False, width=120).rstrip("\n")
            lines += [pad + line for line in dumped.splitlines()]
    return "\n".join(lines)


def _comment(text: str, pad: str, first: str = "", rest: str = "") -> list[str]:
    """``text`` as YAML comment lines of at most 118 characters, broken at spaces only (the text reads back whole
    by joining the lines)."""
    width = 116 - len(pad) - max(len(first), len(rest))
    wrapped = textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)
    return [f"{pad}# {first if i == 0 else rest}{line}" for i, line in enumerate(wrapped)]


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [config_to_dict(v) if dataclasses.is_dataclass(v) else v for v in value]
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg: RunConfig = config_from_args(args)
    print(explain(cfg))
    return 0
