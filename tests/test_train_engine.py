"""Single-process tests of the training engine pieces: DeepSpeed config, LoRA targets, checkpoints, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gift_dist.config import ConfigError, load_config
from gift_dist.contracts import ContractError
from gift_dist.contracts.checkpoint import LATEST_NAME, RECORD_NAME, CheckpointRecord, tag_for
from gift_dist.memory_plan import ModelShape
from gift_dist.train.checkpointing import Checkpoints
from gift_dist.train.engine import (
    build_ds_config,
    choose_layout,
    resolve_ds_config,
)
from gift_dist.models.lora_targets import resolve_target_modules
from gift_dist.train.metrics import (
    CURVE_NAME,
    METRICS_NAME,
    MetricsLogger,
    read_metrics,
)

REPO = Path(__file__).resolve().parents[1]


def _train_cfg(**overrides):
    return load_config(None, [f"train.{k}={v}" for k, v in overrides.items()]).train


def _run_cfg(**overrides):
    return load_config(None, [f"train.{k}={v}" for k, v in overrides.items()])


def _shape(**changes) -> ModelShape:
    """A Llama-3-8B-like shape (no model needed to fill the ZeRO-3 sizes)."""
    values = dict(name="m", total_params=8_030_000_000, largest_layer_params=525_336_576,
                  decoder_layer_params=218_112_000, lora_params=41_943_040, largest_lora_tensor=16 * 14336,
                  hidden_size=4096, intermediate_size=14336, num_layers=32, vocab_size=128256,
                  largest_shard_bytes=None)
    values.update(changes)
    return ModelShape(**values)


def _build(train, ds_config: str, world: int, total_steps: int, shape=None):
    cfg = _run_cfg()
    cfg.train = train
    cfg.train.ds_config = ds_config
    return build_ds_config(train, choose_layout(cfg, world), world, total_steps, shape or _shape())


@pytest.mark.parametrize("name", ["replicate", "zero3", "zero3_offload", "zero3_nvme", "zero3_multinode",
                                  "zero3.json"])
def test_shipped_ds_configs_resolve_and_fill(name):
    path = resolve_ds_config(name)
    assert path.is_file() and path.parent.name == "ds_configs"
    train = _train_cfg(micro_batch_size=3, gradient_accumulation_steps=5, learning_rate=1e-3, max_grad_norm=0.5,
                       weight_decay=0.1, nvme_path="/nvme/gift")
    config = _build(train, name, world=4, total_steps=100)
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 5
    assert config["train_batch_size"] == 3 * 5 * 4
    assert config["gradient_clipping"] == 0.5
    assert config["optimizer"]["params"]["lr"] == 1e-3
    assert config["optimizer"]["params"]["weight_decay"] == 0.1
    assert config["bf16"]["enabled"] is torch.cuda.is_available()
    assert config["zero_optimization"]["stage"] == (1 if name == "replicate" else 3)
    assert "auto" not in json.dumps(config)


def test_nvme_path_is_a_setting_and_zero3_nvme_is_refused_without_it(tmp_path):
    """The shipped zero3_nvme.json names no machine's folder: train.nvme_path fills its "auto" nvme_path, and
    without it the layout is refused naming the setting; a user ds_config's own path must agree with the setting."""
    assert json.loads(resolve_ds_config("zero3_nvme").read_text())["zero_optimization"]["offload_param"][
        "nvme_path"] == "auto"
    with pytest.raises(ConfigError, match=r"train\.nvme_path"):
        _build(_train_cfg(), "zero3_nvme", world=8, total_steps=10)
    zero = _build(_train_cfg(nvme_path="/scratch/nvme0"), "zero3_nvme", world=8, total_steps=10)["zero_optimization"]
    assert zero["offload_param"] == {**zero["offload_param"], "device": "nvme", "nvme_path": "/scratch/nvme0"}
    own = json.loads(resolve_ds_config("zero3_nvme").read_text())
    own["zero_optimization"]["offload_param"]["nvme_path"] = "/mine"
    (tmp_path / "own.json").write_text(json.dumps(own))
    assert _build(_train_cfg(), str(tmp_path / "own.json"), world=8, total_steps=10)["zero_optimization"][
        "offload_param"]["nvme_path"] == "/mine"
    with pytest.raises(ConfigError, match=r"offload_param\.nvme_path='/mine' but the run config gives '/other'"):
        _build(_train_cfg(nvme_path="/other"), str(tmp_path / "own.json"), world=8, total_steps=10)
    # Other layouts ignore it.
    assert "nvme" not in json.dumps(_build(_train_cfg(nvme_path="/x"), "zero3", world=8, total_steps=10))


def test_default_optimizer_is_torch_adamw_never_a_jit_built_op():
    for name in ("replicate", "zero3"):
        params = _build(_train_cfg(), name, world=1, total_steps=10)["optimizer"]["params"]
        assert params["torch_adam"] is True
        assert params.get("fused", False) is torch.cuda.is_available()
    # Offloaded optimizer state keeps DeepSpeed's CPU Adam, which is what offloading is for.
    assert "torch_adam" not in _build(_train_cfg(), "zero3_offload", world=1, total_steps=10)["optimizer"]["params"]


def test_zero3_sizes_come_from_the_model_shape():
    shape = _shape()
    zero = _build(_train_cfg(), "zero3", world=8, total_steps=10, shape=shape)["zero_optimization"]
    # LoRA tensors whole on every rank; one decoder layer prefetched; ZeRO-3's per-tensor linear off.
    assert zero["stage3_param_persistence_threshold"] > shape.largest_lora_tensor
    assert zero["stage3_prefetch_bucket_size"] == shape.decoder_layer_params
    assert zero["stage3_max_live_parameters"] == 3 * shape.decoder_layer_params
    assert zero["memory_efficient_linear"] is False


def test_layout_follows_sharding_and_refuses_a_contradicting_ds_config():
    assert choose_layout(_run_cfg(sharding="zero3"), 1).ds_config.name == "zero3.json"
    assert choose_layout(_run_cfg(sharding="replicate"), 1).ds_config.name == "replicate.json"
    assert choose_layout(_run_cfg(ds_config="zero3_offload"), 1).sharding == "zero3"
    if not torch.cuda.is_available():
        assert choose_layout(_run_cfg(), 1).sharding == "replicate"
    with pytest.raises(ConfigError, match=r"train.sharding=replicate but train.ds_config=zero3 .*\(ZeRO stage 3\)"):
        choose_layout(_run_cfg(sharding="replicate", ds_config="zero3"), 1)


def test_checkpointing_auto_recomputes_only_when_the_activations_would_not_fit(monkeypatch):
    """On an 80 GiB GPU, an 8B base with micro-batches of 2k tokens keeps its activations (no recompute); with
    16k tokens they would need ~150 GiB, so it recomputes. Explicit settings win; off a GPU it stays on."""
    from gift_dist.train import engine

    def resolve(*overrides):
        cfg = load_config(None, ["train.sharding=replicate", *overrides])
        return engine.choose_checkpointing(cfg, choose_layout(cfg, 1, _shape()), 1, _shape())

    assert resolve("train.micro_batch_size=1", "prepare.max_length=2048") == (True, "auto: not on a GPU")
    monkeypatch.setattr(engine, "on_gpu", lambda: True)
    monkeypatch.setattr(engine, "gpu_memory_gib", lambda: 80.0)
    off, reason = resolve("train.micro_batch_size=1", "prepare.max_length=2048")
    assert not off and "up to 2048 tokens" in reason and "within a 80 GiB GPU" in reason
    on, reason = resolve("train.micro_batch_size=4", "prepare.max_length=4096")
    assert on and "up to 16384 tokens" in reason and "more than 90%" in reason
    assert resolve("train.micro_batch_size=1", "prepare.max_length=2048", "train.gradient_checkpointing=true")[0]
    assert not resolve("train.micro_batch_size=4", "train.gradient_checkpointing=false")[0]


def test_ds_config_by_path_and_unknown_name(tmp_path):
    own = tmp_path / "mine.json"
    own.write_text((REPO / "ds_configs" / "zero3.json").read_text())
    assert resolve_ds_config(str(own)) == own
    with pytest.raises(ConfigError, match=r"zero3_nope.*shipped: \[.*'replicate'.*'zero3'.*'zero3_nvme'"):
        resolve_ds_config("zero3_nope")


def test_ds_config_contradicting_batch_sizes_names_the_numbers(tmp_path):
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["train_micro_batch_size_per_gpu"] = 8
    config["train_batch_size"] = 64
    path = tmp_path / "fixed.json"
    path.write_text(json.dumps(config))
    train = _train_cfg(micro_batch_size=4, gradient_accumulation_steps=2)
    with pytest.raises(ConfigError) as info:
        _build(train, str(path), world=2, total_steps=10)
    message = str(info.value)
    assert "train_micro_batch_size_per_gpu=8 but the run config gives 4" in message
    assert "train_batch_size (micro x GA x 2 ranks)=64 but the run config gives 16" in message


def test_ds_config_with_an_unknown_zero_stage_is_refused(tmp_path):
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["zero_optimization"]["stage"] = 4
    path = tmp_path / "z4.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="stage=4 is not 0, 1, 2 or 3"):
        _build(_train_cfg(), str(path), world=1, total_steps=10)


def test_explicit_deepspeed_scheduler_gets_its_auto_values(tmp_path):
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["scheduler"] = {"type": "WarmupDecayLR", "params": {"warmup_num_steps": "auto", "total_num_steps": "auto",
                                                               "warmup_max_lr": "auto"}}
    path = tmp_path / "sched.json"
    path.write_text(json.dumps(config))
    filled = _build(_train_cfg(warmup_steps=3, learning_rate=5e-4), str(path), world=1, total_steps=40)
    assert filled["scheduler"]["params"] == {"warmup_num_steps": 3, "total_num_steps": 40, "warmup_max_lr": 5e-4}


def test_unknown_lora_targets_are_refused_listing_the_linear_layers():
    from transformers import AutoModelForCausalLM

    from gift_dist.tiny_pairs import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=384))
    assert resolve_target_modules(model, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match=r"\['not_a_layer'\] name no linear layer"):  # one unknown name is enough
        resolve_target_modules(model, ["q_proj", "not_a_layer"])
    with pytest.raises(ConfigError) as info:
        resolve_target_modules(model, ["query_key_value", "dense"])
    message = str(info.value)
    assert "name no linear layer of this model" in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in message


def _record(step=4, world=2, gbs=8, model_hash="h1", fingerprint="fp1", train_model="base", **train):
    from gift_dist.train.recipe import adapter_result_settings

    return CheckpointRecord(step=step, world_size=world, global_batch_size=gbs,
                            model_identity={"name": "m", "hash": model_hash}, prepared_fingerprint=fingerprint,
                            train_model=train_model, train_settings=adapter_result_settings(_train_cfg(**train)))


def _fake_checkpoint(root: Path, record: CheckpointRecord) -> None:
    from dataclasses import asdict

    folder = root / tag_for(record.step)
    folder.mkdir(parents=True)
    (folder / RECORD_NAME).write_text(json.dumps(asdict(record)))
    (root / LATEST_NAME).write_text(tag_for(record.step) + "\n")


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    checkpoints = Checkpoints(tmp_path / "checkpoints", keep=2)
    assert checkpoints.latest() is None
    with pytest.raises(ContractError, match=r"no checkpoint in .*checkpoints.*--resume-if-exists"):
        checkpoints.resume(engine=None, peft_model=None, expected=_record())


@pytest.mark.parametrize("expected, pattern", [
    (_record(model_hash="other"), r"trained on m \(hash h1\), this run trains m \(hash other\)"),
    (_record(fingerprint="fp2"), r"prepared data fp1, this run's prepared data is fp2"),
    (_record(train_model="instruct"), r"trains the base model, this run the instruct model"),
    (_record(world=4, gbs=16), r"global batch of 8 samples \(2 ranks\); this run has 16 \(4 ranks\)"),
    (_record(weighting="uniform"), r"settings differ from the checkpoint's: train.weighting: 'gift' -> 'uniform'"),
    (_record(**{"lora.r": 32}), r"train.lora.r: 16 -> 32"),
    (_record(learning_rate=1e-3), r"train.learning_rate: 0.0002 -> 0.001"),
])
def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, expected, pattern):
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, _record())
    with pytest.raises(ContractError, match=pattern):
        Checkpoints(root, keep=2).resume(engine=None, peft_model=None, expected=expected)


def test_only_the_training_length_may_change_on_resume_and_only_when_asked(tmp_path):
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, _record())
    with pytest.raises(ContractError, match=r"train.max_steps: -1 -> 500.*--resume-anyway accepts a change"):
        Checkpoints(root, keep=2).resume(engine=None, peft_model=None, expected=_record(max_steps=500))
    with pytest.raises(ContractError, match=r"train.weighting"):
        Checkpoints(root, keep=2).resume(engine=None, peft_model=None, anyway=True,
                                         expected=_record(max_steps=500, weighting="uniform"))
    # Operational settings never matter: the same training, logged or saved differently.
    Checkpoints._check(root / tag_for(4), _record(), _record(save_every_steps=7, log_every_steps=3))
    Checkpoints._check(root / tag_for(4), _record(), _record(max_steps=500), anyway=True)


def test_checkpoint_records_of_format_version_1_are_still_read_and_unknown_versions_refused(tmp_path):
    from dataclasses import replace

    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, replace(_record(), version=1))
    assert Checkpoints(root, keep=2).latest()[1].version == 1
    record = json.loads((root / tag_for(4) / RECORD_NAME).read_text())
    (root / tag_for(4) / RECORD_NAME).write_text(json.dumps({**record, "version": 99}))
    with pytest.raises(ContractError, match=r"checkpoint format version 99 is not supported \(this gift_dist reads "
                                            r"version 2\)"):
        Checkpoints(root, keep=2).latest()


def test_latest_pointing_at_a_missing_checkpoint_is_an_error(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / LATEST_NAME).write_text("step-00000007\n")
    with pytest.raises(ContractError, match="step-00000007.*gift_checkpoint.json is missing"):
        Checkpoints(root, keep=2).latest()



def test_a_staged_folder_replacing_another_is_never_lost_by_a_crash(tmp_path, monkeypatch, killed_between_renames):
    """staged_directory (how an adapter or a prepared dataset is replaced): a crash after the old folder is moved
    aside but before the new one is renamed in loses neither; the next write puts the old one back first (so
    even a write that then fails keeps it), and a crash before the aside copy is deleted leaves nothing once the
    next write finishes."""
    import shutil

    from gift_dist.contracts import staged_directory

    out = tmp_path / "adapter"

    def write(text: str) -> None:
        with staged_directory(out) as folder:
            (folder / "weights").write_text(text)

    write("v1")
    with killed_between_renames(out):
        write("v2")
    with pytest.raises(RuntimeError, match="the next write fails"):
        with staged_directory(out):
            raise RuntimeError("the next write fails")
    assert (out / "weights").read_text() == "v1"
    write("v2")

    def crash_while_deleting(path, *args, **kwargs):
        raise KeyboardInterrupt("killed while deleting the old folder")

    monkeypatch.setattr(shutil, "rmtree", crash_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        write("v3")
    monkeypatch.undo()
    assert (out / "weights").read_text() == "v3"
    write("v4")
    assert (out / "weights").read_text() == "v4"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]

def test_metrics_jsonl_curve_and_resume_truncation(tmp_path):
    logger = MetricsLogger(tmp_path, total_steps=4, start_step=0, enabled=True, progress=False)
    for step in range(1, 5):
        logger.log(step, {"loss": 2.0 / step, "ce": 2.5 / step, "lr": 1e-3, "tokens_per_second": 10.0})
    assert logger.close() == tmp_path / CURVE_NAME
    assert (tmp_path / CURVE_NAME).stat().st_size > 0
    assert [row["step"] for row in read_metrics(tmp_path / METRICS_NAME)] == [1, 2, 3, 4]
    # A run resumed from step 2 replaces steps 3..4 instead of appending a second copy.
    resumed = MetricsLogger(tmp_path, total_steps=4, start_step=2, enabled=True, progress=False)
    resumed.log(3, {"loss": 0.1})
    resumed.close()
    rows = read_metrics(tmp_path / METRICS_NAME)
    assert [row["step"] for row in rows] == [1, 2, 3] and rows[-1]["loss"] == 0.1


def test_metrics_disabled_on_other_ranks(tmp_path):
    logger = MetricsLogger(tmp_path, total_steps=2, start_step=0, enabled=False)
    logger.log(1, {"loss": 1.0})
    assert logger.close() is None
    assert not (tmp_path / METRICS_NAME).exists()
