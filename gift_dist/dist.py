"""Distributed helpers, so stages never sprinkle ``if rank == 0``.

Works the same under the deepspeed launcher, torchrun, SLURM-started processes and a plain single process:
rank/world come from the environment the launcher sets; the process group is created on demand (NCCL on GPU,
gloo on CPU).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as torch_dist

from gift_dist.errors import UserError
from gift_dist.launchers import env_local_world_size

T = TypeVar("T")
log = logging.getLogger(__name__)

# Exit status of a job stopped by SIGTERM/SIGINT after saving its checkpoint (EX_TEMPFAIL: "try again"), so
# schedulers and scripts can tell a preempted run, to be resumed, from a finished or failed one.
PREEMPTED_EXIT_CODE = 75
# How often a rank waiting on another process (a shard being scored, a lease held) says so in the log.
WAIT_LOG_SECONDS = 60.0
# Launchers (torchrun, deepspeed) exit 1 when signalled, whatever their workers did: a wrapper that sets this to a
# file path learns from that file that the workers saved and stopped, and can end with 75 itself.
PREEMPT_MARKER_ENV = "GIFT_PREEMPT_MARKER"


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_initialized() else env_rank()


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else env_world_size()


def is_rank0() -> bool:
    return rank() == 0


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def share_cpu_threads() -> Optional[int]:
    """One node's cores split between its ranks when the user set no OMP_NUM_THREADS: torchrun sets 1 per rank,
    DeepSpeed's launcher nothing, and every rank then starts one thread per core and they oversubscribe the
    machine (steps stall for seconds). Returns the threads set, or None when the user chose."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    local = env_local_world_size() or 1
    threads = max(1, (os.cpu_count() or 1) // max(local, 1))
    torch.set_num_threads(threads)
    log.info("rank %d: %d CPU thread(s) (%d cores / %d ranks on this node; set OMP_NUM_THREADS to choose)",
             env_rank(), threads, os.cpu_count() or 1, local)
    return threads


def _proc_stat(pid: int) -> Optional[tuple[int, int]]:
    """(parent pid, start time) of a live process from /proc, or None when it is gone (Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            # The command name, field 2, is in parentheses and may hold spaces: split after its closing one.
            fields = fh.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[19])


def _is_deepspeed_launcher(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().decode(errors="replace").split("\0")
    except OSError:
        return False
    return any("deepspeed.launcher" in arg or os.path.basename(arg) in ("deepspeed", "ds") for arg in argv[:3])


def deepspeed_launcher_ancestors() -> list[tuple[int, int]]:
    """(pid, start time) of the DeepSpeed launcher processes above this one: the per-node ``launch.py`` and, on
    the node that ran it, the ``deepspeed`` runner."""
    found, pid = [], os.getppid()
    while pid > 1:
        stat = _proc_stat(pid)
        if stat is None:
            break
        if _is_deepspeed_launcher(pid):
            found.append((pid, stat[1]))
        pid = stat[0]
    return found


def stop_when_launcher_exits(poll_seconds: float = 1.0) -> Optional[threading.Thread]:
    """Under DeepSpeed's launcher, SIGTERM this process when a launcher process above it exits.

    A SIGTERM sent to the ``deepspeed`` runner alone (what ``docker stop`` does to PID 1, or a user's ``kill``)
    ends the runner at once, without passing the signal on: its workers would train on, orphaned, and be killed
    without a checkpoint when the container goes. With this watch they stop like any signalled rank: checkpoint at
    the next step boundary, exit 75 (which the per-node ``launch.py`` then reports). torchrun handles the signal
    itself, so nothing is watched there."""
    watched = deepspeed_launcher_ancestors()
    if not watched:
        return None

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            for pid, started in watched:
                stat = _proc_stat(pid)
                if stat is None or stat[1] != started:
                    log.warning("rank %d: DeepSpeed's launcher (pid %d) exited: stopping at the next step boundary "
                                "with a checkpoint", env_rank(), pid)
                    os.kill(os.getpid(), signal.SIGTERM)
                    return

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()
    return thread


def private_extensions_dir() -> Path:
    """A build folder for torch C++ extensions (DeepSpeed's JIT-built ops) private to this Python environment: under
    the user's cache, keyed by the interpreter, the environment's prefix and the torch and DeepSpeed versions.
    torch's default (~/.cache/torch_extensions/py311_cpu) is one folder for every environment of that Python version,
    where each environment's build replaces the others' under one lock."""
    try:
        deepspeed_version = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        deepspeed_version = "none"
    identity = "\n".join([os.path.abspath(sys.executable), os.path.abspath(sys.prefix), torch.__version__,
                          deepspeed_version])
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    name = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-ds{deepspeed_version}-{digest}"
    return Path(cache) / "gift_dist" / "torch_extensions" / name


def use_private_extensions_dir() -> tuple[Path, bool]:
    """Point TORCH_EXTENSIONS_DIR at ``private_extensions_dir()`` unless the user set it (then it is left alone).
    Returns the folder in use and whether the user chose it. Called before DeepSpeed is imported for training."""
    chosen = os.environ.get("TORCH_EXTENSIONS_DIR")
    if chosen:
        return Path(chosen), True
    path = private_extensions_dir()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(path)
    return path, False


def _note_op_builds(extensions_dir: Path, user_chosen: bool) -> None:
    """Log the extensions folder in use, and one line before DeepSpeed JIT-builds its CPU shared-memory
    communication op there (no built library yet): the build takes minutes on a busy machine and prints nothing."""
    if env_local_rank() != 0:
        return
    log.info("DeepSpeed op build folder: %s (%s)", extensions_dir,
             "TORCH_EXTENSIONS_DIR as set" if user_chosen else "private to this environment; set TORCH_EXTENSIONS_DIR "
             "to choose another")
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is None or installed_ops.get(builder.NAME, False) or \
                not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            return
        built = extensions_dir / builder.NAME / f"{builder.NAME}.so"
    except Exception:  # best effort: a DeepSpeed without these internals just builds without the note
        return
    if not built.is_file():
        log.warning("building DeepSpeed's %s op in %s: once per environment, a few minutes (longer on a busy "
                    "machine)", builder.NAME, extensions_dir)


def init(backend: Optional[str] = None, use_deepspeed: bool = False, timeout_minutes: float = 60.0) -> None:
    """Create the process group when launched with several processes; a no-op for a single process. With
    ``use_deepspeed``, DeepSpeed's JIT-built ops go to a folder private to this environment (see
    ``use_private_extensions_dir``)."""
    if is_initialized() or env_world_size() <= 1 and not use_deepspeed:
        return
    share_cpu_threads()
    backend = backend or default_backend()
    if torch.cuda.is_available():
        torch.cuda.set_device(env_local_rank())
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if use_deepspeed:
        extensions_dir, user_chosen = use_private_extensions_dir()
        import deepspeed

        _note_op_builds(extensions_dir, user_chosen)
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    else:
        torch_dist.init_process_group(backend=backend, timeout=timeout)


def init_replica_group(name: str, rank_in_group: int, size: int, timeout_minutes: float = 60.0) -> None:
    """Make this process rank ``rank_in_group`` of a default process group of ``size`` ranks named ``name``,
    instead of one spanning the whole launch: several independent groups side by side under one launcher.

    The launcher's rendezvous store (torchrun's agent store, or the one global rank 0 hosts as ``env://`` would)
    is shared; each group's keys live under its own prefix."""
    if is_initialized():
        return
    share_cpu_threads()
    if torch.cuda.is_available():
        torch.cuda.set_device(env_local_rank())
    timeout = datetime.timedelta(minutes=timeout_minutes)
    hosted_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = torch_dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"]),
                                is_master=not hosted_by_agent and env_rank() == 0, timeout=timeout,
                                wait_for_workers=False)
    torch_dist.init_process_group(default_backend(), store=torch_dist.PrefixStore(name, store), rank=rank_in_group,
                                  world_size=size, timeout=timeout)


def shutdown() -> None:
    """Tear the process group down before the interpreter exits: left to exit-time destructors, gloo's threads
    can still be running and the process aborts ("terminate called without an active exception") after a
    successful run, which a launcher reports as a failure."""
    if is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()
        _forget_deepspeed_groups()


def _forget_deepspeed_groups() -> None:
    """DeepSpeed keeps the groups it made in module globals (its clone of the world group first of all): once the
    process group is destroyed they are dead, and a later engine in this process (a second `train` from Python, a
    notebook, the test suite) fails on them ("Group ... is not registered"). Forget them with the group."""
    import sys

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP",
                 "_TENSOR_MODEL_PARALLEL_GROUP"):
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        if isinstance(getattr(groups, name, None), dict):
            getattr(groups, name).clear()


def barrier() -> None:
    if is_initialized():
        torch_dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    if not is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op single process) and return it."""
    if is_initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: Optional[torch.device] = None) -> bool:
    """True on every rank when ``flag`` is true on any (one all-reduce; ``device``: where the backend reduces, the
    accelerator for NCCL). Single process: ``flag``."""
    if not is_initialized():
        return bool(flag)
    return all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0


def rank0_call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on rank 0 only and give every rank its result (or rank 0's exception, re-raised everywhere).

    Rank-0 I/O (writing a manifest, renaming a checkpoint) goes through here so that an error on rank 0 does
    not leave the other ranks hanging in the next collective.
    """
    result: Any = None
    error: Optional[str] = None
    if is_rank0():
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # re-raised on every rank below
            error = f"{type(exc).__name__}: {exc}"
            if not is_initialized():
                raise
    result, error = broadcast_object((result, error))
    if error is not None:
        raise RuntimeError(f"rank 0 failed: {error}")
    return result


# ---- one writer per run folder and stage ----

LOCKS_DIR = ".locks"
# A lock file that cannot be read (its writer died between creating and filling it) is stale after this long.
UNREADABLE_LOCK_GRACE_SECONDS = 30.0
# This process's locks: path -> [StageLock, depth] (a stage function called inside another that holds its lock).
_held: dict[str, list] = {}


def _boot_id() -> Optional[str]:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def _process_start(pid: int) -> Optional[int]:
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def _lock_record(stage: str, token: str) -> dict:
    return {"stage": stage, "host": socket.gethostname(), "pid": os.getpid(), "start_time": _process_start(os.getpid()),
            "boot_id": _boot_id(), "started_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]]), "token": token}


def _read_lock(path: str) -> tuple[Optional[bytes], Optional[dict]]:
    """The lock file's bytes (None when it is gone) and its record (None when it is not a readable one)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        return None, None
    try:
        record = json.loads(raw.decode("utf-8"))
        int(record["pid"]), str(record["host"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return raw, None
    return raw, record


def lock_is_stale(record: Optional[dict], age_seconds: float) -> Optional[str]:
    """Why a lock held by ``record`` is stale (its holder is certainly gone), or None while it may be alive. A
    holder on another host cannot be checked from here and counts as alive."""
    if record is None:
        return (f"unreadable and {age_seconds:.0f}s old" if age_seconds > UNREADABLE_LOCK_GRACE_SECONDS else None)
    if record["host"] != socket.gethostname():
        return None
    boot = _boot_id()
    if record.get("boot_id") and boot and record["boot_id"] != boot:
        return "its host has restarted since"
    pid = int(record["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"process {pid} is gone"
    except PermissionError:
        pass  # alive, another user's
    started = _process_start(pid)
    if record.get("start_time") is not None and started is not None and started != record["start_time"]:
        return f"process {pid} is gone (the pid now belongs to another process)"
    return None


class StageLock:
    """An advisory lock file ``<run folder>/.locks/<stage>.lock`` (JSON: host, pid, process start time, command
    line), created with O_EXCL, which works on shared filesystems too. Made by ``stage_lock``."""

    def __init__(self, path: str, token: str):
        self.path, self.token, self.pid = path, token, os.getpid()

    def release(self) -> None:
        """Remove the lock file, if it is still this one's."""
        _, record = _read_lock(self.path)
        if record is not None and record.get("token") == self.token:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def _take_over(path: str, raw: bytes, why: str, record: Optional[dict]) -> None:
    """Remove a stale lock file, unless it changed since it was judged stale; a guard file (O_EXCL) makes sure two
    processes taking it over at once cannot remove the lock one of them has just created."""
    guard = path + ".takeover"
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            if time.time() - os.stat(guard).st_mtime > UNREADABLE_LOCK_GRACE_SECONDS:
                os.unlink(guard)  # left by a process that died while taking over
        except FileNotFoundError:
            pass
        time.sleep(0.05)
        return
    os.close(fd)
    try:
        if _read_lock(path)[0] == raw:
            holder = (f"pid {record['pid']} on {record['host']}, {record.get('command', '?')!r}" if record
                      else "holder unknown")
            log.warning("taking over the stale lock %s (%s): %s", path, holder, why)
            os.unlink(path)
    finally:
        os.unlink(guard)


def _refusal(path: str, stage: str, folder: str, record: Optional[dict]) -> str:
    if record is None:
        return (f"another `gift-dist {stage}` is starting in {folder} (its lock {path} is being written); wait "
                f"for it to finish, or delete {path} if no such job runs")
    return (f"another `gift-dist {stage}` is writing into {folder}: pid {record['pid']} on host {record['host']} "
            f"since {record.get('started_at', '?')} ({record.get('command', '?')!r}); wait for it to finish or stop "
            f"it, or use another output_dir; if that process is gone (e.g. its machine crashed), delete {path}")


def acquire_stage_lock(folder, stage: str, wait_seconds: float = 0.0) -> StageLock:
    """Take the lock of ``stage`` in the run folder ``folder``: at once, or within ``wait_seconds``; a UserError
    naming the holder and how to proceed when another live process holds it (exit 2 from the CLI). A stale lock
    (holder gone on this host, its pid reused, or unreadable and old) is taken over with a log line. Re-entrant
    within one process."""
    folder = os.path.abspath(os.fspath(folder))
    path = os.path.join(folder, LOCKS_DIR, f"{stage}.lock")
    held = _held.get(path)
    if held is not None and held[0].pid == os.getpid():
        held[1] += 1
        return held[0]
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_seconds
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            else:
                try:
                    os.write(fd, (json.dumps(_lock_record(stage, token), indent=2) + "\n").encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
                lock = StageLock(path, token)
                _held[path] = [lock, 1]
                return lock
            raw, record = _read_lock(path)
            if raw is None:
                continue  # released meanwhile
            try:
                age = time.time() - os.stat(path).st_mtime
            except FileNotFoundError:
                continue
            why = lock_is_stale(record, age)
            if why is not None:
                _take_over(path, raw, why, record)
                continue
            if time.monotonic() >= deadline:
                raise UserError(_refusal(path, stage, folder, record))
            time.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))
    except OSError as exc:
        raise UserError(f"cannot create the lock file {path} ({exc}); choose another output_dir or fix its "
                        f"permissions") from None


def release_stage_lock(lock: StageLock) -> None:
    held = _held.get(lock.path)
    if held is not None and held[0] is lock:
        held[1] -= 1
        if held[1] > 0:
            return
        del _held[lock.path]
    lock.release()


class stage_lock:
    """``with stage_lock(output_dir, "merge"):`` holds the stage's lock for the block (released on any exit)."""

    def __init__(self, folder, stage: str, wait_seconds: float = 0.0):
        self.args = (folder, stage, wait_seconds)
        self.lock: Optional[StageLock] = None

    def __enter__(self) -> StageLock:
        self.lock = acquire_stage_lock(*self.args)
        return self.lock

    def __exit__(self, *exc) -> None:
        release_stage_lock(self.lock)


class rank0_stage_lock(stage_lock):
    """``stage_lock`` taken by rank 0 alone, for stages that run on many ranks: its refusal reaches every rank (one
    broadcast, so no rank waits in a collective for a rank 0 that has given up) and each raises it."""

    def __enter__(self) -> Optional[StageLock]:
        error = None
        if is_rank0():
            try:
                self.lock = acquire_stage_lock(*self.args)
            except Exception as exc:  # raised on every rank below
                if not is_initialized():
                    raise
                error = (isinstance(exc, UserError), str(exc))
        error = broadcast_object(error)
        if error is not None:
            raise (UserError if error[0] else RuntimeError)(error[1])
        return self.lock

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            release_stage_lock(self.lock)
