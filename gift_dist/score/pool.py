"""Shard leases: how any number of scoring workers, on any nodes, share one confidence directory.

A worker claims a shard by creating ``leases/shard-NNNNN.lease`` with O_EXCL (atomic on local filesystems and
NFSv3+/Lustre/GPFS, unlike fcntl locks on some NFS setups) and refreshes its mtime after every batch. A lease
whose mtime is older than ``lease_seconds`` — or whose owner is a dead process on this host — is retaken by the
next worker. Workers always claim the lowest unfinished, unleased shard, so shards finish roughly in plan order,
which is the order the trainer consumes them in.

The worst a race can do here is make two workers score the same shard: both write identical bytes and the
shard rename and manifest update are atomic, so the output is the same either way.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from gift_dist import dist

LEASE_DIR = "leases"


log = logging.getLogger(__name__)

# An empty or unreadable lease older than this is stale (its writer died between creating and writing it).
UNREADABLE_LEASE_GRACE_SECONDS = 10.0


def worker_id() -> str:
    """``hostname:pid:rank``; the rank only identifies the worker, no process group is needed."""
    return f"{socket.gethostname()}:{os.getpid()}:{dist.env_rank()}"


def lease_path(conf_dir: Path, shard_index: int) -> Path:
    return Path(conf_dir) / LEASE_DIR / f"shard-{shard_index:05d}.lease"


class LeaseLost(RuntimeError):
    """Another worker retook this shard (our lease expired); this worker abandons it."""


def _read_owner(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _owner_is_dead(owner: Optional[dict]) -> bool:
    """A lease held by a process of this host that no longer exists (e.g. killed with SIGKILL)."""
    if not owner or owner.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, TypeError):
        return False
    return False


@dataclass
class ShardLease:
    shard_index: int
    path: Path
    worker: str

    def refresh(self) -> None:
        """Prove we are alive; raise LeaseLost when another worker has retaken the shard."""
        owner = _read_owner(self.path)
        if owner is None or owner.get("worker") != self.worker:
            raise LeaseLost(f"shard {self.shard_index}: lease {self.path} was taken over by {owner}")
        os.utime(self.path)

    def release(self) -> None:
        owner = _read_owner(self.path)
        if owner is not None and owner.get("worker") == self.worker:
            self.path.unlink(missing_ok=True)


class ShardPool:
    """Claims shards of one confidence directory for one worker."""

    def __init__(self, conf_dir: str | Path, num_shards: int, lease_seconds: float, worker: Optional[str] = None):
        self.conf_dir = Path(conf_dir)
        self.num_shards = num_shards
        self.lease_seconds = lease_seconds
        self.worker = worker or worker_id()
        (self.conf_dir / LEASE_DIR).mkdir(parents=True, exist_ok=True)

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete half-written shards a killed writer left behind (hidden ``.shard-*.tmp`` files).

        A live writer's temporary is younger than a lease (it refreshes its lease after every batch and writes
        the shard right after the last one), so only files older than ``lease_seconds`` are removed.
        """
        removed = []
        for path in self.conf_dir.glob(".shard-*.tmp"):
            try:
                if time.time() - path.stat().st_mtime > self.lease_seconds:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:
                continue
        return removed

    def _is_stale(self, path: Path) -> bool:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        owner = _read_owner(path)
        if owner is None and age > UNREADABLE_LEASE_GRACE_SECONDS:
            # Created but never written (a kill between the two) or damaged: no owner will ever refresh it, so it
            # need not block the shard for lease_seconds. The grace covers a writer between create and write.
            log.warning("lease %s has no readable owner after %.0f s: taking it over", path, age)
            return True
        return age > self.lease_seconds or _owner_is_dead(owner)

    def _try_create(self, shard_index: int) -> Optional[ShardLease]:
        path = lease_path(self.conf_dir, shard_index)
        owner = {"worker": self.worker, "host": socket.gethostname(), "pid": os.getpid(), "claimed": time.time()}
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(owner, fh)
        return ShardLease(shard_index, path, self.worker)

    def holders(self, finished: Iterable[int]) -> dict[int, str]:
        """Who holds each unfinished shard's lease (worker name, or "unknown" while its owner is unreadable)."""
        done = set(finished)
        held = {}
        for index in range(self.num_shards):
            path = lease_path(self.conf_dir, index)
            if index not in done and path.exists():
                owner = _read_owner(path)
                held[index] = owner.get("worker", "unknown") if owner else "unknown"
        return held

    def claim(self, finished: Iterable[int]) -> Optional[ShardLease]:
        """The lease of the lowest unfinished shard nobody live holds, or None when all are taken."""
        done = set(finished)
        for index in range(self.num_shards):
            if index in done:
                continue
            lease = self._try_create(index)
            if lease is not None:
                return lease
            path = lease_path(self.conf_dir, index)
            if self._is_stale(path):
                # Move the dead lease aside under a unique name so only one retaker removes it.
                aside = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.stale")
                try:
                    os.rename(path, aside)
                    aside.unlink(missing_ok=True)
                except FileNotFoundError:
                    pass
                lease = self._try_create(index)
                if lease is not None:
                    return lease
        return None
