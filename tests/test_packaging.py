"""One dependency list: CI, the README's set-up and the Docker image install from constraints.txt."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def test_ci_readme_and_image_install_the_same_pinned_stack():
    pins = _pins()
    install = 'pip install -c constraints.txt -e ".[test]"'
    assert install in (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert f"{install} && python -m pytest -q tests" in readme and f"{install} && gift-dist demo" in readme
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "COPY constraints.txt" in dockerfile
    installs = re.findall(r"pip install -c /tmp/constraints.txt ((?:[^\n\\]|\\\n)+)", dockerfile)
    packages = {word.lower() for block in installs for word in block.replace("\\\n", " ").split()
                if not word.startswith("-") and word != "."}
    assert packages and packages <= set(pins), sorted(packages - set(pins))
    assert not re.search(r"==\d", dockerfile), "versions belong in constraints.txt, not the Dockerfile"


def test_every_runtime_requirement_is_pinned_and_its_floor_is_not_above_the_pin():
    setup = (REPO / "setup.py").read_text()
    pins = _pins()
    for name, floor in re.findall(r'"([A-Za-z0-9_-]+)>=([0-9.]+)"', setup):
        assert name.lower() in pins, f"{name} has a floor in setup.py but no pin in constraints.txt"
        floor_parts = [int(p) for p in floor.split(".")]
        pin_parts = [int(p) for p in re.findall(r"\d+", pins[name.lower()])[: len(floor_parts)]]
        assert floor_parts <= pin_parts, f"{name}: floor {floor} above the tested {pins[name.lower()]}"


# Extras that are tools of the suite, not features a user turns on.
TEST_ONLY_EXTRAS = ("test", "bench")


def _setup_lists() -> tuple[list[str], dict[str, list[str]]]:
    """setup.py's install_requires and extras_require, package names only."""
    import ast

    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    keywords = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg in ("install_requires",
                                                                                         "extras_require")}
    name = lambda requirement: re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()
    return ([name(r) for r in keywords["install_requires"]],
            {extra: [name(r) for r in reqs] for extra, reqs in keywords["extras_require"].items()})


def test_the_default_trackers_are_installed_by_the_readme_install():
    """train.report_to's default needs nothing `pip install -e .` (the README's cluster install) leaves out."""
    from gift_dist.config import TrainConfig

    install_requires, _ = _setup_lists()
    missing = [tracker for tracker in TrainConfig().report_to if tracker not in install_requires]
    assert not missing, f"train.report_to defaults to {missing}, which `pip install -e .` does not install"


def test_the_image_installs_the_optional_extras_the_readme_documents():
    _, extras = _setup_lists()
    readme = (REPO / "README.md").read_text()
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    installs = re.findall(r"pip install -c /tmp/constraints.txt ((?:[^\n\\]|\\\n)+)", dockerfile)
    in_image = {word.lower() for block in installs for word in block.replace("\\\n", " ").split()}
    for extra, packages in extras.items():
        if extra in TEST_ONLY_EXTRAS:
            continue
        assert f"gift-dist[{extra}]" in readme, f"the README does not document the {extra!r} extra"
        assert set(packages) <= in_image, f"the image lacks the {extra!r} extra: {sorted(set(packages) - in_image)}"
