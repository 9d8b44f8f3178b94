"""What the launcher that started this process says about it, read from its environment variables: its rank and
world size, and how many ranks share its node. Every launcher names them differently (torchrun, DeepSpeed's
launcher, Open MPI, MPICH / Intel MPI, SLURM), and they are needed before any process group exists (the logging
of the CLI, the thread share and the memory plan), so this module needs neither torch nor a process group and
the CLI can read it without importing either."""

from __future__ import annotations

import os
import re
from typing import Optional

# The rank and world size of this process, by launcher, in the order read: torchrun and DeepSpeed's launcher,
# Open MPI / mpirun, MPICH and Intel MPI, SLURM's srun. For logging, before any process group exists: a process
# started by mpirun or srun has no RANK until DeepSpeed sets it from these when it builds the group.
LAUNCHER_RANK_VARIABLES = (("RANK", "WORLD_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                           ("PMI_RANK", "PMI_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"))


def env_launcher_rank() -> Optional[tuple[int, int]]:
    """(rank, world size) of this process from the first launcher whose variables are set, or None for a process
    no launcher started."""
    for rank_key, size_key in LAUNCHER_RANK_VARIABLES:
        rank_value, size_value = os.environ.get(rank_key, "").strip(), os.environ.get(size_key, "").strip()
        if rank_value.isdigit() or size_value.isdigit():
            return (int(rank_value) if rank_value.isdigit() else 0,
                    int(size_value) if size_value.isdigit() else 1)
    return None


# Processes on this node, by launcher, in the order read: torchrun, DeepSpeed's launcher, Open MPI / mpirun, MPICH
# and Intel MPI, then SLURM: the step's layout, one count per node ("4(x2),3": 4 on each of the first two nodes, 3
# on the third), before --ntasks-per-node's plain number, which a step may inherit from its job.
SLURM_LAYOUT_VARIABLE = "SLURM_TASKS_PER_NODE"
LOCAL_SIZE_VARIABLES = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                        SLURM_LAYOUT_VARIABLE, "SLURM_NTASKS_PER_NODE")


def slurm_tasks_on_this_node(layout: str) -> Optional[int]:
    """This node's count in SLURM's per-node task layout ("4(x2),3"), the node being SLURM_NODEID; None when the
    layout does not parse, or names no count for this node (SLURM_NODEID unset and the nodes' counts differ)."""
    counts: list[int] = []
    for entry in layout.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", entry.strip())  # "4", or "4(x2)": 4 on each of 2 nodes
        if match is None:
            return None
        counts += [int(match[1])] * int(match[2] or 1)
    node = os.environ.get("SLURM_NODEID", "").strip()
    if node.isdigit() and int(node) < len(counts):
        return counts[int(node)]
    return counts[0] if len(set(counts)) == 1 else None


def env_local_world_size() -> Optional[int]:
    """How many ranks run on this node, from whichever launcher started us (None: not launched by one)."""
    for key in LOCAL_SIZE_VARIABLES:
        value = os.environ.get(key, "").strip()
        if key == SLURM_LAYOUT_VARIABLE:
            count = slurm_tasks_on_this_node(value) if value else None
        else:
            count = int(value) if value.isdigit() else None
        if count:
            return count
    return None
