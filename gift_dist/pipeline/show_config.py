"""`gift-dist config`: the run config as every stage will see it (defaults, file and overrides resolved), each key
with its documentation, as YAML that can be saved and passed back with --config."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import textwrap
from typing import Any

import yaml

from gift_dist.config import RunConfig, add_config_arguments, config_from_args, config_to_dict

# A field of a config dataclass: `    name: annotation` at the class body's indentation.
FIELD_LINE = re.compile(r"^    (\w+)\s*:")


def field_docs(cls: type) -> dict[str, str]:
    """The ``#`` comment lines written right above each field of a config dataclass, by field name (the config
    module documents its fields that way; one place for a key's meaning, shown here and in the source)."""
    names = {f.name for f in dataclasses.fields(cls)}
    docs, pending = {}, []
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        field_name = FIELD_LINE.match(line)
        if text.startswith("#"):
            pending.append(text.lstrip("#").strip())
        elif field_name and field_name.group(1) in names:
            if pending:
                docs[field_name.group(1)] = " ".join(pending)
            pending = []
        else:
            pending = []
    return docs


def explain(cfg: Any, indent: int = 0) -> str:
    """``cfg`` as YAML, every documented key preceded by its documentation as a comment."""
    docs = field_docs(type(cfg))
    pad = " " * indent
    lines = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in docs:
            lines += [f"{pad}# {text}" for text in textwrap.wrap(docs[f.name], 116 - indent)]
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            lines.append(explain(value, indent + 2))
        else:
            dumped = yaml.safe_dump({f.name: config_to_dict(value) if dataclasses.is_dataclass(value) else
                                     _plain(value)}, sort_keys=False, width=120).rstrip("\n")
            lines += [pad + line for line in dumped.splitlines()]
    return "\n".join(lines)


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
