"""benchmarks/demo_table.py: the README's demo table is written from a comparison's summary, between markers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from gift_dist.evaluate.stage import ModelScores
from gift_dist.pipeline.compare import summarise

REPO = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("demo_table", REPO / "benchmarks" / "demo_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scores(name, accuracy, match):
    return ModelScores(name=name, path=f"/m/{name}", task_ce=1.0, task_accuracy=accuracy, task_samples=200,
                       general_ce=2.0, kl_to_instruct=0.0 if name == "instruct" else 0.5, general_tokens=50,
                       general_exact_match=match, general_generated=91)


def test_the_table_comes_from_the_summary_and_replaces_only_the_block(tmp_path):
    table = _module()
    summary = json.loads(json.dumps(summarise(
        [_scores("instruct", 0.1, 0.3), _scores("shadow-ft/seed-0", 0.2, 0.2), _scores("shadow-ft/seed-1", 0.3, 0.1)],
        ["shadow-ft"], 200)))  # as read back from summary.json
    text = table.table(summary, 2)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()[2:] if line.startswith("| ")}
    assert "| 0.100 (SE 0.021, n=200) | 1.000 | 0.300 (SE 0.048, n=91) | 2.000 | 0.000 | — / — |" in rows["instruct"]
    assert "| 0.250 ± 0.071 (SE 0.031, n=200) |" in rows["shadow-ft"]
    # +0.15 on the task beyond 2 SE (0.074), -0.15 on the general set beyond 2 SE (0.122): neither marked.
    assert rows["shadow-ft"].endswith("| +0.150 / -0.150 |") and "≈: within 2 standard errors" in text
    assert table._versus_instruct({"vs_instruct": {"diff": 0.01, "se": 0.02, "within_noise": True},
                                   "general_vs_instruct": None}) == "≈ +0.010 / —"
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{table.START}\nold numbers\n{table.END}\nafter\n")
    (tmp_path / "run" / "compare").mkdir(parents=True)
    (tmp_path / "run" / "compare" / "summary.json").write_text(json.dumps(summary))
    assert table.main(["--from-run", str(tmp_path / "run"), "--seeds", "2", "--readme", str(readme)]) == 0
    written = readme.read_text()
    assert written.startswith("before\n" + table.START) and written.endswith(table.END + "\nafter\n")
    assert "old numbers" not in written and text in written and "at commit `" in written
    with pytest.raises(SystemExit):
        table.replace_block("no markers", "x")


def test_the_readme_has_the_block_the_script_writes():
    assert _module().main(["--check"]) == 0


def test_the_base_row_comes_first_with_its_standard_errors(tmp_path):
    """A run with compare/base.json (the base model's scores, evaluated once by the script) gets a base row above
    instruct, its SEs computed like the instruct row's."""
    from dataclasses import asdict

    table = _module()
    summary = summarise([_scores("instruct", 0.1, 0.3), _scores("gift/seed-0", 0.2, 0.2)], ["gift"], 200)
    run = tmp_path / "run" / "compare"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "base.json").write_text(json.dumps(asdict(_scores("base", 0.1, 0.0))))
    readme = tmp_path / "README.md"
    readme.write_text(f"{table.START}\n{table.END}\n")
    assert table.main(["--from-run", str(tmp_path / "run"), "--seeds", "1", "--readme", str(readme)]) == 0
    rows = [line for line in readme.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split("|")[1].strip() for row in rows] == [table.BASE_ROW, "instruct", "gift"]
    assert "| 0.100 (SE 0.021, n=200) | 1.000 | 0.000 (SE 0.000, n=91) |" in rows[0]
