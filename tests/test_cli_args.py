"""``section.key=value`` overrides are accepted anywhere on a command line, an unknown flag still refused."""

from __future__ import annotations

import dataclasses

import pytest

from gift_dist.cli import build_parser, main, parse_command_line
from gift_dist.config import MergeConfig, ScoreConfig, TrainConfig


def parse(argv: list[str]):
    return parse_command_line(build_parser(argv[0]), argv)


@pytest.mark.parametrize("argv, overrides, flags", [
    (["prepare", "--strict", "train.lora.r=8"], ["train.lora.r=8"], {"strict": True}),
    (["prepare", "train.lora.r=8", "--strict", "train.lora.alpha=4"], ["train.lora.r=8", "train.lora.alpha=4"],
     {"strict": True}),
    (["compare", "--seeds", "3", "train.lora.r=8"], ["train.lora.r=8"], {"seeds": 3}),
    (["compare", "a.b=1", "--seeds", "2", "c.d=2", "--methods", "gift", "e.f=3"], ["a.b=1", "c.d=2", "e.f=3"],
     {"seeds": 2, "methods": "gift"}),
    (["eval", "--model", "x=/m", "eval.batch_size=2", "--output", "o"], ["eval.batch_size=2"],
     {"model": ["x=/m"], "output": "o"}),
])
def test_overrides_are_taken_before_between_and_after_flags(argv, overrides, flags):
    args = parse(argv)
    assert args.overrides == overrides
    assert {key: getattr(args, key) for key in flags} == flags


def test_the_last_override_wins_wherever_it_stands(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  lora:\n    r: 4\n")
    assert main(["config", "train.lora.r=8", "--config", str(config), "train.lora.alpha=3",
                 "train.lora.r=16"]) == 0
    out = capsys.readouterr().out
    assert "    r: 16\n" in out and "    alpha: 3.0\n" in out


@pytest.mark.parametrize("argv, flag", [
    (["prepare", "--stirct", "train.lora.r=8"], "--stirct"),
    (["compare", "train.lora.r=8", "--seeds", "3", "--sedes", "2", "train.lora.alpha=4"], "--sedes"),
])
def test_an_unknown_flag_is_still_refused(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].endswith(f"error: unrecognized arguments: {flag}")
    assert "train.lora" not in err.splitlines()[-1]


def test_a_word_that_is_no_override_is_named(capsys):
    assert main(["prepare", "--strict", "typo"]) == 2
    assert "override 'typo' must look like section.key=value" in capsys.readouterr().err


def test_version(capsys):
    from gift_dist import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"gift-dist {__version__}"


@pytest.mark.parametrize("argv, resume, overrides", [
    (["train", "--config", "r.yaml", "--resume"], True, []),
    (["train", "--resume", "--config", "r.yaml"], True, []),
    (["train", "--config", "r.yaml"], False, []),
    (["train", "--config", "r.yaml", "--resume", "out/checkpoints/step-00000004"], "out/checkpoints/step-00000004",
     []),
    (["train", "--config", "r.yaml", "--resume", "train.max_steps=8", "train.lora.r=4"], True,
     ["train.max_steps=8", "train.lora.r=4"]),
])
def test_train_resume_takes_an_optional_checkpoint_folder(argv, resume, overrides):
    from gift_dist.train.recipe import resume_argument

    args = parse(argv)
    assert resume_argument(args) == resume and (args.overrides or []) == overrides


@pytest.mark.parametrize("command,section,absent", [("train", TrainConfig, "merge.dtype"),
                                                    ("merge", MergeConfig, "train.gamma"),
                                                    ("score", ScoreConfig, "train.gamma")])
def test_a_commands_help_lists_every_key_it_reads_with_its_documentation(command, section, absent, capsys):
    """`gift-dist train --help` documents train.* key by key from the fields' own help (no second copy)."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    prefix = {TrainConfig: "train", MergeConfig: "merge", ScoreConfig: "score"}[section]
    defaults = section()
    for f in dataclasses.fields(section):
        if dataclasses.is_dataclass(getattr(defaults, f.name)):  # a nested section: its keys are listed instead
            continue
        assert f"{prefix}.{f.name} (default" in text, f.name
        assert " ".join(f.metadata["help"].split()[:6]) in text, f.name
    assert "base_model (default" in text
    assert f"{absent} (default" not in text
    if command == "train":
        assert "train.lora.r (default" in text and "train.lora.target_modules (default" in text
