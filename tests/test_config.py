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
