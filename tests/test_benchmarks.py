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
