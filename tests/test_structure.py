"""The package's import graph stays a DAG: stages never import each other or the CLI, contracts never import models."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gift_dist"
FOUNDATION = {"errors", "config", "dist", "bundled"}
# What each layer may import (besides itself). The pipeline orchestrates the stages; the CLI loads them by name.
ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "dist": {"errors"},
    "bundled": {"errors"},
    "contracts": {"errors", "config"},
    "models": FOUNDATION | {"contracts"},
    **{stage: FOUNDATION | {"contracts", "models"} for stage in ("prepare", "score", "train", "merge", "evaluate")},
    "pipeline": FOUNDATION | {"contracts", "models", "prepare", "score", "train", "merge", "evaluate"},
    "cli": {"errors"},
    "__main__": {"cli"},
}


def _layer(path: Path) -> str:
    """The top-level module or subpackage a file belongs to."""
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def _imported_layers(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "gift_dist":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gift_dist."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("gift_dist.")}
    return found


def test_every_module_imports_only_the_layers_below_it():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = _layer(path)
        if layer == "__init__":
            continue
        for imported in _imported_layers(path) - {layer, "__version__"}:
            if imported not in ALLOWED.get(layer, set()):
                violations.append(f"{path.relative_to(PACKAGE)} ({layer}) imports {imported}")
    assert not violations, "\n".join(violations)
