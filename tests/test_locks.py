"""One writer per run folder and stage (``dist.stage_lock``): a live holder refuses a second writer with one line
naming it (exit 2 from the CLI), a stale lock is taken over, the lock goes when its holder's block ends."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gift_dist import dist
from gift_dist.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def lock_path(folder: Path, stage: str) -> Path:
    return folder / dist.LOCKS_DIR / f"{stage}.lock"


def write_lock(folder: Path, lock_stage: str, **record) -> Path:
    path = lock_path(folder, lock_stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


@pytest.fixture
def sleeper():
    """A live process of this host that holds no lock itself."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def held_by(proc: subprocess.Popen, folder: Path, stage: str) -> Path:
    return write_lock(folder, stage, stage=stage, host=socket.gethostname(), pid=proc.pid,
                      start_time=dist._process_start(proc.pid), boot_id=dist._boot_id(),
                      started_at="2026-01-01T00:00:00+00:00", command="gift-dist train --config run.yaml")


def test_a_live_holder_refuses_a_second_writer_naming_it(tmp_path, sleeper):
    path = held_by(sleeper, tmp_path, "train")
    with pytest.raises(UserError) as refused:
        dist.acquire_stage_lock(tmp_path, "train")
    message = str(refused.value)
    assert "\n" not in message
    assert f"pid {sleeper.pid} on host {socket.gethostname()}" in message
    assert "gift-dist train --config run.yaml" in message and f"delete {path}" in message
    assert json.loads(path.read_text())["pid"] == sleeper.pid  # left alone
    # Another stage of the same folder, or the same stage of another folder, is not held.
    with dist.stage_lock(tmp_path, "merge"), dist.stage_lock(tmp_path / "other", "train"):
        pass


def test_a_holder_on_another_host_is_never_taken_over(tmp_path):
    write_lock(tmp_path, "eval", host="some-other-node", pid=1, start_time=1)
    with pytest.raises(UserError, match="pid 1 on host some-other-node"):
        dist.acquire_stage_lock(tmp_path, "eval")


def test_the_lock_records_its_holder_and_goes_at_the_end_of_the_block_even_on_an_exception(tmp_path):
    path = lock_path(tmp_path, "prepare")
    with pytest.raises(RuntimeError, match="boom"):
        with dist.stage_lock(tmp_path, "prepare"):
            record = json.loads(path.read_text())
            assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
            assert record["start_time"] == dist._process_start(os.getpid()) and record["command"]
            with dist.stage_lock(tmp_path, "prepare"):  # re-entrant within one process
                pass
            assert path.is_file()
            raise RuntimeError("boom")
    assert not path.exists()


def assert_taken_over(folder, path, dead_pid: int, caplog) -> None:
    """The lock of a killed holder is taken over by this process, said in the log, and released after."""
    with caplog.at_level(logging.WARNING, logger="gift_dist.dist"):
        with dist.stage_lock(folder, "train"):
            assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"taking over the stale lock {path} (pid {dead_pid}" in caplog.text
    assert f"process {dead_pid} is gone" in caplog.text
    assert not path.exists()


def test_a_stale_lock_after_sigkill_of_its_holder_is_taken_over(tmp_path, caplog):
    # The holder's record as acquire_stage_lock writes it (its fields: the test above); the holder is a bare
    # interpreter (no torch import), so this stays quick. A holder that took the lock itself: the slow test below.
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        path = held_by(holder, tmp_path, "train")
        with pytest.raises(UserError):  # alive: refused
            dist.acquire_stage_lock(tmp_path, "train")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert_taken_over(tmp_path, path, holder.pid, caplog)


@pytest.mark.slow
def test_a_lock_another_process_took_is_taken_over_after_its_sigkill(tmp_path, caplog):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom gift_dist import dist\n"
                               f"dist.acquire_stage_lock({str(tmp_path)!r}, 'train')\nprint('held', flush=True)\n"
                               "time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert holder.stdout.readline().strip() == "held"
    path = lock_path(tmp_path, "train")
    assert json.loads(path.read_text())["pid"] == holder.pid
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert_taken_over(tmp_path, path, holder.pid, caplog)


def test_a_reused_pid_and_an_old_unreadable_lock_are_stale_a_fresh_unreadable_one_is_not(tmp_path):
    # Our own pid, but another start time: the process that wrote it is gone and the pid was reused.
    write_lock(tmp_path, "merge", host=socket.gethostname(), pid=os.getpid(),
               start_time=dist._process_start(os.getpid()) - 1)
    with dist.stage_lock(tmp_path, "merge"):
        pass
    path = write_lock(tmp_path, "merge")
    path.write_text("")  # created, never filled: its writer may still be writing it
    with pytest.raises(UserError, match="is being written"):
        dist.acquire_stage_lock(tmp_path, "merge")
    old = time.time() - dist.UNREADABLE_LOCK_GRACE_SECONDS - 5
    os.utime(path, (old, old))
    with dist.stage_lock(tmp_path, "merge"):
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_a_waiting_writer_gets_the_lock_once_it_is_released(tmp_path, sleeper):
    path = held_by(sleeper, tmp_path, "score")
    started = time.monotonic()
    with pytest.raises(UserError):
        dist.acquire_stage_lock(tmp_path, "score", wait_seconds=0.5)
    assert time.monotonic() - started >= 0.5
    path.unlink()
    with dist.stage_lock(tmp_path, "score", wait_seconds=5):
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_gift_dist_prepare_refuses_while_another_holds_the_folder_exit_2_one_line(tmp_path, sleeper, capsys):
    """In-process (``cli.main``), with the root logger as a fresh process has it (no handlers), so the INFO logging
    the command sets up goes to the captured stderr: a line logged before the refusal would show. The same
    command in a subprocess of its own: the slow test below."""
    from gift_dist.cli import main

    run = tmp_path / "run"
    held_by(sleeper, run, "prepare")
    config = tmp_path / "run.yaml"
    config.write_text(f"instruct_model: {tmp_path / 'instruct'}\noutput_dir: {run}\n")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers = []
    try:
        code = main(["prepare", "--config", str(config)])
    finally:
        root.handlers, root.level = handlers, level
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gift-dist prepare: error: another `gift-dist prepare` is writing into")
    assert f"pid {sleeper.pid}" in lines[0]
    assert not (run / "prepared").exists()


@pytest.mark.slow
def test_gift_dist_prepare_in_a_process_of_its_own_refuses_exit_2_one_line(tmp_path, sleeper):
    run = tmp_path / "run"
    held_by(sleeper, run, "prepare")
    config = tmp_path / "run.yaml"
    config.write_text(f"instruct_model: {tmp_path / 'instruct'}\noutput_dir: {run}\n")
    result = subprocess.run([sys.executable, "-m", "gift_dist.cli", "prepare", "--config", str(config)],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gift-dist prepare: error: another `gift-dist prepare` is writing into")
    assert f"pid {sleeper.pid}" in lines[0]
    assert not (run / "prepared").exists()
