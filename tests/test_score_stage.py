"""The score stage end to end in one process, and every bad input it must refuse with a clear error."""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from gift_dist.cli import main as cli_main
from gift_dist.contracts import ContractError
from gift_dist.contracts import confidence as contract
from gift_dist.contracts import prepared as prepared_contract
from gift_dist.contracts.confidence import SUMMARY_NAME
from gift_dist.models.batch import collate
from gift_dist.models.pair import PairMismatch
from gift_dist.score.logprobs import reference_logprobs
from gift_dist.score.pool import ShardPool, lease_path
from gift_dist.score.report import HISTOGRAM_NAME, TOKEN_VIEW_NAME
from gift_dist.score.stage import NonFiniteLogprob, score
from gift_dist.score.verify import verify_confidence


def _config(prepared_cfg, output: Path, **score_overrides):
    """A copy of the prepared run config writing into ``output`` (prepared/ copied once beside it)."""
    cfg = copy.deepcopy(prepared_cfg)
    cfg.output_dir = str(output)
    if not cfg.paths.prepared.exists():
        shutil.copytree(prepared_cfg.paths.prepared, cfg.paths.prepared)
    cfg.score.progress = False
    cfg.score.max_batch_tokens = 2048
    for key, value in score_overrides.items():
        setattr(cfg.score, key, value)
    return cfg


@pytest.fixture(scope="module")
def scored(prepared_llama, tmp_path_factory):
    cfg = _config(prepared_llama, tmp_path_factory.mktemp("scored") / "run")
    return cfg, score(cfg)


def test_score_writes_every_shard_with_reference_values(scored):
    from transformers import AutoModelForCausalLM

    cfg, summary = scored
    prepared = prepared_contract.load_prepared(cfg.paths.prepared)
    manifest = contract.read_manifest(cfg.paths.confidence)
    assert manifest.complete and summary.complete
    assert summary.tokens == sum(prepared.dataset["num_target_tokens"]) == summary.worker_tokens
    model = AutoModelForCausalLM.from_pretrained(cfg.instruct_model, dtype=torch.float32).eval()
    for spec in prepared.manifest.shards[:2]:
        shard = contract.read_shard(cfg.paths.confidence, manifest, spec.index)
        assert shard.sample_index.tolist() == list(range(spec.start, spec.end))
        for i in (0, spec.num_samples // 2, spec.num_samples - 1):
            row = prepared.dataset[spec.start + i]
            expected = reference_logprobs(model, *collate([row["input_ids"]], [row["labels"]], 0, "cpu"))[0]
            torch.testing.assert_close(shard.values(i), expected, rtol=0, atol=1e-5)
    report = verify_confidence(cfg.paths.confidence, cfg.paths.prepared)
    assert report.ok and report.shards_ok == list(range(len(prepared.manifest.shards)))


def test_summary_and_histogram_come_from_all_shards(scored):
    cfg, summary = scored
    saved = json.loads((cfg.paths.confidence / SUMMARY_NAME).read_text())
    manifest = contract.read_manifest(cfg.paths.confidence)
    probs = torch.cat([contract.read_shard(cfg.paths.confidence, manifest, i).logprobs for i in manifest.shards]).exp()
    assert saved["tokens"] == probs.numel() == sum(saved["histogram_counts"])
    assert saved["mean_confidence"] == pytest.approx(float(probs.double().mean()), abs=1e-9)
    assert saved["low_confidence_share"] == pytest.approx(float((probs < 0.1).double().mean()), abs=1e-12)
    assert 0 < saved["mean_confidence"] < 1 and saved["tokens_per_second"] > 0
    assert (cfg.paths.confidence / HISTOGRAM_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "worker" not in saved


def test_token_view_shades_each_target_token_by_its_probability_and_weight(scored):
    import html
    import re

    cfg, _ = scored
    page = (cfg.paths.confidence / TOKEN_VIEW_NAME).read_text()
    manifest = contract.read_manifest(cfg.paths.confidence)
    first = contract.read_shard(cfg.paths.confidence, manifest, 0).values(0).exp()
    tips = re.findall(r'title="p=([0-9.]+) w=([0-9.]+)"', page.split("<h3>sample 1</h3>")[0])
    # Two rows (p, weight) per sample, one tip per target token in each, with gift's weight max(p, floor)^gamma,
    # but for end-of-turn targets, which keep train.eos_weight (1.0, the reference).
    prepared = prepared_contract.load_prepared(cfg.paths.prepared)
    targets = [t for t in prepared.dataset[0]["labels"][1:] if t != prepared_contract.IGNORE_INDEX]
    eos = set(prepared.manifest.eos_token_ids)
    assert len(tips) == 2 * first.numel() == 2 * len(targets) and eos & set(targets)
    for (p, w), expected, target in zip(tips[: first.numel()], first.tolist(), targets):
        assert float(p) == pytest.approx(expected, abs=5e-4)
        weight = cfg.train.eos_weight if target in eos else max(expected, cfg.train.prob_floor) ** cfg.train.gamma
        assert float(w) == pytest.approx(weight, abs=5e-4)
    assert page.count("<h3>sample ") == 40 and html.escape("<") not in page.split("<h1>")[0]



@pytest.mark.parametrize("train", [
    {"weighting": "gift", "gamma": 2.0, "eos_weight": 0.3},
    {"weighting": "clipped", "weight_min": 0.2, "weight_max": 0.5},
    {"weighting": "mean_normalized", "gamma": 0.5, "prob_floor": 0.05},
    {"weighting": "uniform"},
    {"weighting": "dft", "normalizer": "token_count"},
], ids=lambda train: train["weighting"])
def test_token_view_shows_the_weights_of_the_configured_weighting(scored, tmp_path, train):
    """The weight row is what the trainer weighs each token by under train.weighting (its formula, end-of-sequence
    override included); uniform and dft have no instruct-confidence weights: the view says so, with no weight
    row, instead of shading GIFT's."""
    import re

    from gift_dist.config import TrainConfig
    from gift_dist.contracts.prepared import IGNORE_INDEX, load_prepared
    from gift_dist.models.pair import load_tokenizer
    from gift_dist.score.report import write_token_view
    from gift_dist.train.weighting import needs_confidence, token_weights

    cfg, _ = scored
    conf_dir = tmp_path / "confidence"
    shutil.copytree(cfg.paths.confidence, conf_dir)
    settings = TrainConfig(**train)
    manifest = contract.read_manifest(conf_dir)
    prepared = load_prepared(cfg.paths.prepared)
    page = write_token_view(conf_dir, manifest, prepared, load_tokenizer(cfg.instruct_model),
                            train=settings, num_samples=3).read_text()
    shard = contract.read_shard(conf_dir, manifest, 0)
    logprobs = shard.values(0)
    first_sample = page.split("<h3>sample ")[1]
    if not needs_confidence(settings):
        assert "w=" not in page and "<b>weight</b>" not in page and page.count("<h3>sample ") == 3
        assert f"train.weighting: {train['weighting']}</code>" in page and "no instruct-confidence weights" in page
        tips = re.findall(r'title="p=([0-9.]+)"', first_sample)
        assert [float(p) for p in tips] == pytest.approx(logprobs.exp().tolist(), abs=5e-4)
        return
    labels = prepared.dataset[int(shard.sample_index[0])]["labels"]
    targets = torch.tensor([label for label in labels[1:] if label != IGNORE_INDEX])
    is_eos = torch.isin(targets, torch.tensor(prepared.manifest.eos_token_ids))
    assert is_eos.any()  # the end-of-sequence override is exercised
    expected = token_weights(settings, logprobs, None, is_eos, torch.tensor([logprobs.numel()]))
    tips = re.findall(r'title="p=([0-9.]+) w=([0-9.]+)"', first_sample)
    assert len(tips) == 2 * logprobs.numel()
    assert [float(w) for _, w in tips[: logprobs.numel()]] == pytest.approx(expected.tolist(), abs=5e-4)
    assert f"train.weighting: {train['weighting']}</code>" in page


def test_token_view_needs_the_train_settings_and_takes_no_gift_parameters_apart():
    """issue 21: the view shades the weights of train.weighting only; gamma/prob_floor alone (GIFT's weights
    whatever the run trains with) are no longer accepted."""
    from gift_dist.score.report import write_token_view

    with pytest.raises(TypeError, match="train"):
        write_token_view("confidence", None, None, None)
    with pytest.raises(TypeError, match="gamma"):
        write_token_view("confidence", None, None, None, gamma=1.0, prob_floor=0.1)


def test_rerun_skips_finished_shards(scored):
    cfg, _ = scored
    shard0 = cfg.paths.confidence / contract.shard_filename(0)
    before = shard0.stat().st_mtime_ns
    again = score(cfg)
    assert again.worker_shards == 0 and again.complete
    assert shard0.stat().st_mtime_ns == before


def test_bf16_logprobs_and_entropy_when_asked(prepared_llama, tmp_path):
    cfg = _config(prepared_llama, tmp_path / "run", logprob_dtype="bfloat16", record_entropy=True)
    score(cfg)
    manifest = contract.read_manifest(cfg.paths.confidence)
    from safetensors import safe_open

    with safe_open(str(cfg.paths.confidence / contract.shard_filename(0)), framework="pt") as fh:
        assert fh.get_slice("logprobs").get_dtype() == "BF16"
        assert fh.metadata()["dtype"] == "bfloat16"
    shard = contract.read_shard(cfg.paths.confidence, manifest, 0)
    assert shard.entropy is not None and shard.entropy.shape == shard.logprobs.shape


def test_missing_prepared_dataset_is_refused(prepared_llama, tmp_path):
    cfg = copy.deepcopy(prepared_llama)
    cfg.output_dir = str(tmp_path / "empty")
    with pytest.raises(ContractError, match="no prepared dataset.*gift-dist prepare"):
        score(cfg)


def test_prepared_dataset_of_another_version_is_refused(prepared_llama, tmp_path):
    cfg = _config(prepared_llama, tmp_path / "run")
    manifest_path = cfg.paths.prepared / prepared_contract.MANIFEST_NAME
    data = json.loads(manifest_path.read_text())
    data["version"] = prepared_contract.VERSION + 1
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(ContractError, match="version"):
        score(cfg)


def test_instruct_model_failing_the_pair_check_is_refused(prepared_llama, tiny_qwen2, tmp_path):
    cfg = _config(prepared_llama, tmp_path / "run")
    cfg.instruct_model = str(tiny_qwen2.instruct)
    with pytest.raises(PairMismatch, match="architectures differ"):
        score(cfg)
    assert not cfg.paths.confidence.exists()


def test_existing_confidence_for_other_data_or_model_is_refused(scored, prepared_llama, tiny_qwen2, tmp_path):
    cfg, _ = scored
    other = _config(prepared_llama, tmp_path / "run")
    shutil.copytree(cfg.paths.confidence, other.paths.confidence)
    manifest_path = other.paths.confidence / contract.MANIFEST_NAME
    data = json.loads(manifest_path.read_text())
    data["prepared_fingerprint"] = "0" * 32
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(ContractError, match="prepared fingerprint .*fresh output directory or delete"):
        score(other)
    data["prepared_fingerprint"] = contract.read_manifest(cfg.paths.confidence).prepared_fingerprint
    data["instruct_model"] = {"name": "someone/else", "hash": "feedfacefeedface"}
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(ContractError, match="scored by instruct model someone/else"):
        score(other)


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_corrupted_shard_is_named_by_reader_and_verify(scored, tmp_path, capsys, damage):
    cfg, _ = scored
    conf = tmp_path / "run" / "confidence"
    shutil.copytree(cfg.paths.confidence, conf)
    shutil.copytree(cfg.paths.prepared, tmp_path / "run" / "prepared")
    victim = conf / contract.shard_filename(2)
    raw = bytearray(victim.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) - 9]
    else:
        raw[-5] ^= 0x10
    victim.write_bytes(bytes(raw))
    manifest = contract.read_manifest(conf)
    with pytest.raises(ContractError, match=f"{victim.name} is corrupt"):
        contract.read_shard(conf, manifest, 2)
    contract.read_shard(conf, manifest, 1)
    assert cli_main(["verify-confidence", str(conf)]) == 1
    out = capsys.readouterr().out
    assert victim.name in out and "FAILED" in out and contract.shard_filename(1) not in out


def test_verify_cli_passes_a_good_run_via_config(scored, tmp_path, capsys):
    from gift_dist.config import dump_config

    cfg, _ = scored
    config_file = tmp_path / "run.yaml"
    dump_config(cfg, config_file)
    assert cli_main(["verify-confidence", "--config", str(config_file)]) == 0
    assert "ok:" in capsys.readouterr().out


def test_stale_lease_of_a_dead_worker_is_retaken(tmp_path):
    pool = ShardPool(tmp_path, num_shards=3, lease_seconds=60)
    other = ShardPool(tmp_path, num_shards=3, lease_seconds=60, worker="other-host:1:0")
    held = other.claim([])
    assert held.shard_index == 0
    assert pool.claim([]).shard_index == 1  # a live lease is respected: next shard
    # A lease from another host whose owner stopped refreshing is retaken once it is older than lease_seconds.
    path = lease_path(tmp_path, 0)
    path.write_text(json.dumps({"worker": "other-host:1:0", "host": "other-host", "pid": 1}))
    old = time.time() - 120
    os.utime(path, (old, old))
    retaken = pool.claim([1])
    assert retaken.shard_index == 0
    with pytest.raises(Exception, match="taken over"):
        held.refresh()
    # A lease of a process of this host that no longer exists is retaken at once, however fresh.
    dead = lease_path(tmp_path, 2)
    dead.write_text(json.dumps({"worker": "x", "host": socket.gethostname(), "pid": 2 ** 22 + 12345}))
    assert pool.claim([0, 1]).shard_index == 2


def test_half_written_shards_of_killed_writers_are_removed(tmp_path):
    pool = ShardPool(tmp_path, num_shards=2, lease_seconds=60)
    stale, fresh = tmp_path / ".shard-00000.safetensors.h.1.ab.tmp", tmp_path / ".shard-00001.safetensors.h.2.cd.tmp"
    for path in (stale, fresh):
        path.write_bytes(b"partial")
    old = time.time() - 120
    os.utime(stale, (old, old))
    assert pool.remove_stale_temporaries() == [stale]
    assert not stale.exists() and fresh.exists()


def test_non_finite_logprobs_name_sample_and_position(prepared_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    broken = tmp_path / "broken_instruct"
    model = AutoModelForCausalLM.from_pretrained(prepared_llama.instruct_model, dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight[5] = float("nan")
    model.save_pretrained(str(broken))
    for name in os.listdir(prepared_llama.instruct_model):
        if "token" in name or name.endswith(".jinja"):
            shutil.copy(Path(prepared_llama.instruct_model) / name, broken / name)
    cfg = _config(prepared_llama, tmp_path / "run")
    cfg.instruct_model = str(broken)
    with pytest.raises(NonFiniteLogprob, match=r"shard 0: non-finite logprob \(nan\) for prepared sample \d+ at "
                                               r"target position 0"):
        score(cfg)
    assert not list(cfg.paths.confidence.glob("shard-*"))


def test_unwritable_output_dir_is_named(prepared_llama, tmp_path):
    # A plain file where confidence/ should be: unwritable for any user, root included.
    cfg = _config(prepared_llama, tmp_path / "run")
    cfg.paths.confidence.write_text("not a directory")
    with pytest.raises(ContractError, match=f"the confidence directory {cfg.paths.confidence} is not writable"):
        score(cfg)


def test_disk_full_while_writing_a_shard_leaves_nothing_and_names_the_dir(tmp_path, monkeypatch):
    manifest = contract.init_manifest(tmp_path, contract.ConfidenceManifest("fp", {"name": "m", "hash": "h"},
                                                                            "float32", 1))
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).endswith(".tmp") and "shard-" in str(path):
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(ContractError, match=f"cannot write confidence shard 0 into {tmp_path}.*No space"):
        contract.write_shard(tmp_path, manifest, 0, torch.arange(2), torch.tensor([0, 1, 3]), -torch.rand(3))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [contract.MANIFEST_NAME]
    assert contract.read_manifest(tmp_path).shards == {}


def test_an_empty_lease_is_taken_over_after_a_short_grace_not_the_lease_time(tmp_path):
    """A kill between creating a lease and writing its owner leaves an empty file nobody will ever refresh."""
    import os
    import time

    from gift_dist.score.pool import UNREADABLE_LEASE_GRACE_SECONDS, ShardPool, lease_path

    pool = ShardPool(tmp_path, num_shards=3, lease_seconds=600, worker="w")
    lease_path(tmp_path, 0).parent.mkdir(parents=True, exist_ok=True)
    lease_path(tmp_path, 0).write_text("")
    fresh = pool.claim(finished=[])
    assert fresh.shard_index == 1  # a just-created lease may still be being written: left alone
    old = time.time() - UNREADABLE_LEASE_GRACE_SECONDS - 1
    os.utime(lease_path(tmp_path, 0), (old, old))
    taken = pool.claim(finished=[])
    assert taken.shard_index == 0 and json.loads(lease_path(tmp_path, 0).read_text())["worker"] == "w"


def test_prepared_data_from_other_inputs_is_refused_naming_what_changed(prepared_llama, tmp_path, caplog):
    """score recomputes the prepared fingerprint's parts from its config and the instruct tokenizer: another
    setting, a changed data file, or a manifest claiming another tokenizer is named, before any model loads."""
    cfg = _config(prepared_llama, tmp_path / "run")
    cfg.prepare.max_length = 128
    with pytest.raises(ContractError, match=r"setting prepare.max_length: 256 -> 128\. Rerun `gift-dist prepare`"):
        score(cfg)

    changed_data = tmp_path / "data.jsonl"
    shutil.copy(cfg.data.files[0], changed_data)
    with open(changed_data, "a") as fh:
        fh.write(json.dumps({"messages": [{"role": "user", "content": "1+1?"},
                                          {"role": "assistant", "content": "2"}]}) + "\n")
    cfg = _config(prepared_llama, tmp_path / "run")
    cfg.data.files = [str(changed_data)]
    with pytest.raises(ContractError, match=r"the data: .*sha256.* then, .* now"):
        score(cfg)

    cfg = _config(prepared_llama, tmp_path / "run")
    manifest_path = cfg.paths.prepared / prepared_contract.MANIFEST_NAME
    original = manifest_path.read_text()
    data = json.loads(original)
    data["tokenizer"]["chat_template_sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(ContractError, match=r"the tokenizer \(.*chat_template_sha256: '0000"):
        score(cfg)
    assert not cfg.paths.confidence.exists()

    manifest_path.write_text(original)
    cfg.data.files = [str(tmp_path / "moved-away.jsonl")]
    with caplog.at_level("WARNING", logger="gift_dist.models.prepared_inputs"):
        assert score(cfg).complete  # raw data gone after prepare: tokenizer and settings still checked
    assert "moved-away.jsonl" in caplog.text and "tokenizer and settings only" in caplog.text


def test_rescore_corrupt_scores_damaged_and_missing_shards_again_byte_for_byte(scored, tmp_path, capsys):
    """The recovery path after the trainer names a corrupt shard: without the flag score refuses the folder; with
    --rescore-corrupt it re-scores the flipped and the deleted shard (identical bytes: scoring is deterministic),
    leaves the good ones alone, and verify-confidence then passes."""
    from gift_dist.config import dump_config

    cfg, _ = scored
    run = _config(cfg, tmp_path / "run")
    shutil.copytree(cfg.paths.confidence, run.paths.confidence)
    flipped, deleted, kept = (run.paths.confidence / contract.shard_filename(i) for i in (1, 3, 0))
    originals = {p.name: p.read_bytes() for p in (flipped, deleted, kept)}
    kept_mtime = kept.stat().st_mtime_ns
    raw = bytearray(flipped.read_bytes())
    raw[-5] ^= 0x10
    flipped.write_bytes(bytes(raw))
    deleted.unlink()
    config_file = tmp_path / "run.yaml"
    dump_config(run, config_file)
    with pytest.raises(ContractError):
        score(run)
    assert cli_main(["score", "--config", str(config_file), "--rescore-corrupt"]) == 0
    assert {p.name: p.read_bytes() for p in (flipped, deleted, kept)} == originals
    assert kept.stat().st_mtime_ns == kept_mtime
    assert verify_confidence(run.paths.confidence, run.paths.prepared).ok
    capsys.readouterr()


def test_a_worker_waiting_on_shards_held_elsewhere_says_which_and_by_whom(prepared_llama, tmp_path, caplog):
    """Every shard leased by a live worker on another host: this worker logs what it waits for (shard -> holder),
    then takes the shards over once their leases go stale, and finishes.

    The leases are kept fresh (dated in the future) until the worker has said it waits, then aged past
    lease_seconds: the worker must wait whatever its start-up takes, and takes over at its next poll."""
    import logging

    cfg = _config(prepared_llama, tmp_path / "run", lease_seconds=1.0)
    num_shards = len(prepared_contract.read_manifest(cfg.paths.prepared).shards)
    leases = [lease_path(cfg.paths.confidence, index) for index in range(num_shards)]
    for path in leases:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"worker": "gpu-node-7:4242:0", "host": "gpu-node-7", "pid": 4242}))
        os.utime(path, (time.time() + 600, time.time() + 600))

    def holder_stops():
        for path in leases:
            if path.exists():
                os.utime(path, (time.time() - 120, time.time() - 120))

    class HolderStopsOnceWaitedFor(logging.Handler):
        def emit(self, record):
            if "waiting for confidence shards held by other workers" in record.getMessage():
                holder_stops()

    stage_log = logging.getLogger("gift_dist.score.stage")
    handler = HolderStopsOnceWaitedFor()
    stage_log.addHandler(handler)
    backstop = threading.Timer(120, holder_stops)  # no waiting line: the test ends (and fails below), no hang
    backstop.start()
    try:
        with caplog.at_level("INFO", logger="gift_dist.score.stage"):
            assert score(cfg).complete
    finally:
        backstop.cancel()
        stage_log.removeHandler(handler)
    assert "waiting for confidence shards held by other workers: {0: 'gpu-node-7:4242:0'" in caplog.text
