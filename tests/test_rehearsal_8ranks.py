"""The 70B training layout rehearsed on CPU: 2 loopback "nodes" x 4 ranks, ZeRO-3 with hpZ inside each node, started
through launch/torchrun_multinode.sh exactly as on a cluster (gloo instead of NCCL, a tiny pair instead of 70B).

- the 8-rank adapter equals 1 rank with gradient accumulation over the same global batch;
- a checkpoint taken at 8 ranks resumes at 4 and then at 2 ranks, and one taken at 2 ranks resumes at 8, with the
  losses of the unbroken run;
- SIGKILL of one rank ends every process of both nodes within KILL_DEADLINE seconds (not the 30-minute collective
  default), the last checkpoint stays intact, and the launcher's RESUME=1 continues from it to the unbroken losses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gift_dist.config import RunConfig, dump_config
from gift_dist.contracts.adapter import read_adapter
from gift_dist.contracts.checkpoint import LATEST_NAME, tag_for
from gift_dist.train.metrics import METRICS_NAME, read_metrics
from tests.test_train_dist import losses, run_config, setup, write_confidence  # noqa: F401 (setup: a fixture)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NODES, RANKS_PER_NODE = 2, 4
WORLD = NODES * RANKS_PER_NODE
GLOBAL_BATCH = 8  # samples per step: 8 ranks x 1, 4 x 2, 2 x 4, 1 x 8 (micro-batch x accumulation)
STEPS, SAVE_EVERY = 6, 2
TIMEOUT = 900
# A killed rank must end the whole job within this many seconds (issue target: under 2 minutes).
KILL_DEADLINE = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def rehearsal(setup, tmp_path_factory):  # noqa: F811 (the imported fixture)
    """The confidence every run reads, the hpZ DeepSpeed config, and private build caches for DeepSpeed's ops."""
    root = tmp_path_factory.mktemp("rehearsal")
    write_confidence(setup, root / "confidence")
    ds_config = json.loads((REPO / "ds_configs" / "zero3_multinode.json").read_text())
    ds_config["zero_optimization"]["zero_hpz_partition_size"] = RANKS_PER_NODE  # the secondary copy: one per node
    (root / "hpz.json").write_text(json.dumps(ds_config))
    (root / "extensions").mkdir()
    return root


def _config(setup, rehearsal: Path, out: Path, ranks: int) -> RunConfig:  # noqa: F811
    return run_config(setup, out, confidence=rehearsal / "confidence", max_steps=STEPS, save_every_steps=SAVE_EVERY,
                      keep_checkpoints=STEPS, sharding="zero3", ds_config=str(rehearsal / "hpz.json"),
                      micro_batch_size=1, gradient_accumulation_steps=GLOBAL_BATCH // ranks, weighting="gift")


def _env(rehearsal: Path, **extra: str) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "TORCH_EXTENSIONS_DIR": str(rehearsal / "extensions"),
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]), **extra}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    return env


def _start_nodes(cfg: RunConfig, rehearsal: Path, resume: bool = False) -> list[subprocess.Popen]:
    """launch/torchrun_multinode.sh once per loopback node, each in a process group of its own."""
    config_file = Path(cfg.output_dir) / f"run-{time.monotonic_ns()}.yaml"
    dump_config(cfg, config_file)
    port = str(_free_port())
    script = str(REPO / "launch" / "torchrun_multinode.sh")
    return [subprocess.Popen(["bash", script], env=_env(rehearsal, CONFIG=str(config_file), NNODES=str(NODES),
                                                        NODE_RANK=str(node), MASTER_ADDR="127.0.0.1",
                                                        MASTER_PORT=port, GPUS_PER_NODE=str(RANKS_PER_NODE),
                                                        RESUME="1" if resume else "0"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            for node in range(NODES)]


def _eight_ranks(cfg: RunConfig, rehearsal: Path, resume: bool = False) -> None:
    nodes = _start_nodes(cfg, rehearsal, resume)
    outputs = [node.communicate(timeout=TIMEOUT)[0] for node in nodes]
    for rank, (node, out) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank} failed:\n{out[-5000:]}"


def _one_node(cfg: RunConfig, rehearsal: Path, ranks: int, resume: bool = False) -> None:
    config_file = Path(cfg.output_dir) / f"run-{time.monotonic_ns()}.yaml"
    dump_config(cfg, config_file)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), "-m",
           "gift_dist.cli", "train", "--config", str(config_file), *(["--resume"] if resume else [])]
    proc = subprocess.run(cmd, env=_env(rehearsal), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]


def _losses_by_step(cfg: RunConfig) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(cfg.paths.logs / METRICS_NAME)}


def _resume_from(source: RunConfig, step: int, cfg: RunConfig) -> None:
    """A new run folder holding ``source``'s checkpoint of ``step`` as its latest, and its metrics up to there."""
    shutil.copytree(source.paths.checkpoints / tag_for(step), cfg.paths.checkpoints / tag_for(step))
    (cfg.paths.checkpoints / LATEST_NAME).write_text(tag_for(step) + "\n")
    cfg.paths.logs.mkdir(parents=True, exist_ok=True)
    shutil.copy(source.paths.logs / METRICS_NAME, cfg.paths.logs / METRICS_NAME)


@pytest.fixture(scope="module")
def unbroken(setup, rehearsal, tmp_path_factory):  # noqa: F811
    cfg = _config(setup, rehearsal, tmp_path_factory.mktemp("eight") / "run", WORLD)
    _eight_ranks(cfg, rehearsal)
    return cfg


def test_eight_ranks_on_two_nodes_equal_one_rank_with_accumulation(setup, rehearsal, unbroken, tmp_path):  # noqa: F811
    one = _config(setup, rehearsal, tmp_path / "one", 1)
    _one_node(one, rehearsal, 1)
    eight_adapter, one_adapter = read_adapter(unbroken.paths.adapter), read_adapter(one.paths.adapter)
    assert eight_adapter.provenance.world_size == WORLD and eight_adapter.provenance.complete
    assert eight_adapter.tensors.keys() == one_adapter.tensors.keys() and one_adapter.tensors
    for name, tensor in one_adapter.tensors.items():
        assert tensor.shape == eight_adapter.tensors[name].shape and tensor.numel() > 0, name  # no empty gathers
        # fp32: 8 ranks sum the gradients in another order than one rank's accumulation; after 6 AdamW steps at
        # lr 1e-2 (updates g / sqrt(v), which enlarges relative differences of tiny gradients) one element of
        # ~0.035 was measured 5.6e-6 apart, every other one under 1e-6.
        torch.testing.assert_close(eight_adapter.tensors[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
    assert any(t.abs().max() > 0 for n, t in one_adapter.tensors.items() if "lora_B" in n)  # it trained
    assert losses(unbroken) == pytest.approx(losses(one), rel=1e-5)


def test_a_checkpoint_of_eight_ranks_resumes_at_four_then_two_and_back(setup, rehearsal, unbroken, tmp_path):  # noqa: F811
    expected = _losses_by_step(unbroken)
    assert sorted(expected) == list(range(1, STEPS + 1))

    four = _config(setup, rehearsal, tmp_path / "four", 4)
    _resume_from(unbroken, 2, four)
    _one_node(four, rehearsal, 4, resume=True)
    two = _config(setup, rehearsal, tmp_path / "two", 2)
    _resume_from(four, 4, two)
    _one_node(two, rehearsal, 2, resume=True)
    assert _losses_by_step(four) == pytest.approx(expected, rel=1e-5)
    assert _losses_by_step(two) == pytest.approx(expected, rel=1e-5)
    assert read_adapter(two.paths.adapter).provenance.world_size == 2

    # The reverse: the checkpoint 2 ranks saved at step 2, carried on by 8 ranks on two nodes.
    two_first = _config(setup, rehearsal, tmp_path / "two_first", 2)
    _one_node(two_first, rehearsal, 2)
    assert _losses_by_step(two_first) == pytest.approx(expected, rel=1e-5)
    back = _config(setup, rehearsal, tmp_path / "back", WORLD)
    _resume_from(two_first, SAVE_EVERY, back)
    _eight_ranks(back, rehearsal, resume=True)
    assert _losses_by_step(back) == pytest.approx(expected, rel=1e-5)


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return int(fh.read().rsplit(b")", 1)[1].split()[1])


def _rank_pids(nodes: list[subprocess.Popen]) -> list[int]:
    """The training ranks below the launch scripts (the launcher runs torchrun in a session of its own, so the
    ranks are found by ancestry)."""
    roots, found = {node.pid for node in nodes}, []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().decode(errors="replace").split("\0")
            if "gift_dist.cli" not in argv or "--nproc_per_node" in argv:  # the ranks, not torchrun
                continue
            pid = ancestor = int(entry)
            while ancestor > 1 and ancestor not in roots:
                ancestor = _parent(ancestor)
        except (OSError, ValueError, IndexError):
            continue
        if ancestor in roots:
            found.append(pid)
    return sorted(found)


def test_a_killed_rank_ends_both_nodes_and_resume_continues(setup, rehearsal, unbroken, tmp_path):  # noqa: F811
    cfg = _config(setup, rehearsal, tmp_path / "killed", WORLD)
    nodes = _start_nodes(cfg, rehearsal)
    deadline = time.monotonic() + TIMEOUT
    while not (cfg.paths.checkpoints / LATEST_NAME).is_file():  # wait for the first checkpoint (step 2)
        assert all(node.poll() is None for node in nodes), "a node ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.2)
    ranks = _rank_pids(nodes)
    assert len(ranks) == WORLD, ranks
    killed_at = time.monotonic()
    os.kill(ranks[-1], signal.SIGKILL)  # a rank of the second node, mid-run
    for node in nodes:
        node.communicate(timeout=KILL_DEADLINE + 30)
    ended_after = time.monotonic() - killed_at
    assert ended_after < KILL_DEADLINE, f"the job took {ended_after:.0f}s to end after a rank was killed"
    assert all(node.returncode != 0 for node in nodes)
    assert not [pid for pid in ranks if os.path.exists(f"/proc/{pid}")], "ranks still running"
    latest = (cfg.paths.checkpoints / LATEST_NAME).read_text().strip()
    assert latest in {tag_for(step) for step in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)}

    _eight_ranks(cfg, rehearsal, resume=True)
    assert _losses_by_step(cfg) == pytest.approx(_losses_by_step(unbroken), rel=1e-5)
    assert read_adapter(cfg.paths.adapter).provenance.complete
