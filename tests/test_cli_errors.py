"""Errors the user can fix end in one line and exit 2 at the CLI: a full disk, a folder that is not a model."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest

from gift_dist.cli import main, out_of_space, out_of_space_message


def _enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_a_full_disk_while_merging_is_one_line_and_keeps_the_previous_merge(tiny_llama, tmp_path, monkeypatch,
                                                                           capsys):
    from tests.merge_helpers import make_adapter

    from gift_dist.contracts import merged as merged_contract

    adapter = make_adapter(tiny_llama.base, tmp_path / "adapter", seed=1)
    out = tmp_path / "merged"
    args = ["merge", "--adapter", str(adapter), "--output", str(out), f"base_model={tiny_llama.base}",
            f"instruct_model={tiny_llama.instruct}", "merge.verify=false", "merge.progress=false"]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    def full_disk(out_dir, record):
        try:  # as a library would: the OS error wrapped in its own exception, somewhere down the chain
            raise _enospc(out_dir / merged_contract.RECORD_NAME)
        except OSError as exc:
            raise RuntimeError("could not write the merge record") from exc

    monkeypatch.setattr(merged_contract, "write_record", full_disk)
    assert main(args + ["--overwrite"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"no space left on the device writing {tmp_path / 'merged.merging' / 'gift_merge.json'} (free " in err
    assert "GiB there); the previous artefacts are unchanged" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_out_of_space_is_found_anywhere_in_the_chain_and_only_there():
    try:
        try:
            raise _enospc("/nowhere/at/all/shard-00001.safetensors")
        except OSError:
            raise ValueError("while saving") from None  # suppressed cause: still the context
    except ValueError as exc:
        found = out_of_space(exc)
    assert isinstance(found, OSError)
    message = out_of_space_message(found)
    assert message.startswith("no space left on the device writing /nowhere/at/all/shard-00001.safetensors (free ")
    # safetensors and torch's zip writer carry the OS error as text only
    wrapped = Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                        'left on device" })')
    assert out_of_space(wrapped) is wrapped and "no space left on the device" in out_of_space_message(wrapped)
    assert out_of_space(OSError(errno.EACCES, "Permission denied", "/x")) is None
    assert out_of_space(RuntimeError("boom")) is None


def test_other_errors_still_raise(monkeypatch):
    import gift_dist.pipeline.show_config as show_config

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(show_config, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["config"])


@pytest.fixture(params=["empty folder", "config.json without weights"])
def not_a_model(request, tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    if request.param != "empty folder":
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return folder, "no config.json" if request.param == "empty folder" else "no weights"


@pytest.mark.parametrize("command", ["eval", "eval --model", "merge", "check base", "check instruct", "score",
                                     "verify-merge"])
def test_a_folder_that_is_not_a_model_is_named_by_every_command(tiny_llama, not_a_model, tmp_path, capsys,
                                                                command):
    folder, missing = not_a_model
    run = f"output_dir={tmp_path / 'run'}"
    base, instruct = f"base_model={tiny_llama.base}", f"instruct_model={tiny_llama.instruct}"
    argv = {
        "eval": ["eval", run, f"instruct_model={folder}"],
        "eval --model": ["eval", run, instruct, "--model", f"other={folder}"],
        "merge": ["merge", "--target", str(folder), "--adapter", str(tmp_path / "adapter"), run, base],
        "check base": ["check", f"base_model={folder}", instruct],
        "check instruct": ["check", base, f"instruct_model={folder}"],
        "score": ["score", run, f"instruct_model={folder}"],
        "verify-merge": None,
    }[command]
    if command == "verify-merge":
        merged = tmp_path / "merged"
        merged.mkdir()
        shutil.copy(tiny_llama.instruct / "config.json", merged)
        (merged / "gift_merge.json").write_text(json.dumps({
            "format": "gift_dist.merged", "version": 1, "base": None, "target": {"name": str(folder), "hash": "h"},
            "into": "instruct", "adapter": {"path": str(tmp_path / "adapter"), "hash": "a"}, "lora_scaling": 1.0,
            "strength": 1.0, "dtype": "auto", "merged_tensors": [], "shards": []}))
        argv = ["verify-merge", "--merged", str(merged)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"{folder} is not a loadable model: it has {missing}" in err
