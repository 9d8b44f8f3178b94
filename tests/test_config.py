import re

import pytest

from gift_dist.config import ConfigError, load_config, parse_overrides


def test_defaults_and_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("base_model: b\ninstruct_model: i\ntrain:\n  lora:\n    r: 8\n  learning_rate: 1e-4\n")
    cfg = load_config(path)
    assert cfg.train.lora.r == 8 and cfg.train.learning_rate == 1e-4
    assert cfg.train.weighting == "gift" and cfg.train.prob_floor == 1e-4 and cfg.train.gamma == 1.0
    # relative output_dir resolves against the config's folder
    assert cfg.paths.prepared == tmp_path / "runs/gift/prepared"


def test_overrides_are_typed():
    cfg = load_config(None, ["train.lora.r=4", "train.eos_weight=scored", "prepare.overlength=truncate"])
    assert cfg.train.lora.r == 4 and cfg.train.eos_weight == "scored" and cfg.prepare.overlength == "truncate"
    assert load_config(None, ["train.eos_weight=0.5"]).train.eos_weight == 0.5
    assert parse_overrides(["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learnig_rate=1", "unknown config key 'train.learnig_rate'. Did you mean 'train.learning_rate'?"),
        ("trian.lora.r=1", "unknown config key 'trian'"),
        ("train.lora.r=abc", "train.lora.r"),
        ("train.weighting=magic", "'magic' is not one of"),
        ("prepare.strict=maybe", "prepare.strict"),
        ("novalue", "must look like section.key=value"),
    ],
)
def test_bad_keys_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("[", r"\[")):
        load_config(None, [override])


def test_unknown_key_in_file_lists_valid_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("prepare:\n  max_len: 10\n")
    with pytest.raises(ConfigError, match="prepare.max_len.*Valid keys here: max_length"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_example_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "examples/run.yaml")
    assert cfg.train.weighting == "gift" and cfg.prepare.max_length == 4096


@pytest.mark.parametrize("override, message", [
    ("train.save_every_steps=0", "'train.save_every_steps' must be >= 1, got 0"),
    ("train.epochs=0", "'train.epochs' must be >= 1, got 0"),
    ("train.ce_chunk_tokens=0", "'train.ce_chunk_tokens' must be >= 1, got 0"),
    ("train.learning_rate=-1", "'train.learning_rate' must be a finite number > 0"),
    ("train.max_steps=0", "'train.max_steps' must be -1 (no cap) or >= 1"),
    ("train.gamma=0", "'train.gamma' must be a finite number > 0, got 0.0"),
    ("train.gamma=-1", "'train.gamma' must be a finite number > 0, got -1.0"),
    ("train.gamma=.inf", "'train.gamma' must be a finite number > 0, got inf"),
    ("train.prob_floor=0", "'train.prob_floor' must lie in (0, 1), got 0.0"),
    ("train.prob_floor=1", "'train.prob_floor' must lie in (0, 1), got 1.0"),
    ("train.eos_weight=-1", "'train.eos_weight' must be 'scored' or a finite number >= 0, got -1.0"),
    ("train.eos_weight=.nan", "'train.eos_weight' must be 'scored' or a finite number >= 0, got nan"),
    # issue 21: the clamp's order was checked only once training started.
    ("train.weight_max=0.1 train.weight_min=0.9",
     "'train.weight_min' must be <= 'train.weight_max' (the clamp of the clipped weighting), got 0.9 and 0.1"),
])
def test_train_ranges_are_refused_when_the_config_loads(override, message, capsys):
    """Before any process group, model or data is touched (save_every_steps=0 used to fail after step 1)."""
    from gift_dist.cli import main

    overrides = override.split()
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)
    assert main(["train", *overrides]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command, override, message", [
    ("prepare", "prepare.max_length=0", "'prepare.max_length' must be >= 1, got 0"),
    ("prepare", "prepare.eval_fraction=1", "'prepare.eval_fraction' must lie in [0, 1), got 1.0"),
    ("score", "score.max_batch_tokens=0", "'score.max_batch_tokens' must be >= 1, got 0"),
    ("score", "score.lease_seconds=0", "'score.lease_seconds' must be > 0"),
    # score uses the weight formula's settings too (its token view): refused there before any model is read.
    ("score", "train.prob_floor=0", "'train.prob_floor' must lie in (0, 1), got 0.0"),
    ("score", "train.gamma=0", "'train.gamma' must be a finite number > 0, got 0.0"),
    ("train", "train.lora.r=0", "'train.lora.r' must be >= 1, got 0"),
    ("train", "train.lora.dropout=1.5", "'train.lora.dropout' in [0, 1)"),
    ("merge", "merge.threads=0", "'merge.threads' must be >= 1, got 0"),
    ("merge", "merge.scale=nan", "'merge.scale' must be a finite number"),
    # issue 21: eval's ranges were accepted, some checked only after the models were loaded.
    ("eval", "eval.batch_size=0", "'eval.batch_size' must be >= 1, got 0"),
    ("eval", "eval.max_new_tokens=0", "'eval.max_new_tokens' must be >= 1, got 0"),
    ("eval", "eval.max_generate_samples=-5", "'eval.max_generate_samples' must be >= 0, got -5"),
    ("eval", "eval.max_general_samples=-1", "'eval.max_general_samples' must be >= 1, got -1"),
    ("eval", "eval.lm_eval_limit=0", "'eval.lm_eval_limit' must be >= 1, or null for all documents, got 0"),
    ("eval", "eval.lm_eval_fewshot=-1", "'eval.lm_eval_fewshot' must be >= 0, got -1"),
])
def test_every_sections_ranges_are_refused_when_the_config_loads(command, override, message, capsys):
    """One place per section (its __post_init__), before any file, model or process is touched."""
    from gift_dist.cli import main

    assert main([command, override]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("method, expected", [
    ("gift", {"train_model": "base", "weighting": "gift"}),
    ("shadow-ft", {"train_model": "base", "weighting": "uniform"}),
    ("dft", {"train_model": "base", "weighting": "dft", "normalizer": "token_count"}),
    ("direct", {"train_model": "instruct", "weighting": "uniform"}),
])
def test_method_presets_set_everything_their_method_needs(method, expected):
    from gift_dist.train import weighting

    train = load_config(None, [f"method={method}"]).train
    assert {key: getattr(train, key) for key in expected} == expected
    weighting.validate(train)  # dft alone would fail here without its normaliser


def test_method_contradicted_by_an_explicit_key_is_an_error():
    with pytest.raises(ConfigError, match=r"method=direct sets train.train_model=instruct but the config sets 'base'"):
        load_config(None, ["method=direct", "train.train_model=base"])
    assert load_config(None, ["method=dft", "train.weighting=dft"]).train.normalizer == "token_count"


def test_an_output_dir_that_cannot_be_written_is_named_before_any_work(tmp_path, capsys):
    """(Running as root, permissions cannot be taken away: a file where a folder should be does it.)"""
    from gift_dist.cli import main

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    for command in ("prepare", "score", "train"):
        assert main([command, f"output_dir={blocker / 'run'}", "base_model=b", "instruct_model=i"]) == 2
        assert f"{blocker / 'run'}" in capsys.readouterr().err
    assert not any(p.name.startswith(".gift_dist_write_probe") for p in tmp_path.iterdir())


def test_liger_kernels_without_a_gpu_or_the_package_are_refused_before_any_work(tmp_path, capsys):
    """train.liger_kernels needs liger-kernel and a GPU; either missing is one line naming the setting, exit 2,
    before the output folders, the process group or the model (base_model does not even exist here)."""
    from gift_dist.cli import main

    run = tmp_path / "run"
    assert main(["train", f"output_dir={run}", "base_model=nowhere", "train.liger_kernels=true"]) == 2
    assert "train.liger_kernels=true" in capsys.readouterr().err
    assert not run.exists()


def test_ranks_share_the_cores_when_no_thread_count_is_set(monkeypatch):
    """DeepSpeed's launcher sets no OMP_NUM_THREADS: 2 ranks on a node would each start one thread per core."""
    import os

    import torch

    from gift_dist import dist

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert dist.share_cpu_threads() == max(1, (os.cpu_count() or 1) // 2) == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert dist.share_cpu_threads() is None
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("options, overrides, message", [
    (["--methods", "gift,nope"], ["prepare.eval_fraction=0.1"], "compare: unknown methods ['nope']"),
    (["--seeds", "0"], ["prepare.eval_fraction=0.1"], "compare: --seeds must be >= 1, got 0"),
    ([], [], "compare evaluates on held-out data: set prepare.eval_fraction"),
])
def test_compare_refuses_bad_settings_before_any_work(tmp_path, capsys, options, overrides, message):
    from gift_dist.cli import main

    assert main(["compare", *options, f"output_dir={tmp_path / 'run'}", *overrides]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _config_sections():
    """Every config dataclass reachable from RunConfig (sections, and the entries of list keys: data.sources)."""
    import dataclasses
    import typing

    from gift_dist.config import RunConfig

    found, todo = [], [RunConfig]
    while todo:
        cls = todo.pop()
        if cls in found:
            continue
        found.append(cls)
        for hint in typing.get_type_hints(cls).values():
            todo += [t for t in (hint, *typing.get_args(hint)) if isinstance(t, type) and dataclasses.is_dataclass(t)]
    return found


def test_every_config_key_is_documented_on_its_field():
    """Key documentation is data: each field's ``help`` metadata, non-empty for every key of every section (the
    OPERATIONAL mark kept beside it)."""
    import dataclasses

    from gift_dist.config import DataSource, LoraConfig, PrepareConfig, TrainConfig, field_docs, operational_keys

    sections = _config_sections()
    assert {DataSource, LoraConfig, TrainConfig} <= set(sections) and len(sections) == 9
    undocumented = [f"{cls.__name__}.{name}" for cls in sections for name, text in field_docs(cls).items()
                    if not text.strip()]
    assert undocumented == []
    for cls in sections:
        assert set(field_docs(cls)) == {f.name for f in dataclasses.fields(cls)}
    assert {"gradient_checkpointing", "save_every_steps", "report_to"} <= set(operational_keys(TrainConfig))
    assert set(operational_keys(PrepareConfig)) == {"num_proc", "strict"}


def test_config_command_prints_the_resolved_config_with_every_documented_key(tmp_path, capsys):
    """`gift-dist config` shows what the stages will see, each key preceded by its documentation (the field's help
    metadata), data.sources' entry keys under that list; the output is a config file that loads back to the same
    settings."""
    from gift_dist.cli import main
    from gift_dist.config import config_to_dict, field_docs

    overrides = ["train.lora.r=8", "method=dft", "data.sources=[{path: a.jsonl, weight: 2}]"]
    assert main(["config", *overrides]) == 0
    out = capsys.readouterr().out
    saved = tmp_path / "run.yaml"
    saved.write_text(out)
    (tmp_path / "a.jsonl").write_text("")
    expected = load_config(None, overrides)
    expected.data.sources[0].path = str(tmp_path / "a.jsonl")  # paths in a config file are relative to it
    assert config_to_dict(load_config(saved)) == config_to_dict(expected)
    comments = " ".join(line.strip().lstrip("#").strip().removeprefix("- ") for line in out.splitlines()
                        if line.strip().startswith("#"))
    missing = [f"{cls.__name__}.{name}" for cls in _config_sections() for name, text in field_docs(cls).items()
               if text not in comments]
    assert missing == []
    assert "# A token budget per micro-batch instead of a sample count" in out
    assert "#   - weight: How much of this source the mix takes" in out


def test_one_list_of_methods_and_of_result_shaping_settings():
    """The method names are config.METHODS' keys everywhere (RunConfig.method's choices, compare's default); the
    settings that shape an adapter are one list (config.result_settings) for the trainer's record and `run`'s check."""
    import typing

    from gift_dist.config import METHOD_NAMES, METHODS, RunConfig, TrainConfig, config_to_dict, result_settings
    from gift_dist.pipeline.compare import DEFAULT_METHODS
    from gift_dist.train.recipe import adapter_result_settings as recipe_settings

    choices = typing.get_args(typing.get_args(typing.get_type_hints(RunConfig)["method"])[0])
    assert tuple(METHODS) == METHOD_NAMES == choices == DEFAULT_METHODS
    train = TrainConfig(save_every_steps=7, progress=False)
    shaping = result_settings(TrainConfig, train)
    assert "save_every_steps" not in shaping and "progress" not in shaping and shaping["seed"] == 42
    assert result_settings(TrainConfig, config_to_dict(train)) == shaping
    assert result_settings(TrainConfig, TrainConfig()) == shaping
    assert {k: v for k, v in recipe_settings(train).items() if k != "data_order"} == shaping


def test_the_merge_settings_that_shape_the_merged_weights_are_derived_and_recorded():
    """issue 21: `run`'s "same merge" check compares config.result_settings(MergeConfig) (every merge setting not
    marked operational) with gift_merge.json; each one has the record field merge writes it to."""
    import dataclasses

    from gift_dist.config import MergeConfig, operational_keys, result_settings
    from gift_dist.contracts.merged import MergeRecord
    from gift_dist.merge.stage import RECORD_FIELDS, recorded_settings

    assert set(operational_keys(MergeConfig)) == {
        "max_shard_size", "threads", "memory_budget_gb", "verify", "overwrite", "verify_sample_tensors",
        "verify_logits_max_gb", "progress", "allow_other_instruct"}
    assert set(result_settings(MergeConfig, MergeConfig())) == set(RECORD_FIELDS) == {"into", "scale", "dtype"}
    assert set(RECORD_FIELDS.values()) <= {f.name for f in dataclasses.fields(MergeRecord)}
    assert recorded_settings(MergeConfig(scale=0.5, dtype="bfloat16", threads=1)) == {
        "into": "instruct", "strength": 0.5, "dtype": "bfloat16"}


def test_trackers_that_are_unknown_or_not_installed_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """train.report_to: a name that is no tracker is refused when the config loads; wandb named but not installed
    is one line naming the setting and the fix, exit 2, before the output folders or the model."""
    import importlib.util

    from gift_dist.cli import main

    with pytest.raises(ConfigError, match=r"unknown tracker\(s\) \['mlflow'\]"):
        load_config(None, ["train.report_to=[mlflow]"])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else
                        real_find_spec(name, *a))
    run = tmp_path / "run"
    assert main(["train", f"output_dir={run}", "base_model=nowhere", "train.report_to=[wandb]"]) == 2
    assert "train.report_to names wandb but it is not installed; pip install wandb" in capsys.readouterr().err
    assert not run.exists()


def test_quantized_frozen_weights_is_a_zero3_choice(tmp_path):
    """Off by default and in the shipped multi-node config; on only with ZeRO-3, and a ds_config that turns it on
    by itself is refused (the adapter would train against int8 weights unrecorded)."""
    import json

    from gift_dist.train.engine import Layout, build_ds_config, resolve_ds_config

    assert load_config(None, []).train.quantized_frozen_weights is False
    from gift_dist.config import TrainConfig

    with pytest.raises(ConfigError, match="'train.quantized_frozen_weights' must be true or false"):
        TrainConfig(quantized_frozen_weights="yes")
    shipped = json.loads(resolve_ds_config("zero3_multinode").read_text())["zero_optimization"]
    assert shipped["zero_quantized_nontrainable_weights"] is False and shipped["zero_hpz_partition_size"] == 8
    for overrides, message in (
        (["train.quantized_frozen_weights=maybe"], "'train.quantized_frozen_weights': expected true/false"),
        (["train.quantized_frozen_weights=true", "train.sharding=replicate"], "set train.sharding=zero3"),
        (["train.quantized_frozen_weights=true"], "train.sharding=auto may not pick"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, overrides)
    on = load_config(None, ["train.quantized_frozen_weights=true", "train.sharding=zero3",
                            "train.ds_config=zero3_multinode"]).train
    from gift_dist.memory_plan import ModelShape

    shape = ModelShape(name="t", total_params=100, largest_layer_params=10, decoder_layer_params=10, lora_params=4,
                       largest_lora_tensor=2, hidden_size=4, intermediate_size=8, num_layers=2, vocab_size=10,
                       largest_shard_bytes=None)
    multinode = Layout("zero3", resolve_ds_config("zero3_multinode"), "test")
    ds = build_ds_config(on, multinode, 2, 10, shape)
    assert ds["zero_optimization"]["zero_quantized_nontrainable_weights"] is True
    off = load_config(None, ["train.ds_config=zero3_multinode"]).train
    assert build_ds_config(off, multinode, 2, 10, shape)["zero_optimization"]["zero_quantized_nontrainable_weights"] is False
    turned_on = tmp_path / "q.json"
    config = json.loads(resolve_ds_config("zero3_multinode").read_text())
    config["zero_optimization"]["zero_quantized_nontrainable_weights"] = True
    turned_on.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="train.quantized_frozen_weights is false"):
        build_ds_config(off, Layout("zero3", turned_on, "test"), 2, 10, shape)
    replicate = load_config(None, ["train.quantized_frozen_weights=true", "train.ds_config=replicate"]).train
    with pytest.raises(ConfigError, match="needs ZeRO stage 3"):
        build_ds_config(replicate, Layout("replicate", resolve_ds_config("replicate"), "test"), 2, 10, shape)
