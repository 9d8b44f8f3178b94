"""Shared fixtures: tiny offline base/instruct pairs (built once per session) and a prepared dataset."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from gift_dist.bundled import bundled_data_path  # noqa: E402
from gift_dist.config import load_config  # noqa: E402
from gift_dist.tiny_pairs import build_tiny_pair  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_extensions_dir_restored():
    """TORCH_EXTENSIONS_DIR as it was before each test. ``dist.use_private_extensions_dir()`` writes it into
    os.environ itself, which monkeypatch does not undo when the variable was unset: a test calling it with a
    temporary cache (tests/test_extensions_dir.py) left every later DeepSpeed start of the session (and the
    subprocesses inheriting the variable) JIT-building DeepSpeed's shm op in a fresh folder: a minute or more."""
    before = os.environ.get("TORCH_EXTENSIONS_DIR")
    yield
    if before is None:
        os.environ.pop("TORCH_EXTENSIONS_DIR", None)
    else:
        os.environ["TORCH_EXTENSIONS_DIR"] = before


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """The one tiny-pair factory of the test run: ``tiny_pair(**build_tiny_pair_kwargs)`` builds each distinct
    pair once per session and hands every later caller the same one (tests must not modify its files)."""
    built = {}
    root = tmp_path_factory.mktemp("tiny_pairs")

    def make(**kwargs):
        key = tuple(sorted(kwargs.items()))
        if key not in built:
            built[key] = build_tiny_pair(root / f"pair-{len(built)}", **kwargs)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_pair):
    """The default pair. No test asserts what training taught it (only that instruct differs from base, a little),
    so 20 + 20 steps instead of build_tiny_pair's 40 + 40."""
    return tiny_pair(arch="llama", seed=0, base_steps=20, instruct_steps=20)


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_pair):
    """The other architecture: the tests use it as a pair of another family and for log-prob maths, none for what
    its training taught it, so it trains 4 + 4 steps (instruct still differs from base) instead of 40 + 40."""
    return tiny_pair(arch="qwen2", seed=1, base_steps=4, instruct_steps=4)


def make_run_config(pair, output_dir: Path, data_files=None, **overrides):
    """A run config for a tiny pair; ``overrides`` are ``section.key`` -> value."""
    items = [f"{k}={v}" for k, v in overrides.items()]
    cfg = load_config(None, [
        f"base_model={pair.base}", f"instruct_model={pair.instruct}", f"output_dir={output_dir}", *items,
    ])
    cfg.data.files = [str(f) for f in (data_files or [bundled_data_path()])]
    return cfg


@pytest.fixture(scope="session")
def prepared_llama(tiny_llama, tmp_path_factory):
    """A small prepared dataset (300 bundled records, 64-sample shards) for the later stages' tests."""
    from gift_dist.bundled import read_jsonl, write_jsonl
    from gift_dist.prepare.stage import prepare

    root = tmp_path_factory.mktemp("prepared_llama")
    data = write_jsonl(read_jsonl(bundled_data_path())[:300], root / "data.jsonl")
    cfg = make_run_config(tiny_llama, root / "run", [data], **{"prepare.max_length": 256,
                                                                "prepare.samples_per_shard": 64})
    prepare(cfg)
    return cfg


@pytest.fixture
def single_rank(monkeypatch):
    """The environment torchrun gives a one-process job, on a free port (DeepSpeed's process group in-process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def killed_between_renames(monkeypatch):
    """``with killed_between_renames(dst):`` runs its block with os.replace raising KeyboardInterrupt (a kill) when
    it renames a folder into ``dst`` (whose source passes ``moving``), checks the block was killed there, and puts
    os.replace back: the crash between the two renames of a folder swap (``contracts.replace_directory``)."""

    @contextlib.contextmanager
    def kill(dst, moving=lambda src: True):
        real_replace = os.replace

        def replace(src, target):
            if Path(target) == Path(dst) and moving(Path(src)):
                raise KeyboardInterrupt("killed between the renames")
            real_replace(src, target)

        monkeypatch.setattr(os, "replace", replace)
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            monkeypatch.setattr(os, "replace", real_replace)

    return kill
