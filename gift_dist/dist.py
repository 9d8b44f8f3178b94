"""Distributed helpers, so stages never sprinkle ``if rank == 0``.

Works the same under the deepspeed launcher, torchrun, SLURM-started processes and a plain single process:
rank/world come from the environment the launcher sets; the process group is created on demand (NCCL on GPU,
gloo on CPU).
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as torch_dist

T = TypeVar("T")
log = logging.getLogger(__name__)

# Exit status of a job stopped by SIGTERM/SIGINT after saving its checkpoint (EX_TEMPFAIL: "try again"), so
# schedulers and scripts can tell a preempted run, to be resumed, from a finished or failed one.
PREEMPTED_EXIT_CODE = 75
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
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
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


def init(backend: Optional[str] = None, use_deepspeed: bool = False, timeout_minutes: float = 60.0) -> None:
    """Create the process group when launched with several processes; a no-op for a single process."""
    if is_initialized() or env_world_size() <= 1 and not use_deepspeed:
        return
    share_cpu_threads()
    backend = backend or default_backend()
    if torch.cuda.is_available():
        torch.cuda.set_device(env_local_rank())
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if use_deepspeed:
        import deepspeed

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
