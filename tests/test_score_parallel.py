"""Tensor-parallel scoring replicas: the vocabulary-parallel log-prob, the layout checks, and k-rank replicas
under torchrun (gloo, CPU) against one process."""

from __future__ import annotations

import copy
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

from gift_dist.config import ScoreConfig, dump_config, load_config
from gift_dist.contracts import confidence as contract
from gift_dist.errors import ConfigError
from gift_dist.score.pool import LEASE_DIR
from gift_dist.score.stage import score

ROOT = Path(__file__).resolve().parents[1]
# Embedding rows of the tensor-parallel test pair: a prime, so no rank count divides the vocabulary.
VOCAB_ROWS = 389


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _vocab_parallel_rank(rank: int, world: int, group, cap) -> dict:
    """One rank: its even slice of a random output layer, the chunk maths against a full fp32 log_softmax."""
    from gift_dist.score.logprobs import vocab_parallel_chunk
    from gift_dist.score.parallel import Replica, vocab_slice

    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 101, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(101, 16, generator=gen) * 3)
        head.bias.copy_(torch.randn(101, generator=gen))
    hidden = torch.randn(37, 16, generator=gen)
    targets = torch.randint(0, 101, (37,), generator=gen)

    class Model:
        def get_output_embeddings(self):
            return head

    part = vocab_slice(Model(), Replica(size=world, rank=rank, group=group))
    with torch.no_grad():
        logprobs, entropy = vocab_parallel_chunk(part, hidden, targets, cap, True)
        logits = head(hidden).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        log_p = logits.log_softmax(-1)
    return {"logprobs": logprobs, "entropy": entropy, "rows": part.weight.shape[0],
            "ref_logprobs": log_p.gather(1, targets[:, None]).squeeze(1),
            "ref_entropy": -(log_p.exp() * log_p).sum(-1)}


def _vocab_parallel_worker(rank: int, world: int, port: int, cap, out_dir: str) -> None:
    """One rank as a process of its own, in the default process group (``mp.spawn``)."""
    import torch.distributed as torch_dist

    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = _vocab_parallel_rank(rank, world, torch_dist.group.WORLD, cap)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


def _on_gloo_threads(world: int, cap) -> list[dict]:
    """Every rank a thread of this process with a gloo process group of its own (one in-memory rendezvous
    store): the same collectives over loopback TCP as separate processes, without starting interpreters."""
    import datetime
    from concurrent.futures import ThreadPoolExecutor

    import torch.distributed as torch_dist

    store = torch_dist.HashStore()

    def rank_of(rank: int) -> dict:
        group = torch_dist.ProcessGroupGloo(torch_dist.PrefixStore("vocab_parallel", store), rank, world,
                                            datetime.timedelta(seconds=120))
        return _vocab_parallel_rank(rank, world, group, cap)

    with ThreadPoolExecutor(world) as pool:
        return [future.result(timeout=300) for future in [pool.submit(rank_of, r) for r in range(world)]]


def _check_vocab_parallel(results: list[dict]) -> None:
    assert sum(r["rows"] for r in results) == 101  # the slices cover the vocabulary once
    for r in results:  # every rank gets the same values, equal to the full computation
        torch.testing.assert_close(r["logprobs"], r["ref_logprobs"], atol=1e-5, rtol=0)
        torch.testing.assert_close(r["entropy"], r["ref_entropy"], atol=1e-5, rtol=0)
        assert torch.isfinite(r["logprobs"]).all()


# The quick loop runs the ranks as threads (gloo process groups in one process, ~0.1 s against ~5-10 s for
# spawning interpreters that import torch); the spawned processes in the default group are in the slow set.
@pytest.mark.parametrize("world,cap", [(2, 5.0), (3, None)])
def test_vocab_parallel_logprob_equals_a_full_log_softmax_on_gloo_threads(world, cap):
    _check_vocab_parallel(_on_gloo_threads(world, cap))


@pytest.mark.slow
@pytest.mark.parametrize("world,cap", [(3, None), (2, 5.0)])
def test_vocab_parallel_logprob_equals_a_full_log_softmax(tmp_path, world, cap):
    import torch.multiprocessing as mp

    mp.spawn(_vocab_parallel_worker, args=(world, _free_port(), cap, str(tmp_path)), nprocs=world, join=True)
    _check_vocab_parallel([torch.load(tmp_path / f"rank{r}.pt") for r in range(world)])


def _llama_config(heads=4, kv_heads=2):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, num_attention_heads=heads, num_key_value_heads=kv_heads)


def test_auto_picks_tensor_where_the_heads_divide_else_pipeline():
    from gift_dist.score.parallel import resolve_parallel

    assert resolve_parallel(ScoreConfig(), _llama_config()) == "replica"
    assert resolve_parallel(ScoreConfig(gpus_per_replica=2), _llama_config()) == "tensor"
    assert resolve_parallel(ScoreConfig(gpus_per_replica=4), _llama_config(kv_heads=2)) == "pipeline"
    assert resolve_parallel(ScoreConfig(gpus_per_replica=4, parallel="pipeline"), _llama_config(4, 4)) == "pipeline"
    with pytest.raises(ConfigError, match="key/value heads are not all divisible by 4"):
        resolve_parallel(ScoreConfig(gpus_per_replica=4, parallel="tensor"), _llama_config(kv_heads=2))


def test_a_replica_of_one_process_cannot_span_gpus():
    with pytest.raises(ConfigError, match="score.parallel"):
        load_config(None, ["score.parallel=replica", "score.gpus_per_replica=2"])


def test_tensor_replicas_need_a_multiple_of_their_size_in_processes(monkeypatch):
    from gift_dist.score.parallel import join_replica

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="needs a multiple of 2 processes on every node"):
        join_replica(ScoreConfig(gpus_per_replica=2, parallel="tensor"), "tensor")


# --- k-rank replicas under torchrun ---------------------------------------------------------------------------

def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    return env


def _prepare_tp(tiny_pair, root: Path, arch: str):
    """A prepared dataset of a pair 4 ranks can split (4 key/value heads) with a prime vocabulary."""
    from gift_dist.bundled import bundled_data_path, read_jsonl, write_jsonl
    from gift_dist.prepare.stage import prepare
    from tests.conftest import make_run_config

    pair = tiny_pair(arch=arch, seed=3, kv_heads=4, vocab_rows=VOCAB_ROWS)
    data = write_jsonl(read_jsonl(bundled_data_path())[:160], root / "data.jsonl")
    cfg = make_run_config(pair, root / "run", [data], **{"prepare.max_length": 256, "prepare.samples_per_shard": 48})
    cfg.score.progress = False
    cfg.score.max_batch_tokens = 1024  # ragged batches of several lengths
    cfg.score.record_entropy = True
    prepare(cfg)
    return cfg


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def prepared_tp(request, tiny_pair, tmp_path_factory):
    return _prepare_tp(tiny_pair, tmp_path_factory.mktemp(f"prepared_tp_{request.param}"), request.param)


@pytest.fixture(scope="module")
def prepared_tp_llama(tiny_pair, tmp_path_factory):
    return _prepare_tp(tiny_pair, tmp_path_factory.mktemp("prepared_tp_kill"), "llama")


def _copy_run(prepared_cfg, root: Path) -> Path:
    cfg = copy.deepcopy(prepared_cfg)
    cfg.output_dir = str(root)
    shutil.copytree(prepared_cfg.paths.prepared, cfg.paths.prepared)
    dump_config(cfg, root / "run.yaml")
    return root / "run.yaml"


def _torchrun(config_file: Path, ranks: int, per_replica: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), "-m",
            "gift_dist", "score", "--config", str(config_file), "score.parallel=tensor",
            f"score.gpus_per_replica={per_replica}", *extra]


def _shards(conf_dir: Path) -> dict[int, contract.ConfidenceShard]:
    manifest = contract.read_manifest(conf_dir)
    assert manifest.complete
    return {i: contract.read_shard(conf_dir, manifest, i) for i in sorted(manifest.shards)}


@pytest.fixture(scope="module")
def one_process(prepared_tp, tmp_path_factory):
    cfg = copy.deepcopy(prepared_tp)
    cfg.output_dir = str(tmp_path_factory.mktemp("one_process"))
    shutil.copytree(prepared_tp.paths.prepared, cfg.paths.prepared)
    score(cfg)
    return _shards(cfg.paths.confidence)


@pytest.mark.slow
@pytest.mark.parametrize("ranks,per_replica", [(2, 2), (4, 4), (4, 2)])
def test_tensor_parallel_replicas_score_what_one_process_scores(prepared_tp, one_process, tmp_path, ranks,
                                                                 per_replica):
    config_file = _copy_run(prepared_tp, tmp_path)
    proc = subprocess.run(_torchrun(config_file, ranks, per_replica), env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    conf_dir = tmp_path / "confidence"
    shards = _shards(conf_dir)
    assert shards.keys() == one_process.keys()
    for index, shard in shards.items():
        expected = one_process[index]
        assert torch.equal(shard.sample_index, expected.sample_index)
        assert torch.equal(shard.offsets, expected.offsets)
        torch.testing.assert_close(shard.logprobs, expected.logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(shard.entropy, expected.entropy, atol=1e-5, rtol=0)
    writers = {record.worker for record in contract.read_manifest(conf_dir).shards.values()}
    assert all(w.endswith(f"x{per_replica}") for w in writers)  # written by replica leaders
    assert len(writers) == ranks // per_replica or len(one_process) < ranks // per_replica
    assert not list((conf_dir / LEASE_DIR).iterdir())


@pytest.mark.slow
def test_a_killed_replica_is_finished_by_another_byte_identically(prepared_tp_llama, tmp_path):
    prepared_tp = prepared_tp_llama
    whole = _copy_run(prepared_tp, tmp_path / "whole")
    proc = subprocess.run(_torchrun(whole, 2, 2), env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected = {p.name: p.read_bytes() for p in sorted((tmp_path / "whole/confidence").glob("shard-*"))}

    killed = _copy_run(prepared_tp, tmp_path / "killed")
    conf_dir = tmp_path / "killed/confidence"
    run = subprocess.Popen(_torchrun(killed, 2, 2, "--throttle-seconds", "0.4"), env=_env(), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lease = conf_dir / LEASE_DIR / "shard-00001.lease"
    deadline = time.monotonic() + 600
    while not (lease.exists() and time.time() - json.loads(lease.read_text() or "{}").get("claimed", 1e18) > 1.0):
        assert run.poll() is None, run.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "the replica never got into shard 1"
        time.sleep(0.1)
    # SIGKILL one rank that is not the leader: torchrun must end the replica, the leader's lease dies with it.
    workers = subprocess.run(["pgrep", "-f", "-P", str(run.pid), "gift_dist"], capture_output=True, text=True)
    pids = sorted(int(p) for p in workers.stdout.split())
    assert len(pids) == 2, workers.stdout
    started = time.monotonic()
    os.kill(pids[-1], signal.SIGKILL)
    run.communicate(timeout=120)
    assert time.monotonic() - started < 120
    assert run.returncode != 0
    assert sorted(contract.read_manifest(conf_dir).shards) == [0]
    # Two endings race, both correct: the leader's next collective fails on the dead peer and its `finally`
    # releases the lease, or torchrun ends the leader first and the lease stays with a dead owner. Either way no
    # live lease is left to hold shard 1 for score.lease_seconds.
    if lease.exists():
        owner = json.loads(lease.read_text() or "{}")
        with pytest.raises(ProcessLookupError):
            os.kill(int(owner["pid"]), 0)

    restarted = time.monotonic()
    proc = subprocess.run(_torchrun(killed, 2, 2), env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert time.monotonic() - restarted < prepared_tp.score.lease_seconds  # it never waited out a lease
    assert {p.name: p.read_bytes() for p in sorted(conf_dir.glob("shard-*"))} == expected
    assert not list((conf_dir / LEASE_DIR).iterdir())


@pytest.mark.parametrize("variable,value,ranks", [
    ("LOCAL_WORLD_SIZE", "2", 2), ("LOCAL_SIZE", "4", 4), ("OMPI_COMM_WORLD_LOCAL_SIZE", "8", 8),
    ("MPI_LOCALNRANKS", "4", 4), ("SLURM_TASKS_PER_NODE", "4(x2)", 4), ("SLURM_NTASKS_PER_NODE", "4", 4)])
def test_the_ranks_of_a_node_are_read_from_whichever_launcher_started_us(monkeypatch, variable, value, ranks):
    from gift_dist import dist, launchers

    for key in (*launchers.LOCAL_SIZE_VARIABLES, "SLURM_NODEID"):
        monkeypatch.delenv(key, raising=False)
    assert launchers.env_local_world_size() is None
    monkeypatch.setenv(variable, value)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert launchers.env_local_world_size() == ranks
    threads = torch.get_num_threads()
    try:
        assert dist.share_cpu_threads() == max(1, (os.cpu_count() or 1) // ranks)
    finally:
        torch.set_num_threads(threads)
