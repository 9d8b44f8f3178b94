"""Two "nodes" on loopback train together and produce the same adapter as one node with two ranks.

Each node is its own torchrun (``--nnodes 2 --node_rank N``) rendezvousing over 127.0.0.1, exactly how the
launchers in launch/ start a multi-node job; DeepSpeed ZeRO-3 runs on CPU with gloo.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from gift_dist.config import dump_config
from gift_dist.contracts.adapter import WEIGHTS_NAME, read_adapter

# Multi-process DeepSpeed / end-to-end runs: left out of the quick loop (-m "not slow").
pytestmark = pytest.mark.slow

TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    return env


def _train_cmd(config, nnodes: int, node_rank: int, nproc: int, port: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node_rank", str(node_rank),
        "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port),
        "-m", "gift_dist.cli", "train", "--config", str(config),
    ]


def _config(prepared_llama, tmp_path, name):
    cfg = copy.deepcopy(prepared_llama)
    cfg.output_dir = str(tmp_path / name)
    (tmp_path / name).mkdir()
    os.symlink(prepared_llama.paths.prepared, cfg.paths.prepared)
    for key, value in {"weighting": "uniform", "micro_batch_size": 4, "max_steps": 3, "save_every_steps": 100,
                       "learning_rate": 1e-2, "progress": False}.items():
        setattr(cfg.train, key, value)
    path = tmp_path / f"{name}.yaml"
    dump_config(cfg, path)
    return cfg, path


def test_two_nodes_equal_one_node_two_ranks(prepared_llama, tmp_path):
    one_cfg, one_path = _config(prepared_llama, tmp_path, "one_node")
    subprocess.run(_train_cmd(one_path, 1, 0, 2, _free_port()), env=_env(), check=True, timeout=TIMEOUT,
                   capture_output=True)

    two_cfg, two_path = _config(prepared_llama, tmp_path, "two_nodes")
    port = _free_port()
    nodes = [subprocess.Popen(_train_cmd(two_path, 2, rank, 1, port), env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for rank in (0, 1)]
    outputs = [node.communicate(timeout=TIMEOUT)[0].decode(errors="replace") for node in nodes]
    for rank, (node, out) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank} failed:\n{out[-3000:]}"

    one = load_file(str(one_cfg.paths.adapter / WEIGHTS_NAME))
    two = load_file(str(two_cfg.paths.adapter / WEIGHTS_NAME))
    assert one.keys() == two.keys() and one
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    # training moved the LoRA B matrices away from their zero init, so the comparison is not vacuous
    assert any(t.abs().max() > 0 for k, t in one.items() if "lora_B" in k)
    assert read_adapter(two_cfg.paths.adapter).provenance.world_size == 2


def test_sigterm_to_the_launch_script_alone_saves_a_checkpoint_and_ends_with_75(prepared_llama, tmp_path):
    """What `docker stop` or a scheduler does: SIGTERM to the top process only. The script forwards it to torchrun,
    the ranks save at the next step boundary, and the script ends with 75 (torchrun itself would exit 1)."""
    import signal
    import time

    from gift_dist.train.metrics import METRICS_NAME, read_metrics

    cfg, path = _config(prepared_llama, tmp_path, "preempted")
    cfg.train.max_steps = 400
    dump_config(cfg, path)
    env = dict(_env(), CONFIG=str(path), NNODES="1", NODE_RANK="0", MASTER_ADDR="127.0.0.1", GPUS_PER_NODE="2",
               MASTER_PORT=str(_free_port()), PATH=os.pathsep.join([os.path.dirname(sys.executable),
                                                                      os.environ.get("PATH", "")]))
    script = os.path.join(os.getcwd(), "launch", "torchrun_multinode.sh")
    proc = subprocess.Popen(["bash", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    while not read_metrics(cfg.paths.logs / METRICS_NAME) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]
    proc.send_signal(signal.SIGTERM)  # the script's process only, not its group
    output = proc.communicate(timeout=TIMEOUT)[0].decode(errors="replace")
    assert proc.returncode == 75, output[-3000:]
    assert "PREEMPTED" in output and (cfg.paths.checkpoints / "latest").is_file()
    stopped_at = read_metrics(cfg.paths.logs / METRICS_NAME)[-1]["step"]
    assert stopped_at < 400 and (cfg.paths.checkpoints / "latest").read_text().strip().endswith(f"{stopped_at:08d}")
    leftover = [p for p in os.listdir("/proc") if p.isdigit() and _mentions(p, str(path))]
    assert not leftover, f"processes still running: {leftover}"


def _mentions(pid: str, marker: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return marker in fh.read().decode(errors="replace")
    except OSError:
        return False


def test_two_nodes_through_the_deepspeed_launch_script_equal_one_node_two_ranks(prepared_llama, tmp_path):
    """The DeepSpeed launcher in its ssh-less mode (one launcher per node, NO_SSH=1 NODE_RANK=i), started through
    launch/deepspeed_hostfile.sh on two loopback "nodes", against torchrun with one node of two ranks."""
    one_cfg, one_path = _config(prepared_llama, tmp_path, "one_node")
    subprocess.run(_train_cmd(one_path, 1, 0, 2, _free_port()), env=_env(), check=True, timeout=TIMEOUT,
                   capture_output=True)

    two_cfg, two_path = _config(prepared_llama, tmp_path, "ds_nodes")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    port = str(_free_port())
    script = os.path.join(os.getcwd(), "launch", "deepspeed_hostfile.sh")
    path_env = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    nodes = []
    for rank in (0, 1):
        env = dict(_env(), CONFIG=str(two_path), HOSTFILE=str(hostfile), NO_SSH="1", NODE_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PATH=path_env)
        env.pop("OMP_NUM_THREADS", None)  # the DeepSpeed launcher sets none: our ranks share the cores themselves
        nodes.append(subprocess.Popen(["bash", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [node.communicate(timeout=TIMEOUT)[0].decode(errors="replace") for node in nodes]
    for rank, (node, out) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank} failed:\n{out[-3000:]}"
    assert "CPU thread(s)" in outputs[0]

    one = load_file(str(one_cfg.paths.adapter / WEIGHTS_NAME))
    two = load_file(str(two_cfg.paths.adapter / WEIGHTS_NAME))
    assert one.keys() == two.keys() and one
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    assert read_adapter(two_cfg.paths.adapter).provenance.world_size == 2


def _deepspeed_env(**extra) -> dict:
    env = dict(_env(), PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]), **extra)
    env.pop("OMP_NUM_THREADS", None)  # the DeepSpeed launcher sets none: our ranks share the cores themselves
    return env


def _deepspeed_cmd(config, port: int) -> list[str]:
    return [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port",
            str(port), "--no_local_rank", "--module", "gift_dist.cli", "train", "--config", str(config)]


def _wait_for_first_step(cfg, proc) -> None:
    import time

    from gift_dist.train.metrics import METRICS_NAME, read_metrics

    deadline = time.monotonic() + TIMEOUT
    while not read_metrics(cfg.paths.logs / METRICS_NAME) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]


def _wait_until_nothing_mentions(marker: str, timeout: float = TIMEOUT) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [p for p in os.listdir("/proc") if p.isdigit() and _mentions(p, marker)]:
            return
        time.sleep(0.2)
    raise AssertionError(f"processes running with {marker} did not stop within {timeout:.0f}s")


def test_deepspeed_launcher_on_one_node_trains_two_ranks(prepared_llama, tmp_path):
    """`deepspeed --num_gpus 2 --no_local_rank --module gift_dist.cli train`: the launcher users run on one node."""
    cfg, path = _config(prepared_llama, tmp_path, "ds_one_node")
    proc = subprocess.run(_deepspeed_cmd(path, _free_port()), env=_deepspeed_env(), capture_output=True,
                          timeout=TIMEOUT)
    output = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == 0, output[-3000:]
    assert "CPU thread(s)" in output  # the ranks split the cores (DeepSpeed's launcher sets no OMP_NUM_THREADS)
    adapter = read_adapter(cfg.paths.adapter)
    assert adapter.provenance.world_size == 2 and adapter.provenance.complete


def test_sigterm_to_the_deepspeed_runner_alone_checkpoints_and_leaves_nothing_running(prepared_llama, tmp_path):
    """SIGTERM to the top `deepspeed` process only (what a container runtime does to PID 1): it dies without
    passing the signal on; its workers notice, save a checkpoint at the next step boundary and stop (they used to
    train on, orphaned, until killed without one)."""
    import signal

    from gift_dist.train.metrics import METRICS_NAME, read_metrics

    cfg, path = _config(prepared_llama, tmp_path, "ds_runner_stopped")
    cfg.train.max_steps = 400
    dump_config(cfg, path)
    marker = tmp_path / "preempted"
    proc = subprocess.Popen(_deepspeed_cmd(path, _free_port()), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=_deepspeed_env(GIFT_PREEMPT_MARKER=str(marker)), start_new_session=True)
    _wait_for_first_step(cfg, proc)
    proc.send_signal(signal.SIGTERM)  # the runner only, not its group
    proc.wait(timeout=TIMEOUT)
    _wait_until_nothing_mentions(str(path))
    stopped_at = read_metrics(cfg.paths.logs / METRICS_NAME)[-1]["step"]
    assert stopped_at < 400 and marker.is_file()  # rank 0 writes the marker after its checkpoint is saved
    assert (cfg.paths.checkpoints / "latest").read_text().strip().endswith(f"{stopped_at:08d}")


def test_sigterm_to_the_deepspeed_launch_script_alone_ends_with_75(prepared_llama, tmp_path):
    """launch/deepspeed_hostfile.sh (ssh-less, one node of two ranks) signalled alone: it passes the signal to the
    launcher's whole process group, the ranks save, nothing is left running, and the script ends with 75."""
    import signal

    from gift_dist.train.metrics import METRICS_NAME, read_metrics

    cfg, path = _config(prepared_llama, tmp_path, "ds_script_stopped")
    cfg.train.max_steps = 400
    dump_config(cfg, path)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    env = _deepspeed_env(CONFIG=str(path), HOSTFILE=str(hostfile), NO_SSH="1", NODE_RANK="0",
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    proc = subprocess.Popen(["bash", os.path.join(os.getcwd(), "launch", "deepspeed_hostfile.sh")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    _wait_for_first_step(cfg, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=TIMEOUT)[0].decode(errors="replace")
    assert proc.returncode == 75, output[-3000:]
    assert "PREEMPTED" in output
    leftover = [p for p in os.listdir("/proc") if p.isdigit() and _mentions(p, str(path))]
    assert not leftover, f"processes still running: {leftover}"
    stopped_at = read_metrics(cfg.paths.logs / METRICS_NAME)[-1]["step"]
    assert (cfg.paths.checkpoints / "latest").read_text().strip().endswith(f"{stopped_at:08d}")
