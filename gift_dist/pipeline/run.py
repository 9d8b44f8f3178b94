"""`gift-dist run`: prepare -> score -> train -> merge on one machine, resumable stage by stage.

Each stage is skipped when its output is already complete and valid for this config, so killing a run in any
stage and starting it again finishes the job without redoing finished work: the scorer skips finished shards,
the trainer resumes from its latest checkpoint, the merge rewrites only an unfinished output. Scoring and
training overlap: the scorer workers and the trainer (torchrun over the local GPUs, or CPU ranks with gloo) are
started together and the trainer streams the shards as they are written.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from gift_dist import dist
from gift_dist.config import (
    ConfigError,
    MergeConfig,
    RunConfig,
    TrainConfig,
    add_config_arguments,
    config_from_args,
    dump_config,
    require,
    result_settings,
)
from gift_dist.contracts import ContractError, changed_settings
from gift_dist.contracts import adapter as adapter_contract
from gift_dist.contracts import confidence as confidence_contract
from gift_dist.contracts import prepared as prepared_contract

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass
class Launch:
    """How the local machine is split between scorer workers and trainer ranks."""

    train_procs: int
    score_workers: int
    train_devices: Optional[str] = None
    score_devices: Optional[str] = None


def default_launch() -> Launch:
    gpus = torch.cuda.device_count()
    if gpus >= 2:
        # One GPU scores while the rest train; the scorer usually finishes well ahead of the trainer.
        return Launch(gpus - 1, 1, ",".join(str(i) for i in range(1, gpus)), "0")
    if gpus == 1:
        return Launch(1, 1, "0", "0")
    return Launch(2, 1)


def prepared_is_current(cfg: RunConfig) -> bool:
    from gift_dist.prepare.stage import expected_fingerprint

    try:
        manifest = prepared_contract.read_manifest(cfg.paths.prepared)
    except ContractError:
        return False
    return manifest.fingerprint == expected_fingerprint(cfg)


def confidence_is_complete(cfg: RunConfig, fingerprint: str) -> bool:
    manifest = confidence_contract.read_manifest(cfg.paths.confidence)
    return manifest is not None and manifest.prepared_fingerprint == fingerprint and manifest.complete


def adapter_is_complete(cfg: RunConfig, fingerprint: str) -> bool:
    """True when adapter/ was trained to the end on this prepared data with these settings; an adapter made
    with other settings is refused rather than silently kept or silently resumed from old checkpoints."""
    try:
        adapter = adapter_contract.read_adapter(cfg.paths.adapter)
    except ContractError:
        return False
    provenance = adapter.provenance
    if provenance is None:
        raise ConfigError(f"{cfg.paths.adapter} has no {adapter_contract.PROVENANCE_NAME}: it was not trained by "
                          f"this run; use a fresh output_dir, or delete it to retrain")
    same_data = provenance.prepared_fingerprint == fingerprint
    same_settings = result_settings(TrainConfig, provenance.train_config) == result_settings(TrainConfig, cfg.train)
    if not (same_data and same_settings):
        raise ConfigError(
            f"{cfg.paths.adapter} was trained on other data or with other train settings than this config; "
            f"use a fresh output_dir, or delete {cfg.paths.adapter} and {cfg.paths.checkpoints} to retrain"
        )
    return provenance.complete


def merged_is_complete(cfg: RunConfig) -> bool:
    """True when merged/ holds this adapter merged with these settings; another merge there is refused, naming
    what differs. Compared: everything gift_merge.json records that shapes the merged weights (the adapter's
    weights and LoRA scaling, the target model, the base model, and every merge setting MergeConfig does not mark
    operational: merge.into, merge.scale, merge.dtype). Operational ones are not: merge.max_shard_size only splits
    the same weights into other files, threads or verification change nothing written."""
    from gift_dist.contracts import merged as merged_contract
    from gift_dist.contracts.model_folder import model_identity
    from gift_dist.merge.stage import RECORD_FIELDS, merge_paths

    try:
        record = merged_contract.read_merged(cfg.paths.merged).record
    except ContractError:
        return False
    _, target, _, base = merge_paths(cfg, None, None, None, None)
    adapter = adapter_contract.read_adapter(cfg.paths.adapter)
    settings = result_settings(MergeConfig, cfg.merge)
    now = {
        "adapter": adapter_contract.adapter_hash(cfg.paths.adapter),
        "LoRA scaling": adapter.scale,
        **{f"merge.{key}": value for key, value in settings.items()},
        "target model": model_identity(str(target))["hash"],
        "base model": model_identity(str(base))["hash"] if base is not None else None,
    }
    then = {
        "adapter": record.adapter.get("hash"),
        "LoRA scaling": record.lora_scaling,
        **{f"merge.{key}": getattr(record, RECORD_FIELDS[key]) for key in settings},
        "target model": record.target.get("hash"),
        "base model": record.base.get("hash") if record.base else None,
    }
    changed = changed_settings(then, now)
    if not changed or cfg.merge.overwrite:
        return not changed
    differences = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
    raise ConfigError(
        f"{cfg.paths.merged} holds another merge (recorded there -> this config: {differences}); delete it or set "
        f"merge.overwrite=true to merge again"
    )


def _env(devices: Optional[str]) -> dict[str, str]:
    env = dict(os.environ)
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def _die_with_parent() -> None:
    """Child set-up: a new session (one signal reaches torchrun and its ranks) that is sent SIGTERM when `run`
    itself dies, even by SIGKILL, so a killed run never leaves a scorer or trainer behind (Linux prctl)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _start(cmd: list[str], log_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen, object]:
    log.info("starting %s (log: %s)", " ".join(cmd), log_path)
    handle = open(log_path, "ab")
    return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent), handle


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# An exception line as Python prints it ("ValueError: ...") or a gift-dist command's own error line, with torchrun's
# "[rankN]: " prefix or without.
_EXCEPTION_LINE = re.compile(
    r"^(?:\[rank\d+\]:\s*)?(?:(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Interrupt)\b|gift-dist [\w-]+: error:).*$"
)


def root_cause(path: Path, offset: int = 0) -> Optional[str]:
    """The first exception a failed job's log reports from ``offset`` on (logs are appended across reruns; rank
    prefix kept), not the launcher's ChildFailedError that closes it: the line a user needs to see."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        match = _EXCEPTION_LINE.match(line.strip())
        if match and "ChildFailedError" not in line:
            return line.strip()
    return None


class Preempted(RuntimeError):
    """The run was stopped by a signal after the trainer saved a checkpoint: rerun to resume."""


class StageFailed(RuntimeError):
    """A stage's process failed; the message leads with its root cause and names its log."""

    def __init__(self, name: str, code: int, log_path: Path, log_offset: int = 0):
        self.name, self.code, self.log_path = name, code, log_path
        cause = root_cause(log_path, log_offset) or "no exception in the log"
        super().__init__(f"{name} failed with exit code {code}: {cause}\nfull log: {log_path}; its last lines:\n"
                         f"{_tail(log_path)}")


def score_and_train(cfg: RunConfig, config_file: Path, launch: Launch, needs_scoring: bool,
                    needs_training: bool) -> None:
    """Start the scorer workers and the trainer together and wait for both; stop everything if one fails."""
    logs = cfg.paths.logs
    cli = [sys.executable, "-m", "gift_dist.cli"]
    jobs: list[tuple[str, subprocess.Popen, Path]] = []
    handles = []
    # Logs are appended to across reruns: a failure is explained from this run's part only.
    offsets: dict[Path, int] = {}
    preempt_marker = logs / ".trainer_preempted"
    signalled = []
    if needs_scoring:
        for worker in range(launch.score_workers):
            env = _env(launch.score_devices)
            env.update({"RANK": str(worker), "WORLD_SIZE": str(launch.score_workers), "LOCAL_RANK": str(worker)})
            path = logs / f"score-{worker}.log"
            offsets[path] = _size(path)
            proc, handle = _start([*cli, "score", "--config", str(config_file)], path, env)
            jobs.append((f"scorer {worker}", proc, path))
            handles.append(handle)
    if needs_training:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(launch.train_procs), "-m", "gift_dist.cli", "train", "--config", str(config_file),
               "--resume-if-exists"]
        path = logs / "train.log"
        offsets[path] = _size(path)
        env = _env(launch.train_devices)
        preempt_marker.unlink(missing_ok=True)
        env[dist.PREEMPT_MARKER_ENV] = str(preempt_marker)
        proc, handle = _start(cmd, path, env)
        jobs.append(("trainer", proc, path))
        handles.append(handle)

    def stop_all(signum, _frame):
        # Forward the stop and keep waiting: the trainer saves a checkpoint at its next step boundary.
        signalled.append(signum)
        log.warning("signal %d: stopping the scorer and the trainer (they save and resume on rerun)", signum)
        for _, proc, _ in jobs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, stop_all) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        pending = list(jobs)
        while pending:
            for job in list(pending):
                name, proc, path = job
                code = proc.poll()
                if code is None:
                    continue
                pending.remove(job)
                if code != 0 and (signalled or preempt_marker.is_file()):
                    continue  # stopped on purpose; reported below once every job has ended
                if code != 0:
                    for _, other, _ in pending:
                        os.killpg(other.pid, signal.SIGTERM)
                    for _, other, _ in pending:
                        other.wait()
                    raise StageFailed(name, code, path, offsets.get(path, 0))
                log.info("%s finished", name)
            time.sleep(0.5)
        if signalled or preempt_marker.is_file():
            saved = preempt_marker.read_text().strip() if preempt_marker.is_file() else "no checkpoint was needed"
            raise Preempted(f"stopped by a signal; trainer: {saved}; rerun the same command to resume")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for handle in handles:
            handle.close()


def run_pipeline(cfg: RunConfig, launch: Optional[Launch] = None) -> RunResult:
    from gift_dist.merge.stage import merge
    from gift_dist.prepare.stage import prepare
    from gift_dist.train.weighting import needs_confidence

    require(cfg, "base_model", "instruct_model")
    launch = launch or default_launch()
    result = RunResult()
    cfg.paths.logs.mkdir(parents=True, exist_ok=True)
    config_file = cfg.paths.logs / "run_config.yaml"
    dump_config(cfg, config_file)

    if prepared_is_current(cfg):
        result.skipped.append("prepare")
    else:
        prepare(cfg)
        result.ran.append("prepare")
    fingerprint = prepared_contract.read_manifest(cfg.paths.prepared).fingerprint

    needs_scoring = needs_confidence(cfg.train) and not confidence_is_complete(cfg, fingerprint)
    needs_training = not adapter_is_complete(cfg, fingerprint)
    (result.ran if needs_scoring else result.skipped).append("score")
    (result.ran if needs_training else result.skipped).append("train")
    if needs_scoring or needs_training:
        score_and_train(cfg, config_file, launch, needs_scoring, needs_training)

    if merged_is_complete(cfg):
        result.skipped.append("merge")
    else:
        merge(cfg)
        result.ran.append("merge")
    log.info("run: ran %s, skipped %s (already complete)", result.ran or "nothing", result.skipped or "nothing")
    return result


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = default_launch()
    parser.add_argument("--train-procs", type=int, default=defaults.train_procs,
                        help=f"trainer ranks on this machine (default {defaults.train_procs})")
    parser.add_argument("--score-workers", type=int, default=defaults.score_workers,
                        help=f"scoring worker processes (default {defaults.score_workers})")
    parser.add_argument("--train-devices", default=defaults.train_devices,
                        help="CUDA_VISIBLE_DEVICES for the trainer, e.g. 1,2,3")
    parser.add_argument("--score-devices", default=defaults.score_devices,
                        help="CUDA_VISIBLE_DEVICES for the scorers, e.g. 0")


def launch_from_args(args: argparse.Namespace) -> Launch:
    return Launch(args.train_procs, args.score_workers, args.train_devices, args.score_devices)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    add_launch_arguments(parser)


def exit_status(command: str, work: Callable[[], None]) -> int:
    """Run ``work``; a failed stage or a preemption becomes one line on stderr and its exit code (1, or 75 for a
    run stopped by a signal after saving), for `gift-dist run`, `demo` and `compare` alike."""
    try:
        work()
    except StageFailed as failure:
        print(f"gift-dist {command}: {failure}", file=sys.stderr)
        return 1
    except Preempted as stopped:
        print(f"gift-dist {command}: PREEMPTED: {stopped}", file=sys.stderr)
        return dist.PREEMPTED_EXIT_CODE
    return 0


def run(args: argparse.Namespace) -> int:
    def work() -> None:
        result = run_pipeline(config_from_args(args), launch_from_args(args))
        print(f"done: ran {', '.join(result.ran) or 'nothing'}; skipped {', '.join(result.skipped) or 'nothing'}")

    return exit_status("run", work)
