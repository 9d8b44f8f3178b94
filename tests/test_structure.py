"""The package's import graph stays a DAG: stages never import each other or the CLI, contracts never import models."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gift_dist"
FOUNDATION = {"errors", "launchers", "config", "dist", "bundled"}
# What each layer may import (besides itself). The pipeline orchestrates the stages; the CLI loads them by name.
ALLOWED = {
    "errors": set(),
    # The launcher's environment variables: read by the CLI before torch is imported.
    "launchers": set(),
    "config": {"errors"},
    "dist": {"errors", "launchers"},
    "bundled": {"errors"},
    "contracts": {"errors", "config"},
    # Chat rendering and labels (prepare's core, also what eval and the tiny pairs render with).
    "chat": {"errors", "contracts"},
    "models": FOUNDATION | {"contracts"},
    # The training memory model: `plan` prints it, the trainer picks its layout and recompute from it.
    "memory_plan": FOUNDATION | {"contracts", "models"},
    **{stage: FOUNDATION | {"contracts", "models", "chat", "memory_plan"}
       for stage in ("prepare", "score", "train", "merge", "evaluate")},
    # The tiny offline pairs: fixtures of the tests, the demo and the benchmarks, built like real pairs.
    "tiny_pairs": FOUNDATION | {"contracts", "models", "chat"},
    "pipeline": FOUNDATION | {"contracts", "models", "chat", "memory_plan", "tiny_pairs", "prepare", "score", "train",
                              "merge", "evaluate"},
    "cli": {"errors", "launchers"},
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


# Names several modules define on purpose: the CLI protocol every command module follows, and the fields every
# contract module declares about its own artefact (its format, version, file names, manifest reader).
SHARED_BY_DESIGN = {"add_arguments", "run", "FORMAT", "VERSION", "MANIFEST_NAME", "RECORD_NAME", "EVAL_DIR",
                    "read_manifest", "log"}


def _is_type_variable(value: ast.expr) -> bool:
    return isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", "")) == "TypeVar"


def test_no_two_modules_define_the_same_public_name():
    """A name means one thing in the package: `from x import check_finite` cannot pick the wrong one."""
    defined: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign) and not _is_type_variable(node.value):
                names = [target.id for target in node.targets if isinstance(target, ast.Name)]
            for name in names:
                if not name.startswith("_") and name not in SHARED_BY_DESIGN:
                    defined.setdefault(name, []).append(str(path.relative_to(PACKAGE)))
    collisions = {name: where for name, where in defined.items() if len(where) > 1}
    assert not collisions, collisions


def test_no_module_name_repeats_across_packages():
    """One file name per job: two `checkpoint.py` in different folders read as one module in a traceback."""
    stems: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.stem not in ("__init__", "__main__", "stage", "verify"):
            stems.setdefault(path.stem, []).append(str(path.relative_to(PACKAGE)))
    assert {stem: where for stem, where in stems.items() if len(where) > 1} == {}
