"""Several scoring workers (torchrun, independent jobs, a killed then restarted one) write one worker's bytes."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gift_dist.config import dump_config
from gift_dist.contracts import confidence as contract
from gift_dist.score.pool import LEASE_DIR

# Multi-process DeepSpeed / end-to-end runs: left out of the quick loop (-m "not slow").
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCORE_OVERRIDES = ["score.progress=false", "score.max_batch_tokens=1024"]


def _env() -> dict:
    # One thread everywhere: torchrun sets OMP_NUM_THREADS=1 too, and CPU matmuls are only bitwise
    # reproducible across processes at equal thread counts.
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def _run_dir(prepared_cfg, root: Path) -> Path:
    """A run folder holding a copy of the prepared dataset and its config file; returns the config file."""
    cfg = copy.deepcopy(prepared_cfg)
    cfg.output_dir = str(root)
    shutil.copytree(prepared_cfg.paths.prepared, cfg.paths.prepared)
    config_file = root / "run.yaml"
    dump_config(cfg, config_file)
    return config_file


def _score_cmd(config_file: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gift_dist", "score", "--config", str(config_file), *SCORE_OVERRIDES, *extra]


def _shard_bytes(conf_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(conf_dir.glob("shard-*.safetensors"))}


def _check(proc: subprocess.Popen, what: str) -> None:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{what} failed:\n{out[-4000:]}"


def _workers(conf_dir: Path) -> set[str]:
    return {record.worker for record in contract.read_manifest(conf_dir).shards.values()}


@pytest.fixture(scope="module")
def single_worker(prepared_llama, tmp_path_factory):
    config_file = _run_dir(prepared_llama, tmp_path_factory.mktemp("single"))
    proc = subprocess.run(_score_cmd(config_file), env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    conf_dir = config_file.parent / "confidence"
    shards = _shard_bytes(conf_dir)
    assert len(shards) == contract.read_manifest(conf_dir).num_shards > 1
    return shards


def test_two_independent_jobs_write_the_single_workers_bytes(prepared_llama, single_worker, tmp_path):
    config_file = _run_dir(prepared_llama, tmp_path)
    jobs = [subprocess.Popen(_score_cmd(config_file, "--throttle-seconds", "0.2"), env=_env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    for i, job in enumerate(jobs):
        _check(job, f"job {i}")
    conf_dir = config_file.parent / "confidence"
    assert _shard_bytes(conf_dir) == single_worker
    assert len(_workers(conf_dir)) == 2  # both jobs did part of the work
    assert not list((conf_dir / LEASE_DIR).iterdir())


def test_torchrun_workers_write_the_single_workers_bytes(prepared_llama, single_worker, tmp_path):
    config_file = _run_dir(prepared_llama, tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           *_score_cmd(config_file, "--throttle-seconds", "0.2")[2:]]
    _check(subprocess.Popen(cmd, env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT), "torchrun")
    conf_dir = config_file.parent / "confidence"
    assert _shard_bytes(conf_dir) == single_worker
    assert {w.rsplit(":", 1)[1] for w in _workers(conf_dir)} == {"0", "1"}


def test_worker_killed_mid_shard_then_restarted(prepared_llama, single_worker, tmp_path):
    config_file = _run_dir(prepared_llama, tmp_path)
    conf_dir = config_file.parent / "confidence"
    slow = subprocess.Popen(_score_cmd(config_file, "--throttle-seconds", "0.5"), env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lease = conf_dir / LEASE_DIR / "shard-00001.lease"
    deadline = time.monotonic() + 300
    while not (lease.exists() and time.time() - json.loads(lease.read_text() or "{}").get("claimed", 1e18) > 1.2):
        assert slow.poll() is None, slow.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "the worker never got into shard 1"
        time.sleep(0.1)
    os.killpg(slow.pid, signal.SIGKILL)
    slow.communicate()

    manifest = contract.read_manifest(conf_dir)
    assert sorted(manifest.shards) == [0]
    assert sorted(p.name for p in conf_dir.glob("shard-*")) == [contract.shard_filename(0)]
    assert lease.exists()  # the dead worker's lease is still there; the restart must retake it

    _check(subprocess.Popen(_score_cmd(config_file), env=_env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT), "restarted worker")
    assert _shard_bytes(conf_dir) == single_worker
    assert contract.read_manifest(conf_dir).complete
    assert not list((conf_dir / LEASE_DIR).iterdir())
