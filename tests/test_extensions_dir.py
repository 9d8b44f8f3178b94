"""DeepSpeed's JIT-built ops (on CPU its shared-memory communication op, built at every start that lacks it) go to
a build folder private to the environment unless the user set TORCH_EXTENSIONS_DIR: environments on one machine
no longer rebuild over each other in torch's shared ~/.cache/torch_extensions (issue 25, part 6)."""

import logging
import os
import sys
import types

import pytest

from gift_dist import dist


def test_unset_extensions_dir_becomes_a_private_one_keyed_by_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path, user_chosen = dist.use_private_extensions_dir()
    assert not user_chosen and path == dist.private_extensions_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(path)
    assert path.parent == tmp_path / "gift_dist" / "torch_extensions"
    assert path.name.startswith(f"py{sys.version_info.major}{sys.version_info.minor}-torch{dist.torch.__version__}-ds")
    # Another environment (prefix, interpreter) gets another folder; the same one, the same folder every start.
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-env"))
    assert dist.private_extensions_dir() != path


def test_a_user_set_extensions_dir_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert dist.use_private_extensions_dir() == (tmp_path / "mine", True)
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "mine")


def test_deepspeed_init_sees_the_private_folder_and_the_start_up_log_names_it(tmp_path, monkeypatch, caplog):
    """dist.init(use_deepspeed=True), the train path's one DeepSpeed start, sets the folder before DeepSpeed is
    imported and logs it (a stand-in DeepSpeed records what its init_distributed saw)."""
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    seen = {}
    fake = types.ModuleType("deepspeed")
    fake.init_distributed = lambda **kwargs: seen.update(folder=os.environ.get("TORCH_EXTENSIONS_DIR"))
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "share_cpu_threads", lambda: None)
    monkeypatch.setattr(dist.torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="gift_dist.dist"):
        dist.init(backend="gloo", use_deepspeed=True)
    assert seen["folder"] == str(dist.private_extensions_dir())
    assert f"DeepSpeed op build folder: {seen['folder']} (private to this environment" in caplog.text


def test_a_build_about_to_happen_is_announced_once_built_not(tmp_path, caplog):
    """On CPU, DeepSpeed JIT-builds its shm op where no built library is: that start logs one line first."""
    pytest.importorskip("deepspeed")
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().create_op_builder("ShareMemCommBuilder") is None:
        pytest.skip("this accelerator builds no shm op")
    with caplog.at_level(logging.INFO, logger="gift_dist.dist"):
        dist._note_op_builds(tmp_path, False)
    assert f"building DeepSpeed's deepspeed_shm_comm op in {tmp_path}" in caplog.text
    caplog.clear()
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="gift_dist.dist"):
        dist._note_op_builds(tmp_path, True)
    assert "building" not in caplog.text and "(TORCH_EXTENSIONS_DIR as set)" in caplog.text
