"""The benchmarks run and print what they promise (no timing assertions: ratios live in benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_throughput_benchmark_gives_every_row_finite_figures(tmp_path):
    """Tiny size, every row (plain loop, both layouts, the HF Trainer with both DeepSpeed configs), one step."""
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_train_throughput.py"), "--steps", "1", "--warmup", "1",
         "--micro-batch", "2", "--seq", "48", "--json", str(out), "--root", str(tmp_path / "work"),
         "--profile", str(tmp_path / "prof")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {row["row"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"plain", "replicate", "zero3", "hf_replicate", "hf_zero3"}
    for name, row in rows.items():
        for key in ("step_s", "tokens_per_s", "tflops", "mfu", "peak_gib"):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])
        assert row["tokens_per_step"] > 0
    assert "replicate / hf_replicate tokens/s" in proc.stdout and "zero3 / hf_zero3 tokens/s" in proc.stdout
    for name in rows:  # every row profiled, the HF Trainer's included (through its step callbacks)
        assert "host syncs" in (tmp_path / "prof" / f"profile-{name}.txt").read_text()


@pytest.mark.slow
def test_score_benchmark_compares_a_tensor_parallel_replica_with_one_process():
    """Tiny size: every layout row has a finite rate and the replica's log-probs equal one process's."""
    import re

    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_score.py"), "--tensor-parallel", "2", "--hidden", "256",
         "--layers", "1", "--vocab", "1001", "--samples", "4", "--max-len", "96", "--repeats", "1"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rates = re.findall(r"^(.+?)\s+(\d+)\s+([\d.]+)x$", proc.stdout, flags=re.M)
    assert [name.split(" (")[0].split(",")[0] for name, _, _ in rates] == [
        "one device", "device_map over 2 devices", "1 process", "tensor-parallel replica"]
    assert all(int(rate) > 0 for _, rate, _ in rates)
    difference = float(re.search(r"log-prob difference: ([\d.e+-]+)", proc.stdout).group(1))
    assert difference < 1e-5
    assert "target: replica >= 1.6x device_map over the same 2 devices" in proc.stdout
