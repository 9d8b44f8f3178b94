"""`gift-dist compare`: every method's row from one config, and a killed comparison that resumes."""

from __future__ import annotations

import json
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
from tests.conftest import make_run_config

pytestmark = pytest.mark.slow

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
