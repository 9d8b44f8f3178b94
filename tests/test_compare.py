"""`gift-dist compare`: every method's row from one config, a killed comparison that resumes, and the summary
(mean ± std over seeds, standard errors, differences within noise) on hand-made results."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gift_dist.bundled import bundled_data_path, bundled_general_path, read_jsonl, write_jsonl
from gift_dist.config import dump_config
from gift_dist.contracts.adapter import read_adapter
from gift_dist.evaluate.stage import ModelScores
from gift_dist.pipeline.compare import compare_report, summarise
from tests.conftest import make_run_config

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"prepare.max_length": 256, "prepare.eval_fraction": 0.2, "prepare.samples_per_shard": 64,
            "train.max_steps": 2, "train.micro_batch_size": 4, "train.progress": False, "score.progress": False,
            "train.lora.r": 4, "eval.max_generate_samples": 4, "eval.max_general_samples": 8,
            "eval.batch_size": 4}


def _config_file(tiny_llama, tmp_path) -> Path:
    data = write_jsonl(read_jsonl(bundled_data_path())[:80], tmp_path / "data.jsonl")
    cfg = make_run_config(tiny_llama, tmp_path / "run", [data], **SETTINGS)
    cfg.eval.general_files = [str(bundled_general_path())]
    path = tmp_path / "run.yaml"
    dump_config(cfg, path)
    return path


def _compare(config_file: Path, methods: str, wait: bool = True):
    cmd = [sys.executable, "-m", "gift_dist.cli", "compare", "--config", str(config_file), "--methods", methods,
           "--seeds", "1", "--train-procs", "1", "--score-workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    if not wait:
        return proc
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-5000:]
    return output


@pytest.mark.slow
def test_every_method_gets_a_row_without_extra_overrides(tiny_llama, tmp_path):
    output = _compare(_config_file(tiny_llama, tmp_path), "gift,shadow-ft,dft,direct")
    report = (tmp_path / "run" / "compare" / "report.md").read_text()
    for row in ("| instruct |", "| gift |", "| shadow-ft |", "| dft |", "| direct |"):
        assert row in report and row in output
    results = {r["name"]: r for r in json.loads((tmp_path / "run" / "compare" / "results.json").read_text())}
    assert set(results) == {"instruct", "gift/seed-0", "shadow-ft/seed-0", "dft/seed-0", "direct/seed-0"}
    for name, row in results.items():
        assert (row["kl_to_instruct"] > 0) == (name != "instruct")
    provenance = {m: read_adapter(tmp_path / "run" / "compare" / m / "seed-0" / "adapter").provenance
                  for m in ("dft", "direct")}
    assert provenance["dft"].weighting["weighting"] == "dft"
    assert provenance["dft"].weighting["normalizer"] == "token_count"
    assert provenance["direct"].train_model == "instruct"
    assert (tmp_path / "run" / "compare" / "tradeoff.png").is_file()


@pytest.mark.slow
def test_a_killed_comparison_resumes_without_redoing_finished_variants(tiny_llama, tmp_path):
    config_file = _config_file(tiny_llama, tmp_path)
    first_merged = tmp_path / "run" / "compare" / "dft" / "seed-0" / "merged" / "gift_merge.json"
    proc = _compare(config_file, "dft,direct", wait=False)
    deadline = time.monotonic() + 300
    while not first_merged.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first_merged.is_file(), "the first variant never finished"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_at = first_merged.stat().st_mtime
    output = _compare(config_file, "dft,direct")
    assert first_merged.stat().st_mtime == finished_at
    assert "| dft |" in output and "| direct |" in output


# ------------------------------------------------------------------------------------ the summary, hand-made results

def _scores(name: str, accuracy, task_samples: int = 100, task_ce: float = 1.0, kl=0.1) -> ModelScores:
    return ModelScores(name=name, path=f"/m/{name}", task_ce=task_ce, task_accuracy=accuracy,
                       task_samples=task_samples, general_ce=2.0, kl_to_instruct=kl, general_tokens=50)


HAND_MADE = [
    _scores("instruct", 0.50, kl=0.0),
    _scores("gift/seed-0", 0.55, task_ce=0.8), _scores("gift/seed-1", 0.57, task_ce=0.9),
    _scores("shadow-ft/seed-0", 0.80), _scores("shadow-ft/seed-1", 0.82),
    _scores("dft/seed-0", 0.60), _scores("dft/seed-1", 0.58),
]


def test_summary_gives_mean_std_over_seeds_and_the_standard_error_over_prompts():
    summary = summarise(HAND_MADE, ["gift", "shadow-ft", "dft"])
    assert list(summary) == ["instruct", "gift", "shadow-ft", "dft"]
    mean, std = summary["gift"]["task_accuracy"]
    assert mean == pytest.approx(0.56) and std == pytest.approx(math.sqrt(2) * 0.01)
    assert summary["gift"]["task_ce"] == (pytest.approx(0.85), pytest.approx(math.sqrt(0.005)))
    assert summary["instruct"]["task_accuracy"] == (0.5, 0.0)
    assert summary["instruct"]["task_accuracy_n"] == summary["gift"]["task_accuracy_n"] == 100
    assert summary["instruct"]["task_accuracy_se"] == pytest.approx(0.05)  # sqrt(.5 * .5 / 100)
    assert summary["gift"]["task_accuracy_se"] == pytest.approx(math.sqrt(0.56 * 0.44 / 100))
    # replies are generated for at most eval.max_generate_samples of the held-out samples: that is n
    capped = summarise(HAND_MADE, ["gift"], max_generate_samples=25)
    assert capped["instruct"]["task_accuracy_n"] == 25 and capped["instruct"]["task_accuracy_se"] == pytest.approx(0.1)


def test_differences_within_two_standard_errors_are_marked_within_noise():
    summary = summarise(HAND_MADE, ["gift", "shadow-ft", "dft"])
    gift, shadow, dft = summary["gift"], summary["shadow-ft"], summary["dft"]
    # gift vs instruct: +0.06, 2 SE = 2 * sqrt(.0496^2 + .05^2) = 0.141: noise
    assert gift["vs_instruct"]["diff"] == pytest.approx(0.06)
    assert gift["vs_instruct"]["se"] == pytest.approx(math.hypot(gift["task_accuracy_se"], 0.05))
    assert gift["vs_instruct"]["within_noise"] and "vs_gift" not in gift
    # shadow-ft: +0.31 over instruct and +0.25 over gift, both beyond 2 SE (~0.13)
    assert not shadow["vs_instruct"]["within_noise"] and not shadow["vs_gift"]["within_noise"]
    assert shadow["vs_gift"]["diff"] == pytest.approx(0.25)
    # dft: +0.03 over gift and +0.09 over instruct, both within 2 SE (~0.14)
    assert dft["vs_gift"]["within_noise"] and dft["vs_instruct"]["within_noise"]
    assert "vs_instruct" not in summary["instruct"]
    table = compare_report(summary, 2, "(per model)")
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert "| 0.560 ± 0.014 | 0.050 (n=100) | +0.060 (within noise: 2 SE = 0.141) | — |" in rows["gift"]
    assert "+0.310 (2 SE = 0.127)" in rows["shadow-ft"] and "+0.250 (2 SE = 0.127)" in rows["shadow-ft"]
    assert "within noise" not in rows["shadow-ft"]
    assert rows["dft"].count("within noise") == 2
    assert "| instruct | 0.500 ± 0.000 | 0.050 (n=100) | — | — |" in rows["instruct"]
    assert "sqrt(p(1-p)/n)" in table and "(per model)" in table


def test_summary_without_generated_answers_reports_no_accuracy_or_noise():
    results = [_scores("instruct", None, kl=0.0), _scores("gift/seed-0", None), _scores("direct/seed-0", None)]
    summary = summarise(results, ["gift", "direct"], max_generate_samples=0)
    assert summary["gift"]["task_accuracy"] == (None, None) and summary["gift"]["task_accuracy_se"] is None
    assert summary["direct"]["vs_gift"] is None and summary["direct"]["vs_instruct"] is None
    table = compare_report(summary, 1, "")
    assert "| direct | n/a | n/a | — | — | 1.0000 ± 0.0000 |" in table
    json.dumps(summary)  # written as compare/summary.json


def test_general_exact_match_gets_mean_std_and_its_standard_error_over_prompts():
    def scored(name, match, n=64):
        return ModelScores(name=name, path=f"/m/{name}", task_ce=1.0, task_accuracy=0.5, task_samples=100,
                           general_ce=2.0, kl_to_instruct=0.1, general_tokens=50, general_exact_match=match,
                           general_generated=n)

    results = [scored("instruct", 0.75), scored("gift/seed-0", 0.5), scored("gift/seed-1", 0.25),
               scored("direct/seed-0", None, n=0)]
    summary = summarise(results, ["gift", "direct"])
    assert summary["instruct"]["general_exact_match"] == (0.75, 0.0)
    assert summary["instruct"]["general_exact_match_n"] == 64
    assert summary["instruct"]["general_exact_match_se"] == pytest.approx(math.sqrt(0.75 * 0.25 / 64))
    mean, std = summary["gift"]["general_exact_match"]
    assert mean == pytest.approx(0.375) and std == pytest.approx(math.sqrt(2) * 0.125)
    assert summary["gift"]["general_exact_match_se"] == pytest.approx(math.sqrt(0.375 * 0.625 / 64))
    assert summary["direct"]["general_exact_match"] == (None, None)
    assert summary["direct"]["general_exact_match_se"] is None
    rows = {line.split("|")[1].strip(): line for line in compare_report(summary, 2, "").splitlines() if line.startswith("| ")}
    assert "| 0.375 ± 0.177 | 0.061 (n=64) |" in rows["gift"]
    assert "| 0.750 ± 0.000 | 0.054 (n=64) |" in rows["instruct"]
    assert "| n/a | n/a | — | — | 2.0000 ± 0.0000 |" in rows["direct"]
    # gift kept 0.375 of instruct's 0.75: -0.375, beyond 2 SE of the difference (2 sqrt(0.0605² + 0.0541²) = 0.162).
    kept = summary["gift"]["general_vs_instruct"]
    assert kept["diff"] == pytest.approx(-0.375) and not kept["within_noise"]
    assert kept["se"] == pytest.approx(math.hypot(math.sqrt(0.375 * 0.625 / 64), math.sqrt(0.75 * 0.25 / 64)))
    assert "| -0.375 (2 SE = 0.162) | — |" in rows["gift"]
    assert summary["direct"]["general_vs_instruct"] is None and summary["direct"]["general_vs_gift"] is None
    json.dumps(summary)


def test_points_without_a_measured_kl_are_left_out_of_the_tradeoff_plot_and_named(tmp_path, monkeypatch):
    """Without eval.general_files there is no KL: drawn at 0 it would sit on the instruct model. The plot's note
    names the points left out, and the labels of the points drawn are staggered (shadow-ft and dft nearly touch)."""
    import matplotlib.axes
    import matplotlib.figure

    from gift_dist.evaluate.stage import measured_points, tradeoff_plot

    points = [("instruct", 0.0, 0.0), ("gift", 0.2, None), ("direct", 0.3, float("nan")), ("shadow-ft", 0.1, 0.4),
              ("dft", 0.1, 0.41)]
    shown, left_out = measured_points(points)
    assert shown == [("instruct", 0.0, 0.0), ("shadow-ft", 0.1, 0.4), ("dft", 0.1, 0.41)]
    assert left_out == ["gift", "direct"]

    # What the plot draws, recorded on its way to matplotlib's own methods.
    notes, labels = [], []
    figure_text, axes_annotate = matplotlib.figure.Figure.text, matplotlib.axes.Axes.annotate

    def recorded_text(figure, x, y, text, *args, **kwargs):
        notes.append(text)
        return figure_text(figure, x, y, text, *args, **kwargs)

    def recorded_annotate(axes, text, xy, *args, **kwargs):
        labels.append((text, kwargs.get("xytext")))
        return axes_annotate(axes, text, xy, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "text", recorded_text)
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate", recorded_annotate)
    path = tradeoff_plot(points, tmp_path / "tradeoff.png", "gain", "KL")
    assert path.read_bytes().startswith(b"\x89PNG")
    assert notes == ["not plotted (a value is n/a): gift, direct"]
    assert [text for text, _ in labels] == ["instruct", "shadow-ft", "dft"]
    heights = [offset[1] for _, offset in labels]
    assert len(set(heights)) == 3, heights  # each label at its own height above its point

    notes.clear()
    tradeoff_plot(shown, tmp_path / "all.png", "gain", "KL")
    assert notes == []  # every point measured: no note
