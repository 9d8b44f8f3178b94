"""End-to-end tests of `gift-dist train`: ZeRO-3 on CPU with gloo, 1 and 2 ranks launched with torchrun.

One reference run (2 ranks, streaming confidence from a slow writer) is shared by the streaming, adapter and
resume tests; the bad-input tests run the recipe in-process on one rank.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from gift_dist.config import RunConfig, dump_config, load_config
from gift_dist.contracts import ContractError, file_sha256
from gift_dist.contracts import confidence as conf
from gift_dist.contracts.adapter import read_adapter
from gift_dist.contracts.checkpoint import LATEST_NAME, RECORD_NAME, tag_for
from gift_dist.contracts.model_folder import model_identity
from gift_dist.contracts.prepared import Prepared, load_prepared
from gift_dist.train.metrics import METRICS_NAME, read_metrics

# Multi-process DeepSpeed / end-to-end runs: left out of the quick loop (-m "not slow").
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SAMPLES_PER_SHARD = 8
STEPS = 8
SAVE_EVERY = 4
LAUNCH_TIMEOUT = 240


@dataclass
class Setup:
    pair: object
    prepared_dir: Path
    prepared: Prepared
    # What prepare was run with: a run config must say the same (train recomputes the prepared inputs).
    prepare_overrides: list[str]


@pytest.fixture(scope="module")
def setup(tiny_pair, tmp_path_factory) -> Setup:
    """A tiny pair (few pre-training steps: quality is irrelevant here) and a 64-sample prepared dataset."""
    from gift_dist.bundled import bundled_data_path, read_jsonl, write_jsonl
    from gift_dist.prepare.stage import prepare

    root = tmp_path_factory.mktemp("train_dist")
    pair = tiny_pair(arch="llama", seed=0, base_steps=2, instruct_steps=2)
    data = write_jsonl(read_jsonl(bundled_data_path())[:64], root / "data.jsonl")
    overrides = ["prepare.max_length=128", f"prepare.samples_per_shard={SAMPLES_PER_SHARD}", f"data.files=[{data}]"]
    cfg = load_config(None, [f"base_model={pair.base}", f"instruct_model={pair.instruct}",
                             f"output_dir={root / 'prep'}", *overrides])
    prepare(cfg)
    return Setup(pair, cfg.paths.prepared, load_prepared(cfg.paths.prepared), overrides)


def run_config(setup: Setup, out: Path, confidence: Path | None = None, **train) -> RunConfig:
    """A run folder whose prepared/ (and confidence/) link to the shared ones."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "prepared").symlink_to(setup.prepared_dir, target_is_directory=True)
    if confidence is not None:
        (out / "confidence").symlink_to(confidence, target_is_directory=True)
    settings = {"micro_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": STEPS,
                "save_every_steps": 1000, "learning_rate": 1e-2, "warmup_steps": 0, "lora.r": 4, "lora.alpha": 8,
                "lora.dropout": 0.0, "confidence_poll_seconds": 0.2, "confidence_wait_seconds": 120,
                "progress": False, "gradient_checkpointing": True,
                # Small chunks: ranks then need different numbers of lm_head calls and must agree on one.
                "ce_chunk_tokens": 16, **train}
    return load_config(None, [f"base_model={setup.pair.base}", f"instruct_model={setup.pair.instruct}",
                              f"output_dir={out}", *setup.prepare_overrides,
                              *[f"train.{k}={v}" for k, v in settings.items()]])


def confidence_manifest(setup: Setup, fingerprint: str | None = None) -> conf.ConfidenceManifest:
    return conf.ConfidenceManifest(
        prepared_fingerprint=fingerprint or setup.prepared.manifest.fingerprint,
        instruct_model=model_identity(str(setup.pair.instruct)), logprob_dtype="float32",
        num_shards=len(setup.prepared.manifest.shards))


def shard_tensors(setup: Setup, index: int, extra_token_for: int | None = None):
    """Valid (<= 0) pseudo-random logprobs for the samples of shard ``index``, deterministic per shard."""
    spec = setup.prepared.manifest.shards[index]
    counts = list(setup.prepared.dataset.select(range(spec.start, spec.end))["num_target_tokens"])
    if extra_token_for is not None:
        counts[extra_token_for - spec.start] += 1
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64)
    generator = torch.Generator().manual_seed(1000 + index)
    logprobs = -3.0 * torch.rand(int(offsets[-1]), generator=generator)
    return torch.arange(spec.start, spec.end, dtype=torch.int64), offsets, logprobs


def write_confidence(setup: Setup, conf_dir: Path, shards=None, fingerprint: str | None = None) -> None:
    manifest = conf.init_manifest(conf_dir, confidence_manifest(setup, fingerprint))
    for index in range(manifest.num_shards) if shards is None else shards:
        conf.write_shard(conf_dir, manifest, index, *shard_tensors(setup, index))


def launch(cfg: RunConfig, procs: int, *extra: str, wait: bool = True):
    """`torchrun --nproc_per_node procs -m gift_dist.cli train` in its own process group (like a real job)."""
    config_file = Path(cfg.output_dir) / f"run-{time.monotonic_ns()}.yaml"
    dump_config(cfg, config_file)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           "-m", "gift_dist.cli", "train", "--config", str(config_file), *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    if not wait:
        return proc
    output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, output[-6000:]
    return output


def losses(cfg: RunConfig) -> list[float]:
    return [row["loss"] for row in read_metrics(cfg.paths.logs / METRICS_NAME)]


def grads(dump: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(dump / f"grads-step-{step:06d}.safetensors"))


@pytest.fixture(scope="module", params=["replicate", "zero3"])
def reference(setup, tmp_path_factory, request):
    """2 ranks x GA 1, `gift` weighting, trained while a slow writer is still producing the confidence shards; in
    each layout (the frozen base replicated, or partitioned by ZeRO-3): every test using it runs in both."""
    root = tmp_path_factory.mktemp(f"reference-{request.param}")
    conf_dir = root / "confidence"
    cfg = run_config(setup, root / "run", confidence=conf_dir, save_every_steps=SAVE_EVERY, sharding=request.param)
    conf.init_manifest(conf_dir, confidence_manifest(setup))
    observed = {}

    def slow_scorer():
        manifest = conf.read_manifest(conf_dir)
        conf.write_shard(conf_dir, manifest, 0, *shard_tensors(setup, 0))
        metrics = cfg.paths.logs / METRICS_NAME
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not read_metrics(metrics) and time.monotonic() < deadline:
            time.sleep(0.05)
        observed["finished_shards_when_training_started"] = len(conf.read_manifest(conf_dir).shards)
        for index in range(1, manifest.num_shards):
            time.sleep(0.3)
            conf.write_shard(conf_dir, manifest, index, *shard_tensors(setup, index))

    writer = threading.Thread(target=slow_scorer, daemon=True)
    writer.start()
    output = launch(cfg, 2, "--dump-grads", str(root / "grads"))
    writer.join(timeout=60)
    return cfg, root / "grads", observed, output


def test_training_streams_shards_while_the_scorer_writes(reference, setup):
    cfg, _, observed, output = reference
    assert observed["finished_shards_when_training_started"] == 1
    rows = read_metrics(cfg.paths.logs / METRICS_NAME)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(row["loss"])) and row["grad_norm"] is not None for row in rows)
    assert rows[0]["mean_weight"] < 1.0  # gift weights p_inst <= 1, unlike uniform
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (cfg.paths.logs / "train_loss.png").is_file()
    assert "done, 8 steps" in output


@pytest.mark.parametrize("weighting", ["gift", "uniform"])
def test_two_ranks_equal_one_rank_with_grad_accumulation(reference, setup, tmp_path, weighting):
    """Same global batch (4 samples): 2 ranks x GA 1 and 1 rank x GA 2 give the same loss and LoRA gradients."""
    if weighting == "gift":
        two_cfg, two_dump = reference[0], reference[1]
        conf_dir = Path(os.path.realpath(two_cfg.paths.confidence))
    else:
        conf_dir = None
        # Uniform runs also exercise packing (no confidence/ folder at all: uniform must not need it).
        two_cfg = run_config(setup, tmp_path / "two", weighting=weighting, max_steps=1, packing=True,
                             sharding=reference[0].train.sharding)
        two_dump = tmp_path / "two-grads"
        launch(two_cfg, 2, "--dump-grads", str(two_dump))
    one_cfg = run_config(setup, tmp_path / "one", confidence=conf_dir, weighting=weighting, max_steps=1,
                         gradient_accumulation_steps=2, packing=weighting == "uniform",
                         sharding=reference[0].train.sharding)
    launch(one_cfg, 1, "--dump-grads", str(tmp_path / "one-grads"))
    assert losses(one_cfg)[0] == pytest.approx(losses(two_cfg)[0], rel=1e-5)
    two_grads, one_grads = grads(two_dump, 1), grads(tmp_path / "one-grads", 1)
    assert two_grads.keys() == one_grads.keys() and len(one_grads) == 2 * 7 * 2
    assert any(g.abs().max() > 0 for g in one_grads.values())
    for name, grad in one_grads.items():
        torch.testing.assert_close(grad, two_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_adapter_equals_deepspeed_consolidation_and_loads_with_peft(reference, setup):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = reference[0]
    adapter = read_adapter(cfg.paths.adapter)
    assert adapter.provenance.complete is True
    assert adapter.provenance.steps == STEPS and adapter.provenance.world_size == 2
    assert adapter.provenance.prepared_fingerprint == setup.prepared.manifest.fingerprint
    assert adapter.provenance.weighting["weighting"] == "gift"
    final_tag = tag_for(STEPS)
    assert (cfg.paths.checkpoints / LATEST_NAME).read_text().strip() == final_tag
    assert sorted(p.name for p in cfg.paths.checkpoints.glob("step-*")) == [tag_for(SAVE_EVERY), final_tag]
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(cfg.paths.checkpoints), tag=final_tag)
    # The engine runs a loss wrapper around the peft model, hence the "peft_model." prefix.
    lora = {name.removeprefix("peft_model.").replace(".default.", "."): t
            for name, t in consolidated.items() if ".lora_" in name}
    assert lora.keys() == adapter.tensors.keys()
    for name, tensor in adapter.tensors.items():
        torch.testing.assert_close(tensor, lora[name].float(), rtol=0, atol=0, msg=name)
    assert any(t.abs().max() > 0 for n, t in adapter.tensors.items() if "lora_B" in n)  # it trained
    in_checkpoint = read_adapter(cfg.paths.checkpoints / final_tag / "adapter")
    for name, tensor in adapter.tensors.items():
        assert torch.equal(tensor, in_checkpoint.tensors[name])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup.pair.base), cfg.paths.adapter)
    loaded = {n.replace(".default.", "."): p for n, p in model.named_parameters() if ".lora_" in n}
    for name, tensor in adapter.tensors.items():
        assert torch.equal(loaded[name].detach(), tensor)


def test_sigterm_saves_and_resume_reproduces_the_loss_curve(reference, setup, tmp_path):
    conf_dir = Path(os.path.realpath(reference[0].paths.confidence))
    cfg = run_config(setup, tmp_path / "run", confidence=conf_dir, save_every_steps=SAVE_EVERY,
                     sharding=reference[0].train.sharding)
    proc = launch(cfg, 2, wait=False)
    metrics = cfg.paths.logs / METRICS_NAME
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not read_metrics(metrics) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)  # like a cloud preemption: every process of the job is signalled
    output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    stopped_at = read_metrics(metrics)[-1]["step"]
    assert stopped_at < STEPS, "the run finished before the signal arrived"
    assert f"PREEMPTED at step {stopped_at}/{STEPS}" in output
    assert (cfg.paths.checkpoints / LATEST_NAME).read_text().strip() == tag_for(stopped_at)
    record = json.loads((cfg.paths.checkpoints / tag_for(stopped_at) / RECORD_NAME).read_text())
    assert record["step"] == stopped_at and record["world_size"] == 2
    assert not read_adapter(cfg.paths.checkpoints / tag_for(stopped_at) / "adapter").provenance.complete
    assert not cfg.paths.adapter.exists()

    launch(cfg, 2, "--resume")
    resumed, uninterrupted = losses(cfg), losses(reference[0])
    assert len(resumed) == STEPS
    assert resumed == pytest.approx(uninterrupted, rel=1e-5)


def test_resume_of_a_run_at_its_last_step_says_it_is_complete(setup, tmp_path, single_rank):
    """`train --resume` on a run whose latest checkpoint is its last step trains nothing, writes the adapter from
    that checkpoint and says so (exit 0), instead of failing to format the loss of a step that never ran."""
    from gift_dist.train.recipe import train

    cfg = run_config(setup, tmp_path / "run", weighting="uniform", max_steps=2, save_every_steps=2,
                     sharding="replicate")
    first = train(cfg)
    trained = read_adapter(first.adapter).tensors
    output = launch(cfg, 1, "--resume")
    assert "already complete at step 2/2, nothing to train" in output and "TypeError" not in output
    resumed = read_adapter(cfg.paths.adapter)
    assert resumed.provenance.complete and resumed.provenance.steps == 2
    for name, tensor in trained.items():
        assert torch.equal(resumed.tensors[name], tensor), name
    assert [row["step"] for row in read_metrics(cfg.paths.logs / METRICS_NAME)] == [1, 2]


def test_resume_from_a_chosen_checkpoint_folder(setup, tmp_path, single_rank):
    """`train --resume PATH` continues from that checkpoint, not from `latest`: resumed at step 1 of a 3-step run
    whose latest is step 3, it trains steps 2-3 again, to the same losses as the unbroken run."""
    from gift_dist.train.recipe import train

    cfg = run_config(setup, tmp_path / "run", weighting="uniform", max_steps=3, save_every_steps=1,
                     sharding="replicate")
    cfg.train.keep_checkpoints = 3
    train(cfg)
    unbroken = losses(cfg)
    assert (cfg.paths.checkpoints / LATEST_NAME).read_text().strip() == tag_for(3)
    output = launch(cfg, 1, "--resume", str(cfg.paths.checkpoints / tag_for(1)))
    assert f"resumed from {cfg.paths.checkpoints / tag_for(1)} at step 1" in output
    assert [row["step"] for row in read_metrics(cfg.paths.logs / METRICS_NAME)] == [1, 2, 3]
    assert losses(cfg) == pytest.approx(unbroken, rel=1e-5)
    with pytest.raises(ContractError, match=r"--resume .*not a checkpoint folder.*names step-00000003"):
        train(cfg, resume=cfg.paths.checkpoints)


# ---- bad input: the recipe in-process on one rank, errors must be clean ContractErrors naming the culprit ----

def test_confidence_of_another_prepared_dataset_is_refused(setup, tmp_path, single_rank, capsys):
    from gift_dist.cli import main

    conf_dir = tmp_path / "confidence"
    write_confidence(setup, conf_dir, shards=[0], fingerprint="0123456789abcdef")
    cfg = run_config(setup, tmp_path / "run", confidence=conf_dir, max_steps=1)
    config_file = tmp_path / "run.yaml"
    dump_config(cfg, config_file)
    assert main(["train", "--config", str(config_file)]) == 2
    error = capsys.readouterr().err
    assert "0123456789abcdef" in error and setup.prepared.manifest.fingerprint in error


def test_confidence_scored_by_the_base_model_is_refused(setup, tmp_path, single_rank):
    """Base and instruct have equal shapes and configs; only their weights tell them apart."""
    from gift_dist.train.recipe import train

    conf_dir = tmp_path / "confidence"
    manifest = confidence_manifest(setup)
    manifest.instruct_model = model_identity(str(setup.pair.base))  # what `score` records when given the base
    manifest = conf.init_manifest(conf_dir, manifest)
    for index in range(manifest.num_shards):
        conf.write_shard(conf_dir, manifest, index, *shard_tensors(setup, index))
    cfg = run_config(setup, tmp_path / "run", confidence=conf_dir, max_steps=1)
    with pytest.raises(ContractError, match=r"was scored by instruct model .*base.* not .*instruct"):
        train(cfg)


def test_metrics_run_config_and_confidence_summary_reach_weights_and_biases_offline(setup, tmp_path, single_rank,
                                                                                    monkeypatch, caplog):
    """train.report_to=[tensorboard, wandb] with WANDB_MODE=offline: the W&B run (in logs/, named after the run)
    holds the run config, the method as tags, every step's metrics as the JSONL has them, and the scorer's
    confidence summary; TensorBoard, when not installed, is skipped with a warning instead of failing the run."""
    import importlib.util

    from gift_dist.train.recipe import train

    if importlib.util.find_spec("wandb") is None:
        pytest.fail("wandb is missing: pip install -c constraints.txt -e '.[test]' installs it")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    conf_dir = tmp_path / "confidence"
    manifest = conf.init_manifest(conf_dir, confidence_manifest(setup))
    for index in range(manifest.num_shards):
        conf.write_shard(conf_dir, manifest, index, *shard_tensors(setup, index))
    (conf_dir / conf.SUMMARY_NAME).write_text(json.dumps({"mean_confidence": 0.6180339, "low_confidence_share": 0.125,
                                                          "tokens": 4321, "samples": 12}))
    cfg = run_config(setup, tmp_path / "run", confidence=conf_dir, max_steps=3, report_to="[tensorboard,wandb]",
                     wandb_project="gift-test")
    with caplog.at_level("WARNING", logger="gift_dist.train.metrics"):
        train(cfg)
    assert (cfg.paths.logs / "tensorboard").is_dir() or "tensorboard but it is not installed" in caplog.text
    (run_file,) = (cfg.paths.logs / "wandb").glob("offline-run-*/run-*.wandb")
    # W&B's offline log is a sequence of protobuf records: their strings and JSON values are stored as they are.
    recorded = run_file.read_bytes()
    for row in read_metrics(cfg.paths.logs / METRICS_NAME):
        for key in ("loss", "ce", "mean_weight"):
            assert f"train/{key}".encode() in recorded and json.dumps(row[key]).encode() in recorded, (row, key)
    assert b"gift-test" in recorded and b'"weighting"' in recorded and b"train_model:base" in recorded
    assert b"confidence/mean_confidence" in recorded and b"0.6180339" in recorded


def test_missing_shard_after_the_wait_is_an_error_naming_it(setup, tmp_path, single_rank):
    from gift_dist.train.recipe import train

    conf_dir = tmp_path / "confidence"
    write_confidence(setup, conf_dir, shards=[])
    cfg = run_config(setup, tmp_path / "run", confidence=conf_dir, max_steps=1, confidence_wait_seconds=1)
    with pytest.raises(ContractError, match="shard 0"):
        train(cfg)


def test_logprob_count_not_matching_the_targets_is_an_error(setup, tmp_path, single_rank):
    from gift_dist.train.recipe import train

    conf_dir = tmp_path / "confidence"
    manifest = conf.init_manifest(conf_dir, confidence_manifest(setup))
    conf.write_shard(conf_dir, manifest, 0, *shard_tensors(setup, 0, extra_token_for=3))
    cfg = run_config(setup, tmp_path / "run", confidence=conf_dir, max_steps=1)
    want = setup.prepared.dataset[3]["num_target_tokens"]
    with pytest.raises(ContractError, match=f"sample 3 has {want + 1} logprobs but {want} target tokens"):
        train(cfg)


def test_non_finite_confidence_is_an_error_naming_the_sample(setup, tmp_path, single_rank):
    """A shard that bypassed the writer's checks (NaN logprob for sample 5) must not reach the loss."""
    from safetensors.torch import save_file

    from gift_dist.train.recipe import train

    conf_dir = tmp_path / "confidence"
    manifest = conf.init_manifest(conf_dir, confidence_manifest(setup))
    sample_index, offsets, logprobs = shard_tensors(setup, 0)
    logprobs[int(offsets[5]) + 1] = float("nan")
    path = conf_dir / conf.shard_filename(0)
    save_file({"sample_index": sample_index, "offsets": offsets, "logprobs": logprobs}, str(path), metadata={
        "format": conf.FORMAT, "version": str(conf.VERSION), "prepared_fingerprint": manifest.prepared_fingerprint,
        "instruct_model": manifest.instruct_model["name"], "instruct_model_hash": manifest.instruct_model["hash"],
        "dtype": "float32", "shard_index": "0"})
    manifest.shards[0] = conf.ShardRecord(0, path.name, file_sha256(path), int(sample_index.numel()),
                                          int(logprobs.numel()))
    (conf_dir / conf.MANIFEST_NAME).write_text(json.dumps(manifest.to_json()))
    cfg = run_config(setup, tmp_path / "run", confidence=conf_dir, max_steps=1)
    with pytest.raises(ContractError, match="non-finite logprob for sample 5"):
        train(cfg)


def test_train_refuses_a_base_whose_tokenizer_does_not_pair_with_the_instruct_model(setup, tmp_path, single_rank):
    import shutil

    from gift_dist.models.pair import PairMismatch
    from gift_dist.tiny_pairs import build_tokenizer
    from gift_dist.train.recipe import train

    base = tmp_path / "base"
    shutil.copytree(setup.pair.base, base)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (base / name).unlink(missing_ok=True)
    build_tokenizer(base, ["a quite different corpus of words, numbers 123 and more words"] * 20)
    cfg = run_config(setup, tmp_path / "run", weighting="uniform", max_steps=1)
    cfg.base_model = str(base)
    with pytest.raises(PairMismatch, match="tokenizer vocabularies differ"):
        train(cfg)
    assert not cfg.paths.checkpoints.exists() and not cfg.paths.logs.exists()


# ---- in-process single-rank runs ----

def test_train_refuses_prepared_data_whose_manifest_was_edited_or_made_otherwise(setup, tmp_path, single_rank):
    """A hand-edited prepared.json (here: claiming another max_length) and a config whose prepare settings differ
    from the data's are both named before any model loads, uniform weighting included (no confidence involved)."""
    import shutil

    from gift_dist.contracts.prepared import MANIFEST_NAME
    from gift_dist.train.recipe import train

    cfg = run_config(setup, tmp_path / "run", weighting="uniform", max_steps=1)
    (cfg.paths.prepared).unlink()
    shutil.copytree(setup.prepared_dir, cfg.paths.prepared)
    manifest = cfg.paths.prepared / MANIFEST_NAME
    data = json.loads(manifest.read_text())
    data["settings"]["prepare"]["max_length"] = 64
    manifest.write_text(json.dumps(data))
    with pytest.raises(ContractError, match=r"setting prepare.max_length: 64 -> 128"):
        train(cfg)
    other = run_config(setup, tmp_path / "other", weighting="uniform", max_steps=1)
    other.prepare.train_on = "last_assistant"
    with pytest.raises(ContractError, match=r"setting prepare.train_on: 'all_assistant' -> 'last_assistant'"):
        train(other)
    assert not cfg.paths.checkpoints.exists() and not other.paths.adapter.exists()


def test_dft_trains_without_a_confidence_folder(setup, tmp_path, single_rank):
    from gift_dist.train.recipe import train

    cfg = run_config(setup, tmp_path / "run", weighting="dft", normalizer="token_count", max_steps=2,
                     micro_batch_size=2, gradient_accumulation_steps=2)
    result = train(cfg)
    assert not cfg.paths.confidence.exists()
    assert result.steps == 2 and not result.preempted
    rows = read_metrics(cfg.paths.logs / METRICS_NAME)
    assert [row["step"] for row in rows] == [1, 2]
    assert all(0.0 < row["mean_weight"] < 1.0 for row in rows)  # the model's own p, not 1
    assert read_adapter(result.adapter).provenance.weighting["weighting"] == "dft"


def test_a_token_budget_per_micro_batch_trains_and_is_recorded(setup, tmp_path, single_rank):
    """train.micro_batch_tokens: micro-batches are filled up to the budget (their sample counts vary) and the
    budget is a result setting, so a resume with another one is refused."""
    from gift_dist.train.recipe import train

    budget = 2 * max(setup.prepared.dataset["num_tokens"])
    cfg = run_config(setup, tmp_path / "run", weighting="uniform", max_steps=3, micro_batch_tokens=budget,
                     gradient_accumulation_steps=2, save_every_steps=3)
    result = train(cfg)
    assert result.steps == 3 and not result.preempted
    assert read_adapter(result.adapter).provenance.train_config["micro_batch_tokens"] == budget
    rows = read_metrics(cfg.paths.logs / METRICS_NAME)
    assert all(math.isfinite(row["loss"]) and row["target_tokens"] > 0 for row in rows)
    changed = run_config(setup, tmp_path / "run2", weighting="uniform", max_steps=3, micro_batch_tokens=budget + 1,
                         gradient_accumulation_steps=2)
    import shutil

    shutil.copytree(cfg.paths.checkpoints, changed.paths.checkpoints)
    with pytest.raises(ContractError, match=rf"train.micro_batch_tokens: {budget} -> {budget + 1}"):
        train(changed, resume=True)


def test_checkpoints_hold_no_frozen_weights_and_a_corrupt_file_is_refused_on_resume(setup, tmp_path, single_rank):
    """A replicated run's checkpoint holds the LoRA (weights and optimizer), not the frozen base; every file's
    sha256 is recorded, so a flipped byte is named on resume before DeepSpeed unpickles anything; an intact copy
    resumes and trains on."""
    import shutil

    from gift_dist.contracts.checkpoint import RECORD_NAME, tag_for
    from gift_dist.train.recipe import train

    cfg = run_config(setup, tmp_path / "run", weighting="uniform", max_steps=2, save_every_steps=2,
                     sharding="replicate")
    train(cfg)
    folder = cfg.paths.checkpoints / tag_for(2)
    model_states = next(folder.glob("mp_rank_*_model_states.pt"))
    saved = torch.load(model_states, map_location="cpu", weights_only=False)["module"]  # written by this test
    assert saved and all("lora_" in name for name in saved), sorted(saved)[:5]
    recorded = json.loads((folder / RECORD_NAME).read_text())["file_sha256"]
    assert model_states.name in recorded and "adapter/adapter_model.safetensors" in recorded
    assert "optimizer_state.safetensors" in recorded  # the LoRA's AdamW state, for a resume at another world size

    intact = run_config(setup, tmp_path / "intact", weighting="uniform", max_steps=3, save_every_steps=2,
                        sharding="replicate")
    shutil.copytree(cfg.paths.checkpoints, intact.paths.checkpoints)
    corrupt = run_config(setup, tmp_path / "corrupt", weighting="uniform", max_steps=2, save_every_steps=2,
                         sharding="replicate")
    shutil.copytree(cfg.paths.checkpoints, corrupt.paths.checkpoints)
    optimizer = next((corrupt.paths.checkpoints / tag_for(2)).glob("*optim_states.pt"))
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optimizer.write_bytes(bytes(data))
    with pytest.raises(ContractError, match=rf"{optimizer.name} does not match its recorded sha256"):
        train(corrupt, resume=True)
    result = train(intact, resume_anyway=True)
    assert result.steps == 3 and torch.isfinite(torch.tensor(result.final_loss))


def test_held_out_ce_is_logged_and_equals_an_independent_computation(setup, tmp_path, single_rank):
    """The trainer's held-out CE and GIFT-weighted CE at the last step equal peft's model with the saved adapter
    (full logits) weighted by the scorer's held-out confidence (confidence/eval)."""
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from gift_dist.bundled import bundled_data_path, read_jsonl, write_jsonl
    from gift_dist.contracts.prepared import load_eval_split
    from gift_dist.prepare.stage import prepare
    from gift_dist.train.recipe import train

    data = write_jsonl(read_jsonl(bundled_data_path())[:48], tmp_path / "data.jsonl")
    cfg = load_config(None, [f"base_model={setup.pair.base}", f"instruct_model={setup.pair.instruct}",
                             f"output_dir={tmp_path / 'run'}", "prepare.max_length=128",
                             "prepare.eval_fraction=0.25", f"data.files=[{data}]", "train.weighting=gift",
                             "train.micro_batch_size=4", "train.max_steps=3", "train.eval_every_steps=2",
                             "train.learning_rate=1e-2", "train.lora.r=4", "train.progress=false",
                             "score.progress=false"])
    from gift_dist.score.stage import score

    prepare(cfg)
    score(cfg)
    train(cfg)
    rows = read_metrics(cfg.paths.logs / METRICS_NAME)
    assert [row["step"] for row in rows if "eval_ce" in row] == [2, 3]
    held_out = load_eval_split(cfg.paths.prepared)
    conf_dir = cfg.paths.confidence / conf.EVAL_DIR
    manifest = conf.read_manifest(conf_dir)
    assert manifest.complete and manifest.num_shards == len(held_out.manifest.shards)
    logprobs = torch.cat([conf.read_shard(conf_dir, manifest, i).logprobs for i in sorted(manifest.shards)])
    eos = set(held_out.manifest.eos_token_ids)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup.pair.base), cfg.paths.adapter).eval()
    total, count, weighted, weights = 0.0, 0, 0.0, 0.0
    with torch.no_grad():
        for row in held_out.dataset:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            logits = model(input_ids=ids).logits[0, :-1].float()
            keep = labels[0, 1:] != -100
            ce = F.cross_entropy(logits[keep], labels[0, 1:][keep], reduction="none")
            p = logprobs[count:count + ce.numel()].exp()
            # GIFT's reference weights: max(p, 1e-4)^1, the end-of-turn target at weight 1.
            w = torch.where(torch.isin(labels[0, 1:][keep], torch.tensor(sorted(eos))), torch.ones_like(p),
                            p.clamp_min(1e-4))
            total, count = total + float(ce.sum()), count + ce.numel()
            weighted, weights = weighted + float((w * ce).sum()), weights + float(w.sum())
    assert count == logprobs.numel() and rows[-1]["eval_target_tokens"] == count
    assert rows[-1]["eval_ce"] == pytest.approx(total / count, rel=1e-4)
    assert rows[-1]["eval_weighted_ce"] == pytest.approx(weighted / weights, rel=1e-4)
    assert rows[-1]["eval_weighted_ce"] != pytest.approx(rows[-1]["eval_ce"], rel=1e-3)
    evaluated = [row["eval_ce"] for row in rows if "eval_ce" in row]
    assert evaluated[0] != evaluated[-1]  # the adapter moved between the two


@pytest.mark.parametrize("sharding", ["replicate", "zero3"])
def test_bf16_lora_computes_in_bf16_and_the_adapter_keeps_the_fp32_masters(setup, tmp_path, single_rank, sharding):
    """bf16 (what GPUs run; the CPU accelerator runs it too): LoRA GEMMs in bf16, no fp32 copies of the layers'
    inputs, while the optimizer and the saved adapter hold the fp32 master weights."""
    from deepspeed.utils import safe_get_full_fp32_param

    from gift_dist.train.engine import build_engine, resolve_ds_config
    from gift_dist.train.recipe import train_step

    ds_config = json.loads(resolve_ds_config(sharding).read_text())
    ds_config["bf16"]["enabled"] = True
    (tmp_path / "bf16.json").write_text(json.dumps(ds_config))
    cfg = run_config(setup, tmp_path / "run", weighting="uniform", max_steps=2, sharding=sharding,
                     ds_config=str(tmp_path / "bf16.json"), learning_rate=1e-3)
    from gift_dist import dist
    from gift_dist.contracts.prepared import load_prepared
    from gift_dist.train.data import TrainBatches

    dist.init(use_deepspeed=True)
    batches = TrainBatches(load_prepared(cfg.paths.prepared), cfg.train, 0, 1, None, seed=0)
    te = build_engine(cfg, 1, batches.total_steps)
    lora = te.lora_parameters
    assert lora and {p.dtype for _, p in lora} == {torch.bfloat16}
    values = train_step(te, cfg, batches.micro_batches(0), 1, None, 1)
    assert torch.isfinite(torch.tensor(values["loss"])) and values["grad_norm"] is not None
    masters = {name: safe_get_full_fp32_param(p) for name, p in lora}
    assert {m.dtype for m in masters.values()} == {torch.float32}
    # lora_B starts at zero and moves in step 1; its fp32 masters hold digits no bf16 copy can.
    trained = [m for name, m in masters.items() if "lora_B" in name]
    assert any(m.abs().max() > 0 and not torch.equal(m, m.bfloat16().float()) for m in trained)
    from gift_dist.train.adapter_io import gather_lora

    gathered = gather_lora(te.peft_model)
    state_name = {name: name.replace(".default.", ".") for name, _ in lora}
    for name, master in masters.items():
        assert torch.equal(gathered[state_name[name]], master.cpu())


def _resume_from(source: RunConfig, step: int, cfg: RunConfig) -> None:
    """A new run folder holding ``source``'s checkpoint of ``step`` as its latest, and its metrics up to there."""
    import shutil

    shutil.copytree(source.paths.checkpoints / tag_for(step), cfg.paths.checkpoints / tag_for(step))
    (cfg.paths.checkpoints / LATEST_NAME).write_text(tag_for(step) + "\n")
    cfg.paths.logs.mkdir(parents=True, exist_ok=True)
    shutil.copy(source.paths.logs / METRICS_NAME, cfg.paths.logs / METRICS_NAME)


def test_resume_on_another_number_of_ranks_loads_the_gathered_lora(reference, setup, tmp_path, single_rank, caplog):
    """The 2-rank reference checkpoints resumed by 1 rank x GA 2 (same global batch): LoRA from the gathered
    adapter, AdamW's moments and step count from the gathered optimizer state. From the mid-run checkpoint the
    remaining steps' losses are the unbroken run's; a version-1 checkpoint (no optimizer state) still resumes,
    with a warning that the moments restart."""
    import shutil

    from gift_dist.contracts.checkpoint import OPTIMIZER_STATE_NAME, VERSION
    from gift_dist.train.recipe import train

    ref = reference[0]
    confidence = Path(os.path.realpath(ref.paths.confidence))
    mid = run_config(setup, tmp_path / "mid", confidence=confidence, gradient_accumulation_steps=2,
                     save_every_steps=SAVE_EVERY, sharding=ref.train.sharding)
    _resume_from(ref, SAVE_EVERY, mid)
    record = json.loads((mid.paths.checkpoints / tag_for(SAVE_EVERY) / RECORD_NAME).read_text())
    assert record["version"] == VERSION and OPTIMIZER_STATE_NAME in record["file_sha256"]
    with caplog.at_level("INFO", logger="gift_dist.train.checkpointing"):
        result = train(mid, resume=True)
    assert result.steps == STEPS and "FRESH optimizer" not in caplog.text
    assert "AdamW state (step count 4)" in caplog.text
    # Steps 5..8 on 1 rank x GA 2 after the 2-rank checkpoint of step 4: the unbroken 2-rank run's losses.
    assert [row["step"] for row in read_metrics(mid.paths.logs / METRICS_NAME)] == list(range(1, STEPS + 1))
    assert losses(mid) == pytest.approx(losses(ref), rel=1e-5)
    assert read_adapter(result.adapter).provenance.world_size == 1

    cfg = run_config(setup, tmp_path / "run", confidence=confidence,
                     gradient_accumulation_steps=2, save_every_steps=SAVE_EVERY, sharding=ref.train.sharding)
    shutil.copytree(ref.paths.checkpoints, cfg.paths.checkpoints)
    result = train(cfg, resume=True)
    assert result.steps == STEPS
    resumed, saved = read_adapter(result.adapter), read_adapter(ref.paths.checkpoints / tag_for(STEPS) / "adapter")
    assert resumed.provenance.world_size == 1 and resumed.provenance.complete
    for name, tensor in saved.tensors.items():
        assert torch.equal(resumed.tensors[name], tensor), name

    # A checkpoint written before the optimizer state was saved (format version 1) resumes as it did then.
    old = run_config(setup, tmp_path / "old", confidence=confidence, gradient_accumulation_steps=2,
                     save_every_steps=SAVE_EVERY, sharding=ref.train.sharding)
    _resume_from(ref, SAVE_EVERY, old)
    folder = old.paths.checkpoints / tag_for(SAVE_EVERY)
    (folder / OPTIMIZER_STATE_NAME).unlink()
    record = json.loads((folder / RECORD_NAME).read_text())
    del record["file_sha256"][OPTIMIZER_STATE_NAME]
    (folder / RECORD_NAME).write_text(json.dumps({**record, "version": 1}))
    caplog.clear()
    with caplog.at_level("INFO", logger="gift_dist.train.checkpointing"):
        result = train(old, resume=True)
    assert result.steps == STEPS
    assert "FRESH optimizer state, because it was written by checkpoint format version 1" in caplog.text
    # The first resumed step starts from the same weights; the later ones miss the moments (what the new
    # optimizer state restores).
    assert losses(old)[:SAVE_EVERY + 1] == pytest.approx(losses(ref)[:SAVE_EVERY + 1], rel=1e-5)
    assert losses(old)[SAVE_EVERY + 1:] != pytest.approx(losses(ref)[SAVE_EVERY + 1:], rel=1e-5)

    other_batch = run_config(setup, tmp_path / "other", confidence=Path(os.path.realpath(ref.paths.confidence)),
                             sharding=ref.train.sharding)
    shutil.copytree(ref.paths.checkpoints, other_batch.paths.checkpoints)
    with pytest.raises(ContractError, match=r"global batch of 4 samples \(2 ranks\); this run has 2 \(1 ranks\)"):
        train(other_batch, resume=True)
