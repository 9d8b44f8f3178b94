"""issue 21: a checkpoint folder saved again is replaced through ``replace_directory``, so a crash between its
renames leaves a folder the next run finds (never neither the old nor the new one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gift_dist.contracts import ASIDE_SUFFIX
from gift_dist.contracts.checkpoint import TMP_DIR, CheckpointRecord, tag_for
from gift_dist.train.checkpointing import Checkpoints


def _publish(checkpoints: Checkpoints, step: int, content: str) -> Path:
    """Publish a checkpoint of ``step`` whose adapter holds ``content`` (no model: the adapter writer is faked)."""
    tag = tag_for(step)
    staged = checkpoints.root / TMP_DIR / tag
    staged.mkdir(parents=True)
    record = CheckpointRecord(step=step, world_size=1, global_batch_size=8, model_identity={"name": "m", "hash": "h"},
                              prepared_fingerprint="fp", train_model="base", train_settings={})
    return Path(checkpoints._publish(staged, tag, record, peft_config=None, tensors={"w": content}, provenance=None))


@pytest.fixture
def fake_adapter_writer(monkeypatch):
    def write_adapter(out_dir, peft_config, tensors, provenance):
        Path(out_dir).mkdir()
        (Path(out_dir) / "weights").write_text(tensors["w"])

    monkeypatch.setattr("gift_dist.contracts.adapter.write_adapter", write_adapter)


def test_a_crash_while_a_checkpoint_is_saved_again_leaves_the_old_one_for_the_next_run(tmp_path, fake_adapter_writer,
                                                                                       killed_between_renames):
    checkpoints = Checkpoints(tmp_path / "checkpoints", keep=2)
    final = _publish(checkpoints, 4, "first")
    with killed_between_renames(final):
        _publish(checkpoints, 4, "second")
    assert not final.exists()
    assert final.with_name(final.name + ASIDE_SUFFIX).is_dir()

    folder, record = Checkpoints(checkpoints.root, keep=2).latest()
    assert folder == final and record.step == 4
    assert (final / "adapter" / "weights").read_text() == "first"
    assert not final.with_name(final.name + ASIDE_SUFFIX).exists()


def test_a_folder_set_aside_is_not_counted_as_a_checkpoint_when_pruning(tmp_path, fake_adapter_writer):
    checkpoints = Checkpoints(tmp_path / "checkpoints", keep=2)
    _publish(checkpoints, 1, "one")
    (checkpoints.root / (tag_for(9) + ASIDE_SUFFIX)).mkdir()  # left by a crash saving step 9 again
    _publish(checkpoints, 2, "two")
    assert (checkpoints.root / tag_for(1)).is_dir() and (checkpoints.root / tag_for(2)).is_dir()
