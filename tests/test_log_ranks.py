"""One rank's logs by default: ranks other than 0 log only warnings and errors unless --log-all-ranks (or
GIFT_LOG_ALL_RANKS=1); the node's rank count comes from whichever launcher started us, for the memory plan too."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gift_dist.cli import COMMANDS, build_parser, parse_command_line

# Configure logging as `gift-dist` does, then log one INFO and one WARNING line from a gift_dist logger.
SCRIPT = """
import logging, sys
from gift_dist.cli import build_parser, configure_logging, parse_command_line
args = parse_command_line(build_parser("config"), sys.argv[1:])
configure_logging(args.log_level, args.log_all_ranks)
logging.getLogger("gift_dist.train.recipe").info("an info line")
logging.getLogger("gift_dist.train.recipe").warning("a warning line")
"""


def run_as_rank(rank: int, argv: list[str], script: str = SCRIPT, **extra_env: str) -> str:
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "GIFT_LOG_ALL_RANKS")}
    env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", **extra_env)
    done = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_rank_1_logs_no_info_line_by_default_and_does_with_the_flag():
    quiet = run_as_rank(1, ["config"])
    assert " INFO " not in quiet and "an info line" not in quiet
    assert "WARNING" in quiet and "a warning line" in quiet

    for argv, env in ((["--log-all-ranks", "config"], {}), (["config", "--log-all-ranks"], {}),
                      (["config"], {"GIFT_LOG_ALL_RANKS": "1"})):
        loud = run_as_rank(1, argv, **env)
        assert "INFO [rank 1] gift_dist.train.recipe: an info line" in loud, (argv, env, loud)
        assert "a warning line" in loud

    rank0 = run_as_rank(0, ["config"])
    assert "INFO gift_dist.train.recipe: an info line" in rank0  # rank 0 unchanged: no rank label


# As above, then log through DeepSpeed's and transformers' loggers, which have handlers of their own. DeepSpeed's is
# set up as DeepSpeed does when imported (and again from its config), after gift-dist configured logging: its own
# level, handler and no propagation (importing DeepSpeed itself would take most of the test's time).
LIBRARY_SCRIPT = """
import logging, sys
from gift_dist.cli import build_parser, configure_logging, parse_command_line
args = parse_command_line(build_parser("config"), sys.argv[1:])
configure_logging(args.log_level, args.log_all_ranks)
deepspeed_logger = logging.getLogger("DeepSpeed")
deepspeed_logger.setLevel(logging.INFO)
deepspeed_logger.propagate = False
deepspeed_logger.addHandler(logging.StreamHandler(sys.stderr))
deepspeed_logger.info("a deepspeed info line")
deepspeed_logger.warning("a deepspeed warning line")
from transformers.utils import logging as transformers_logging
transformers_logging.get_logger("transformers.modeling_utils").info("a transformers info line")
transformers_logging.get_logger("transformers.modeling_utils").warning("a transformers warning line")
"""


def test_rank_1_hears_only_warnings_from_deepspeed_and_transformers_too():
    """TRANSFORMERS_VERBOSITY=info would have every rank print transformers' INFO lines, as DeepSpeed's logger
    does at level INFO: rank 1 prints only their warnings, unless --log-all-ranks."""
    quiet = run_as_rank(1, ["config"], script=LIBRARY_SCRIPT, TRANSFORMERS_VERBOSITY="info")
    assert "info line" not in quiet, quiet
    assert "a deepspeed warning line" in quiet and "a transformers warning line" in quiet

    loud = run_as_rank(1, ["--log-all-ranks", "config"], script=LIBRARY_SCRIPT, TRANSFORMERS_VERBOSITY="info")
    assert "a deepspeed info line" in loud and "a transformers info line" in loud, loud


@pytest.mark.parametrize("variables, expected", [
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4"}, (1, 4)),  # mpirun (Open MPI)
    ({"PMI_RANK": "1", "PMI_SIZE": "4"}, (1, 4)),                          # MPICH, Intel MPI
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4"}, (1, 4)),                  # srun
    # torchrun inside an srun task of node 1: torchrun's RANK is this process's, SLURM's that of the task
    ({"RANK": "0", "WORLD_SIZE": "8", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, (0, 8)),
    ({}, None),                                                             # no launcher
])
def test_the_rank_to_log_as_comes_from_whichever_launcher_started_us(monkeypatch, variables, expected):
    import logging

    from gift_dist import cli, launchers

    for pair in launchers.LAUNCHER_RANK_VARIABLES:
        for key in pair:
            monkeypatch.delenv(key, raising=False)
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("GIFT_LOG_ALL_RANKS", raising=False)
    quieted = []
    monkeypatch.setattr(cli, "quiet_library_loggers", lambda: quieted.append(True))
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)

    assert launchers.env_launcher_rank() == expected
    quiet = expected is not None and expected[0] != 0
    assert cli.configure_logging("INFO") == (logging.WARNING if quiet else logging.INFO)
    assert quieted == ([True] if quiet else [])


@pytest.mark.parametrize("argv, expected", [
    (["train"], False), (["--log-all-ranks", "train"], True), (["train", "--log-all-ranks"], True),
    (["score", "--log-all-ranks", "a.b=1"], True),
])
def test_the_flag_is_taken_before_or_after_the_command(argv, expected):
    command = next(word for word in argv if word in COMMANDS)
    assert parse_command_line(build_parser(command), argv).log_all_ranks is expected


@pytest.mark.parametrize("variable, value, expected", [
    ("LOCAL_WORLD_SIZE", "4", 4),           # torchrun
    ("LOCAL_SIZE", "4", 4),                 # DeepSpeed's launcher
    ("OMPI_COMM_WORLD_LOCAL_SIZE", "4", 4),  # Open MPI
    ("MPI_LOCALNRANKS", "4", 4),            # MPICH, Intel MPI
    ("SLURM_TASKS_PER_NODE", "4(x2)", 4),   # srun: 4 tasks on each of 2 nodes
    ("SLURM_NTASKS_PER_NODE", "4", 4),      # srun --ntasks-per-node=4
    (None, None, 8),                        # no launcher variable: every rank on this node
])
def test_the_memory_plan_reads_the_node_rank_count_of_any_launcher(monkeypatch, variable, value, expected):
    from gift_dist.launchers import LOCAL_SIZE_VARIABLES
    from gift_dist.train import engine

    for key in (*LOCAL_SIZE_VARIABLES, "SLURM_NODEID"):
        monkeypatch.delenv(key, raising=False)
    if variable:
        monkeypatch.setenv(variable, value)
    seen = {}

    def fake_plan(shape, local, nodes, *rest, **kwargs):
        seen.update(local=local, nodes=nodes)
        return {"replicate": {"gpu_gib": 1.0}}

    monkeypatch.setattr(engine, "training_plan", fake_plan)
    monkeypatch.setattr(engine, "micro_batch_token_bound", lambda cfg: 128)

    class Cfg:
        class train:
            ce_chunk_tokens = 0
            quantized_frozen_weights = False
            quantize_base = "none"

    assert engine.planned_gpu_gib(Cfg, 8, None, checkpointing=True) == {"replicate": 1.0}
    assert seen == {"local": expected, "nodes": 8 // expected}


@pytest.mark.parametrize("layout, node, expected", [
    ("4(x2),3", "0", 4), ("4(x2),3", "1", 4), ("4(x2),3", "2", 3),  # this node's entry, by SLURM_NODEID
    ("2,8", None, None),         # nodes that differ, and no SLURM_NODEID to tell which is ours
    ("8(x3)", None, 8),          # every node alike: SLURM_NODEID not needed
    ("4(x2", "0", None),         # not SLURM's format
])
def test_the_slurm_layout_is_read_for_this_node(monkeypatch, layout, node, expected):
    from gift_dist import launchers

    for key in (*launchers.LOCAL_SIZE_VARIABLES, "SLURM_NODEID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", layout)
    if node is not None:
        monkeypatch.setenv("SLURM_NODEID", node)
    assert launchers.env_local_world_size() == expected


def test_the_slurm_layout_comes_before_ntasks_per_node(monkeypatch):
    """When they disagree, SLURM_TASKS_PER_NODE is what SLURM started; SLURM_NTASKS_PER_NODE what was asked for,
    which a step may inherit from its job."""
    from gift_dist import launchers

    for key in (*launchers.LOCAL_SIZE_VARIABLES, "SLURM_NODEID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "1(x2)")
    assert launchers.env_local_world_size() == 1
