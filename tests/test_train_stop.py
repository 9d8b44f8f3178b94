"""A stop request (SIGTERM) reaches the trainer while it waits for the scorer's confidence shards: it saves what
there is to save and exits 75 within seconds, instead of waiting up to train.confidence_wait_seconds; and a second
`gift-dist train` into a run folder another one is writing is refused (exit 2, one line)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gift_dist import dist
from gift_dist.config import dump_config
from gift_dist.contracts.checkpoint import LATEST_NAME, tag_for
from tests.test_train_dist import (  # noqa: F401  (fixtures)
    LAUNCH_TIMEOUT,
    REPO,
    run_config,
    setup,
    write_confidence,
)

# A DeepSpeed trainer in a subprocess (and torchrun): left out of the quick loop (-m "not slow").
pytestmark = pytest.mark.slow

WAITING = "waiting for confidence shard"


def start_trainer(cfg, log_file: Path, procs: int = 0, env_extra: dict | None = None) -> subprocess.Popen:
    """`gift-dist train` as one plain process (procs=0) or under torchrun, its output going to ``log_file``."""
    config_file = Path(cfg.output_dir) / "run.yaml"
    dump_config(cfg, config_file)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs else []
    cmd = [sys.executable, *launcher, "-m", "gift_dist.cli", "train", "--config", str(config_file)]
    with open(log_file, "w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_text(proc: subprocess.Popen, log_file: Path, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while log_file.read_text().count(text) < count:
        assert proc.poll() is None, log_file.read_text()[-6000:]
        assert time.monotonic() < deadline, log_file.read_text()[-6000:]
        time.sleep(0.2)


def test_sigterm_while_waiting_for_the_scorer_exits_75_within_seconds(setup, tmp_path):
    conf_dir = tmp_path / "confidence"
    write_confidence(setup, conf_dir, shards=[])  # a scorer that started, then stopped: no shard will come
    cfg = run_config(setup, tmp_path / "run", confidence=conf_dir, confidence_wait_seconds=3600,
                     confidence_poll_seconds=5)
    log_file = tmp_path / "train.log"
    proc = start_trainer(cfg, log_file)
    try:
        wait_for_text(proc, log_file, WAITING)
        time.sleep(1.0)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = log_file.read_text()
    assert code == dist.PREEMPTED_EXIT_CODE, output[-6000:]
    assert took < 10, f"{took:.1f}s from SIGTERM to exit"
    assert "while waiting for the scorer's confidence shards" in output
    assert "PREEMPTED at step 0/8; no step had run, nothing to save" in output
    assert not (cfg.paths.checkpoints / LATEST_NAME).exists()
    assert not (Path(cfg.output_dir) / dist.LOCKS_DIR / "train.lock").exists()


def test_two_ranks_waiting_for_the_scorer_save_the_steps_done_and_stop_together(setup, tmp_path):
    conf_dir = tmp_path / "confidence"
    write_confidence(setup, conf_dir, shards=[0])  # 8 samples = 2 steps of 2 ranks x 2; step 3 waits for shard 1
    cfg = run_config(setup, tmp_path / "run", confidence=conf_dir, confidence_wait_seconds=3600,
                     confidence_poll_seconds=5)
    log_file, marker = tmp_path / "train.log", tmp_path / "preempted"
    proc = start_trainer(cfg, log_file, procs=2, env_extra={dist.PREEMPT_MARKER_ENV: str(marker)})
    try:
        wait_for_text(proc, log_file, WAITING)
        time.sleep(1.0)
        signalled = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)  # like a preemption: every process of the job
        proc.wait(timeout=60)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = log_file.read_text()
    assert took < 20, f"{took:.1f}s from SIGTERM to exit"
    assert "PREEMPTED at step 2/8; checkpoint" in output, output[-6000:]
    assert (cfg.paths.checkpoints / LATEST_NAME).read_text().strip() == tag_for(2)
    assert marker.read_text().startswith("step 2 checkpoint")


def test_train_refuses_a_run_folder_another_trainer_writes_exit_2_one_line(setup, tmp_path, single_rank, capsys):
    from gift_dist.cli import main

    cfg = run_config(setup, tmp_path / "run", weighting="uniform", max_steps=1)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = Path(cfg.output_dir) / dist.LOCKS_DIR / "train.lock"
        lock.parent.mkdir(parents=True)
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid,
                                    "start_time": dist._process_start(sleeper.pid), "command": "gift-dist train"}))
        config_file = tmp_path / "run.yaml"
        dump_config(cfg, config_file)
        assert main(["train", "--config", str(config_file)]) == 2
    finally:
        sleeper.kill()
        sleeper.wait()
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("gift-dist train: error: another `gift-dist train` is writing")
    assert f"pid {sleeper.pid}" in error[0]
    assert not cfg.paths.logs.exists() or not any(cfg.paths.logs.iterdir())
