"""An interrupted merge never looks finished, and a rerun completes it (reusing finished shards of the same plan)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.merge_helpers import logits, make_adapter, merge_config, peft_merged, sample_ids

from gift_dist.contracts import ContractError
from gift_dist.contracts import model_folder
from gift_dist.contracts.merged import read_merged
from gift_dist.merge.stage import WORK_SUFFIX, merge

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair_and_adapter(tiny_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_resume")
    pair = tiny_pair(base_steps=2, instruct_steps=2, max_shard_size="100KB")
    return pair, make_adapter(pair.base, root / "adapter", seed=5)


def merge_command(pair, adapter: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gift_dist", "merge", "--adapter", str(adapter), "--target", str(pair.instruct),
            "--output", str(output), "--threads", "1", "--no-verify", f"base_model={pair.base}",
            f"instruct_model={pair.instruct}", "merge.progress=false", *extra]


@pytest.mark.slow  # a merge process killed mid-way, then rerun
def test_killed_merge_leaves_nothing_finished_and_rerun_completes(pair_and_adapter, tmp_path):
    pair, adapter = pair_and_adapter
    shards = [p.name for p in model_folder.weight_files(pair.instruct)]
    assert len(shards) >= 4
    output = tmp_path / "merged"
    work = output.with_name(output.name + WORK_SUFFIX)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(merge_command(pair, adapter, output, "--throttle-seconds", "3"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (work / shards[0]).is_file():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "the merge wrote no shard in 120 s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    assert not output.exists()
    with pytest.raises(ContractError, match="gift_merge.json"):
        read_merged(work)
    finished = {name: (work / name).stat().st_ino for name in shards if (work / name).is_file()}
    assert 1 <= len(finished) < len(shards)

    rerun = subprocess.run(merge_command(pair, adapter, output), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(finished)} of {len(shards)} shards already written" in rerun.stderr
    assert not work.exists()
    assert read_merged(output).record.shards == shards
    for name, inode in finished.items():
        assert (output / name).stat().st_ino == inode  # reused, not rewritten
    ids = sample_ids(seed=7)
    torch.testing.assert_close(logits(output, ids), logits(peft_merged(pair.instruct, adapter), ids),
                               rtol=1e-5, atol=1e-5)


def test_leftover_work_dir_of_another_plan_is_discarded(pair_and_adapter, tmp_path):
    pair, adapter = pair_and_adapter
    cfg = merge_config(tmp_path, pair, verify=True)
    work = cfg.paths.merged.with_name(cfg.paths.merged.name + WORK_SUFFIX)
    work.mkdir(parents=True)
    first_shard = model_folder.weight_files(pair.instruct)[0]
    # A shard of the right name but unmerged content, from a plan the rerun does not share.
    (work / first_shard.name).write_bytes(first_shard.read_bytes())
    (work / ".gift_merge_plan.json").write_text('{"identity": "another merge"}')
    (work / "model-00002-of-00005.safetensors.partial").write_bytes(b"half")
    out = merge(cfg, adapter_dir=str(adapter))
    assert not work.exists()
    assert not any(p.name.endswith(".partial") for p in out.iterdir())
    ids = sample_ids(seed=8)
    torch.testing.assert_close(logits(out, ids), logits(peft_merged(pair.instruct, adapter), ids),
                               rtol=1e-5, atol=1e-5)


def test_a_merge_killed_while_replacing_its_output_keeps_the_old_one_for_the_next_merge(pair_and_adapter, tmp_path,
                                                                                     killed_between_renames):
    """issue 21: a crash between renaming the old merged model aside and the new one in loses neither: the next
    merge puts the old one back before deciding anything (here: it refuses to overwrite it)."""
    pair, adapter = pair_and_adapter
    cfg = merge_config(tmp_path, pair, overwrite=True)
    output = merge(cfg, adapter_dir=str(adapter))
    first = read_merged(output).record
    with killed_between_renames(output, moving=lambda src: src.name.endswith(WORK_SUFFIX)):
        merge(cfg, adapter_dir=str(adapter))
    assert not output.exists()
    cfg.merge.overwrite = False
    with pytest.raises(ContractError, match="exists; pass --overwrite"):
        merge(cfg, adapter_dir=str(adapter))
    assert read_merged(output).record == first
