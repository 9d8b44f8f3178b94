"""End to end on tiny models: prepare -> score -> train (2 ZeRO-3 ranks, streaming) -> merge, and resumption."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from gift_dist.bundled import bundled_data_path, read_jsonl, write_jsonl
from gift_dist.config import ConfigError, dump_config
from gift_dist.contracts import confidence as conf
from gift_dist.contracts.merged import read_merged
from gift_dist.pipeline.run import Launch, run_pipeline
from tests.conftest import make_run_config

# Multi-process DeepSpeed / end-to-end runs: left out of the quick loop (-m "not slow").
pytestmark = pytest.mark.slow

SETTINGS = {
    "prepare.max_length": 256,
    "prepare.samples_per_shard": 32,
    "score.progress": False,
    "train.micro_batch_size": 4,
    "train.max_steps": 8,
    "train.save_every_steps": 2,
    "train.learning_rate": 5e-3,
    "train.progress": False,
    "train.confidence_poll_seconds": 0.2,
}


def _config(tiny_llama, tmp_path, **extra):
    data = write_jsonl(read_jsonl(bundled_data_path())[:160], tmp_path / "data.jsonl")
    return make_run_config(tiny_llama, tmp_path / "run", [data], **{**SETTINGS, **extra})


def test_pipeline_end_to_end_with_overlapping_scorer(tiny_llama, tmp_path):
    # A throttled scorer (20 batches of >= 1.5 s each) is still writing when the trainer takes its first step.
    cfg = _config(tiny_llama, tmp_path, **{"score.throttle_seconds": 1.5, "score.max_batch_size": 8})
    result = run_pipeline(cfg, Launch(train_procs=2, score_workers=1))
    assert result.ran == ["prepare", "score", "train", "merge"]

    manifest = conf.read_manifest(cfg.paths.confidence)
    assert manifest.complete and manifest.num_shards == 5
    last_shard_written = max((cfg.paths.confidence / r.file).stat().st_mtime for r in manifest.shards.values())
    metrics = [json.loads(line) for line in (cfg.paths.logs / "train_metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert metrics[0]["time"] < last_shard_written, "training did not overlap with scoring"
    assert all(0 < m["mean_weight"] <= 1 for m in metrics)

    merged = read_merged(cfg.paths.merged)
    assert merged.record.scale > 0
    model = AutoModelForCausalLM.from_pretrained(cfg.paths.merged)
    instruct = AutoModelForCausalLM.from_pretrained(tiny_llama.instruct)
    moved = [n for (n, p), q in zip(model.named_parameters(), instruct.parameters()) if not torch.equal(p, q)]
    assert any("q_proj" in n for n in moved) and not any("embed_tokens" in n for n in moved)
    adapter = load_file(str(cfg.paths.adapter / "adapter_model.safetensors"))
    assert any(t.abs().max() > 0 for k, t in adapter.items() if "lora_B" in k)

    again = run_pipeline(cfg, Launch(train_procs=2, score_workers=1))
    assert again.ran == [] and again.skipped == ["prepare", "score", "train", "merge"]

    # Outputs made with other settings are refused, never silently kept.
    other_merge = copy.deepcopy(cfg)
    other_merge.merge.scale = 0.5
    with pytest.raises(ConfigError, match="holds another merge"):
        run_pipeline(other_merge, Launch(train_procs=2, score_workers=1))
    other_training = copy.deepcopy(cfg)
    other_training.train.learning_rate = 1e-4
    with pytest.raises(ConfigError, match="with other train settings"):
        run_pipeline(other_training, Launch(train_procs=2, score_workers=1))



@pytest.mark.parametrize("setting, value, named", [
    ("dtype", "bfloat16", "merge.dtype: 'auto' -> 'bfloat16'"),
    ("scale", 0.5, "merge.scale: 1.0 -> 0.5"),
    ("into", "base", "merge.into: 'instruct' -> 'base'; target model: "),
])
def test_a_merge_made_with_other_settings_is_not_skipped(tiny_llama, tmp_path, setting, value, named):
    """`run` skips the merge only when merged/ holds the same merge: a change of any setting gift_merge.json
    records (merge.dtype included) is refused naming it, and merged again with merge.overwrite=true."""
    from gift_dist.merge.stage import merge
    from gift_dist.pipeline.run import merged_is_complete
    from tests.merge_helpers import make_adapter, merge_config

    cfg = merge_config(tmp_path, tiny_llama)
    make_adapter(tiny_llama.base, cfg.paths.adapter, target_modules=["q_proj"])
    merge(cfg)
    assert merged_is_complete(cfg)
    # Operational merge settings (MergeConfig's OPERATIONAL marks) change nothing merged: still the same merge.
    operated_otherwise = copy.deepcopy(cfg)
    for key, operational_value in {"threads": 1, "max_shard_size": "1GB", "verify": True, "progress": True}.items():
        setattr(operated_otherwise.merge, key, operational_value)
    assert merged_is_complete(operated_otherwise)
    changed = copy.deepcopy(cfg)
    setattr(changed.merge, setting, value)
    with pytest.raises(ConfigError, match=r"holds another merge \(.*" + re.escape(named)):
        merged_is_complete(changed)
    changed.merge.overwrite = True
    assert not merged_is_complete(changed)

def _wait_until_no_process_mentions(marker: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    alive.append(entry.name)
            except OSError:
                continue
        if not alive:
            return
        time.sleep(0.2)
    raise AssertionError(f"processes running with {marker} did not stop within {timeout:.0f}s")


def test_killed_run_finishes_without_redoing_stages(tiny_llama, tmp_path):
    cfg = _config(tiny_llama, tmp_path, **{"train.weighting": "uniform", "train.max_steps": 12})
    config_file = tmp_path / "run.yaml"
    dump_config(cfg, config_file)
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, "-m", "gift_dist.cli", "run", "--config", str(config_file),
                             "--train-procs", "2", "--score-workers", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = cfg.paths.checkpoints / "latest"
    deadline = time.monotonic() + 240
    while not latest.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert latest.exists(), "the trainer never saved a checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The orphaned trainer gets SIGTERM from the kernel (PDEATHSIG), saves and stops: wait for it to be gone, not
    # a fixed time, or the rerun can start beside it on a loaded machine.
    _wait_until_no_process_mentions(str(cfg.paths.logs / "run_config.yaml"))
    assert not cfg.paths.adapter.exists() and not cfg.paths.merged.exists()
    prepared_mtime = (cfg.paths.prepared / "prepared.json").stat().st_mtime

    result = run_pipeline(cfg, Launch(train_procs=2, score_workers=1))
    assert result.skipped[:2] == ["prepare", "score"] and result.ran == ["train", "merge"]
    assert (cfg.paths.prepared / "prepared.json").stat().st_mtime == prepared_mtime
    assert "resum" in (cfg.paths.logs / "train.log").read_text().lower()
    steps = [json.loads(line)["step"] for line in (cfg.paths.logs / "train_metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 12
    read_merged(cfg.paths.merged)


def test_a_failed_trainer_is_reported_by_its_root_cause(tiny_llama, tmp_path, capsys):
    """torchrun closes a failed job with ChildFailedError; `gift-dist run` leads with the rank's own error."""
    from gift_dist.cli import main

    cfg = _config(tiny_llama, tmp_path, **{"train.weighting": "uniform", "train.packing": False,
                                           "train.attn_implementation": "gift_varlen"})
    config_file = tmp_path / "run.yaml"
    dump_config(cfg, config_file)
    assert main(["run", "--config", str(config_file), "--train-procs", "1", "--score-workers", "1"]) == 1
    err = capsys.readouterr().err
    first_line = next((line for line in err.splitlines() if line.startswith("gift-dist run:")), err[-2000:])
    assert first_line.startswith("gift-dist run: trainer failed with exit code 1: ")
    assert "gift-dist train: error: train.attn_implementation=gift_varlen attends within packed samples" in first_line


def test_root_cause_is_the_first_exception_not_the_launchers(tmp_path):
    from gift_dist.pipeline.run import root_cause

    log = tmp_path / "train.log"
    log.write_text("INFO starting\n[rank1]: Traceback (most recent call last):\n[rank1]:   File \"x.py\", line 3\n"
                   "[rank1]: ValueError: invalid literal for int() with base 10: '0a'\n"
                   "[rank0]: RuntimeError: a later consequence\n"
                   "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n")
    assert root_cause(log) == "[rank1]: ValueError: invalid literal for int() with base 10: '0a'"
    log.write_text("torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n")
    assert root_cause(log) is None


def test_sigterm_to_gift_dist_run_saves_and_ends_with_75(tiny_llama, tmp_path):
    cfg = _config(tiny_llama, tmp_path, **{"train.weighting": "uniform", "train.max_steps": 400,
                                           "train.save_every_steps": 1000})
    config_file = tmp_path / "run.yaml"
    dump_config(cfg, config_file)
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, "-m", "gift_dist.cli", "run", "--config", str(config_file),
                             "--train-procs", "1", "--score-workers", "1"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    metrics = cfg.paths.logs / "train_metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().strip()) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=240)[0].decode(errors="replace")
    assert proc.returncode == 75, output[-3000:]
    assert "PREEMPTED" in output and (cfg.paths.checkpoints / "latest").is_file()
    _wait_until_no_process_mentions(str(cfg.paths.logs / "run_config.yaml"), timeout=30)
