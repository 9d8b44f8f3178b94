"""The streaming merge against peft's merge_and_unload on tiny sharded pairs, options, verification, bad input."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from tests.merge_helpers import logits, make_adapter, merge_config, peft_merged, sample_ids
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gift_dist.contracts import ContractError, file_sha256
from gift_dist.contracts import model_folder
from gift_dist.contracts.adapter import AdapterProvenance, read_adapter
from gift_dist.contracts.merged import read_merged
from gift_dist.merge.stage import merge
from gift_dist.merge.verify import verify_merged


@pytest.fixture(scope="session")
def pairs(tiny_pair):
    return {arch: tiny_pair(arch=arch, base_steps=2, instruct_steps=2, max_shard_size="200KB")
            for arch in ("llama", "qwen2")}


@pytest.fixture(scope="session")
def adapters(pairs, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_adapters")
    return {arch: make_adapter(pair.base, root / arch, seed=1) for arch, pair in pairs.items()}


def tensor(model_dir: Path, name: str) -> torch.Tensor:
    for path in model_folder.weight_files(model_dir):
        with safe_open(str(path), framework="pt") as fh:
            if name in fh.keys():
                return fh.get_tensor(name)
    raise KeyError(name)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_merge_matches_peft_merge_and_unload(arch, pairs, adapters, tmp_path):
    from transformers import AutoModelForCausalLM

    pair = pairs[arch]
    assert len(model_folder.weight_files(pair.instruct)) >= 3
    out = merge(merge_config(tmp_path, pair), adapter_dir=str(adapters[arch]))
    assert [p.name for p in model_folder.weight_files(out)] == [p.name for p in model_folder.weight_files(pair.instruct)]
    ids = sample_ids()
    expected = logits(peft_merged(pair.instruct, adapters[arch]), ids)
    unmerged = logits(pair.instruct, ids)
    actual = logits(AutoModelForCausalLM.from_pretrained(str(out)), ids)
    assert (expected - unmerged).abs().max() > 1e-2  # the adapter changes the model, so the check can fail
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    record = read_merged(out).record
    assert record.into == "instruct" and record.strength == 1.0 and len(record.merged_tensors) == 7 * 2
    for name in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (pair.instruct / name).read_bytes()
    assert not out.with_name(out.name + ".merging").exists()


def test_rslora_adapter(pairs, tmp_path):
    pair = pairs["llama"]
    adapter = make_adapter(pair.base, tmp_path / "adapter", seed=2, use_rslora=True, r=8, lora_alpha=4)
    out = merge(merge_config(tmp_path, pair), adapter_dir=str(adapter))
    ids = sample_ids(seed=1)
    torch.testing.assert_close(logits(out, ids), logits(peft_merged(pair.instruct, adapter), ids), rtol=1e-5, atol=1e-5)
    assert read_merged(out).record.lora_scaling == pytest.approx(4 / 8**0.5)


def test_modules_to_save_grafts_trained_minus_base(pairs, tmp_path):
    pair = pairs["qwen2"]
    adapter = make_adapter(pair.base, tmp_path / "adapter", seed=3, target_modules=["q_proj", "v_proj"],
                           modules_to_save=["lm_head"])
    cfg = merge_config(tmp_path, pair)
    out = merge(cfg, adapter_dir=str(adapter))
    trained = load_file(str(adapter / "adapter_model.safetensors"))["base_model.model.lm_head.weight"]
    expected_head = tensor(pair.instruct, "lm_head.weight") + (trained - tensor(pair.base, "lm_head.weight"))
    torch.testing.assert_close(tensor(out, "lm_head.weight"), expected_head)
    reference = peft_merged(pair.instruct, adapter)
    with torch.no_grad():
        reference.lm_head.weight.copy_(expected_head)
    ids = sample_ids(seed=2)
    torch.testing.assert_close(logits(out, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)
    report = verify_merged(cfg)
    assert report.logits_compared and report.max_logit_diff < 1e-3
    assert "lm_head.weight" in report.checked_tensors

    cfg_no_base = merge_config(tmp_path / "nobase", pair)
    cfg_no_base.base_model = ""
    with pytest.raises(ContractError, match="modules_to_save.*base_model"):
        merge(cfg_no_base, adapter_dir=str(adapter))


def test_embedding_lora_with_saved_embedding_layer(pairs, tmp_path):
    pair = pairs["llama"]
    adapter = make_adapter(pair.base, tmp_path / "adapter", seed=4, target_modules=["embed_tokens", "o_proj"])
    out = merge(merge_config(tmp_path, pair), adapter_dir=str(adapter))
    # peft also saved the (frozen) base embedding; grafting trained - base adds nothing beyond the LoRA delta.
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    a = tensors["base_model.model.model.embed_tokens.lora_embedding_A"]
    b = tensors["base_model.model.model.embed_tokens.lora_embedding_B"]
    expected = tensor(pair.instruct, "model.embed_tokens.weight") + 2.0 * (b @ a).T
    torch.testing.assert_close(tensor(out, "model.embed_tokens.weight"), expected)


def test_strength_dtype_and_reshard(pairs, adapters, tmp_path):
    from transformers import AutoModelForCausalLM

    pair = pairs["llama"]
    cfg = merge_config(tmp_path, pair, scale=0.5, dtype="bfloat16", max_shard_size="60KB")
    out = merge(cfg, adapter_dir=str(adapters["llama"]))
    files = model_folder.weight_files(out)
    sizes = [p.stat().st_size for p in files]
    # ~240 KB of bf16 weights in shards of at most 60 KB of data (+ a small header each).
    assert len(files) >= 4 and max(sizes) <= 60_000 + 8_000
    name = "model.layers.1.mlp.down_proj.weight"
    adapter = load_file(str(adapters["llama"] / "adapter_model.safetensors"))
    key = "base_model.model." + name.removesuffix(".weight")
    delta = adapter[key + ".lora_B.weight"] @ adapter[key + ".lora_A.weight"]
    merged = tensor(out, name)
    assert merged.dtype == torch.bfloat16
    bf16 = {"rtol": 2**-8, "atol": 1e-6}
    torch.testing.assert_close(merged.float(), tensor(pair.instruct, name).float() + 0.5 * 2.0 * delta, **bf16)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(merged.float(), tensor(pair.instruct, name).float() + 2.0 * delta, **bf16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.bfloat16
    report = verify_merged(cfg)
    assert report.logits_compared and report.max_logit_diff > 0.0


def test_merge_into_base(pairs, adapters, tmp_path):
    pair = pairs["qwen2"]
    out = merge(merge_config(tmp_path, pair, into="base", verify=True), adapter_dir=str(adapters["qwen2"]))
    ids = sample_ids(seed=3)
    torch.testing.assert_close(logits(out, ids), logits(peft_merged(pair.base, adapters["qwen2"]), ids),
                               rtol=1e-5, atol=1e-5)
    assert read_merged(out).record.target["name"] == str(pair.base.resolve())


def test_verify_detects_a_tampered_tensor(pairs, adapters, tmp_path):
    pair = pairs["llama"]
    cfg = merge_config(tmp_path, pair)
    out = merge(cfg, adapter_dir=str(adapters["llama"]))
    name = read_merged(out).record.merged_tensors[0]  # the sample always includes the first merged tensor
    shard = out / json.loads((out / model_folder.SAFE_INDEX).read_text())["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = tensors[name] + 1e-2
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(ContractError, match=name.replace(".", r"\.")):
        verify_merged(cfg)


def test_cli_merge_and_verify(pairs, adapters, tmp_path, capsys):
    from gift_dist.cli import main

    pair = pairs["llama"]
    out = tmp_path / "merged"
    args = ["merge", "--adapter", str(adapters["llama"]), "--target", str(pair.instruct), "--output", str(out),
            "--scale", "0.25", "--no-verify", f"instruct_model={pair.instruct}", "merge.progress=false"]
    assert main(args) == 0
    assert read_merged(out).record.strength == 0.25
    assert read_merged(out).record.scale == pytest.approx(0.25 * 8 / 4)
    assert main(args) == 2
    assert "exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert main(["verify-merge", "--merged", str(out)]) == 0
    assert "tensors recomputed" in capsys.readouterr().out


# --- bad input -------------------------------------------------------------------------------------------------


def test_adapter_missing_weights(pairs, adapters, tmp_path):
    broken = tmp_path / "adapter"
    shutil.copytree(adapters["llama"], broken)
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(ContractError, match="adapter_model.safetensors"):
        merge(merge_config(tmp_path, pairs["llama"]), adapter_dir=str(broken))


def test_adapter_of_another_architecture(pairs, adapters, tmp_path):
    with pytest.raises(ContractError, match="model_type='qwen2'.*model_type='llama'"):
        merge(merge_config(tmp_path, pairs["llama"]), adapter_dir=str(adapters["qwen2"]))


def test_adapter_of_another_size_names_the_key(pairs, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(pairs["llama"].base))
    config.hidden_size, config.intermediate_size = 32, 64
    model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=2, target_modules=["q_proj"]))
    model.peft_config["default"].base_model_name_or_path = None
    model.save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(ContractError, match=r"layers\.0\.self_attn\.q_proj\.lora_A.*another architecture"):
        merge(merge_config(tmp_path, pairs["llama"], ), adapter_dir=str(tmp_path / "adapter"))


def test_adapter_key_matching_no_tensor(pairs, adapters, tmp_path):
    broken = tmp_path / "adapter"
    shutil.copytree(adapters["llama"], broken)
    tensors = load_file(str(broken / "adapter_model.safetensors"))
    for factor in ("A", "B"):
        old = f"base_model.model.model.layers.0.self_attn.q_proj.lora_{factor}.weight"
        tensors[old.replace("q_proj", "qkv_proj")] = tensors.pop(old)
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    with pytest.raises(ContractError, match=r"qkv_proj\.lora_A\.weight matches no tensor"):
        merge(merge_config(tmp_path, pairs["llama"]), adapter_dir=str(broken))


def _provenance(**changes) -> AdapterProvenance:
    """A valid provenance record for adapters these tests write by hand."""
    identity = {"name": "m", "hash": "0123456789abcdef"}
    values = dict(train_model="base", model_identity=identity, base_model=identity, instruct_model=None,
                  prepared_fingerprint="p", weighting={}, lora={}, train_config={}, steps=1, world_size=1,
                  global_batch_size=1, complete=True)
    return AdapterProvenance(**{**values, **changes})


def test_adapter_identity_mismatch(pairs, adapters, tmp_path):
    tagged = tmp_path / "adapter"
    shutil.copytree(adapters["llama"], tagged)
    other = {"name": "other", "hash": "0123456789abcdef"}
    record = _provenance(model_identity=other, base_model=other,
                         weights_sha256=file_sha256(tagged / "adapter_model.safetensors"))
    (tagged / "gift_adapter.json").write_text(json.dumps(record.to_json()))
    with pytest.raises(ContractError, match="trained on other .hash 0123456789abcdef"):
        merge(merge_config(tmp_path, pairs["llama"]), adapter_dir=str(tagged))


def _tag(adapter: Path, out: Path, **changes) -> Path:
    shutil.copytree(adapter, out)
    record = _provenance(weights_sha256=file_sha256(out / "adapter_model.safetensors"), **changes)
    (out / "gift_adapter.json").write_text(json.dumps(record.to_json()))
    return out


@pytest.mark.parametrize("train_model", ["base", "instruct"])
def test_adapter_for_another_instruct_model_is_refused_unless_allowed(pairs, adapters, tmp_path, capsys,
                                                                      train_model):
    from gift_dist.cli import main

    pair = pairs["llama"]
    base = model_folder.model_identity(str(pair.base))
    other = {"name": "/models/other-instruct", "hash": "feedfacefeedface"}
    if train_model == "base":  # GIFT: the instruct model scored the data; the base was trained
        changes = dict(model_identity=base, base_model=base, instruct_model=other)
    else:  # direct fine-tuning: the instruct model was trained itself (a run without instruct_model recorded)
        changes = dict(train_model="instruct", model_identity=other, base_model=base, instruct_model=None)
    tagged = _tag(adapters["llama"], tmp_path / "adapter", **changes)
    target_hash = model_folder.model_identity(str(pair.instruct))["hash"]
    with pytest.raises(ContractError, match=f"hash feedfacefeedface.*hash {target_hash}.*allow_other_instruct"):
        merge(merge_config(tmp_path, pair), adapter_dir=str(tagged))
    assert not (tmp_path / "run" / "merged").exists()
    args = ["merge", "--adapter", str(tagged), f"base_model={pair.base}", f"instruct_model={pair.instruct}",
            f"output_dir={tmp_path / 'run'}", "merge.verify=false", "merge.progress=false"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "feedfacefeedface" in err and target_hash in err and len(err.strip().splitlines()) == 1
    assert main(args + ["merge.allow_other_instruct=true"]) == 0
    assert read_merged(tmp_path / "run" / "merged").record.other_instruct == other


def test_adapter_for_this_instruct_model_merges_without_a_note(pairs, adapters, tmp_path):
    pair = pairs["llama"]
    base, instruct = (model_folder.model_identity(str(m)) for m in (pair.base, pair.instruct))
    tagged = _tag(adapters["llama"], tmp_path / "adapter", model_identity=base, base_model=base,
                  instruct_model=instruct)
    assert read_merged(merge(merge_config(tmp_path, pair), adapter_dir=str(tagged))).record.other_instruct is None
    # Merged into the base for a comparison, the instruct identity is not the target's to match.
    other = {"name": "other", "hash": "feedfacefeedface"}
    tagged = _tag(adapters["llama"], tmp_path / "adapter-other", model_identity=base, base_model=base,
                  instruct_model=other)
    out = merge(merge_config(tmp_path, pair, into="base"), adapter_dir=str(tagged), output_dir=str(tmp_path / "mb"))
    assert read_merged(out).record.other_instruct is None


def test_allow_other_instruct_is_validated():
    from gift_dist.config import ConfigError, MergeConfig, load_config

    assert load_config(None, ["merge.allow_other_instruct=true"]).merge.allow_other_instruct is True
    with pytest.raises(ConfigError, match="merge.allow_other_instruct"):
        load_config(None, ["merge.allow_other_instruct=maybe"])
    with pytest.raises(ConfigError, match="merge.allow_other_instruct"):
        MergeConfig(allow_other_instruct="yes")


@pytest.mark.parametrize("change, message", [
    ({"steps": -1}, "steps must be an integer >= 0"),
    ({"train_model": "both"}, "train_model must be base or instruct"),
    ({"base_model": {"name": "x"}}, "base_model must be a model identity with a hash"),
    ({"surprise": 1}, r"unknown keys \['surprise'\]"),
])
def test_malformed_adapter_provenance_is_named(pairs, adapters, tmp_path, change, message):
    tagged = tmp_path / "adapter"
    shutil.copytree(adapters["llama"], tagged)
    record = _provenance(weights_sha256=file_sha256(tagged / "adapter_model.safetensors"))
    (tagged / "gift_adapter.json").write_text(json.dumps({**record.to_json(), **change}))
    with pytest.raises(ContractError, match=message):
        read_adapter(tagged)


def test_target_with_missing_shard(pairs, adapters, tmp_path):
    target = tmp_path / "instruct"
    shutil.copytree(pairs["llama"].instruct, target)
    (target / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ContractError, match="model-00002-of-00003.safetensors.*missing"):
        merge(merge_config(tmp_path, pairs["llama"]), adapter_dir=str(adapters["llama"]), target_dir=str(target))


def test_target_with_corrupt_header(pairs, adapters, tmp_path):
    target = tmp_path / "instruct"
    shutil.copytree(pairs["llama"].instruct, target)
    shard = target / "model-00001-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)
    shard.write_bytes(bytes(data))
    with pytest.raises(ContractError, match="model-00001-of-00003.safetensors has a corrupt safetensors header"):
        merge(merge_config(tmp_path, pairs["llama"]), adapter_dir=str(adapters["llama"]), target_dir=str(target))


def test_pickle_only_target_is_refused(pairs, adapters, tmp_path):
    target = tmp_path / "instruct"
    target.mkdir()
    shutil.copy(pairs["llama"].instruct / "config.json", target)
    (target / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ContractError, match="pickle"):
        merge(merge_config(tmp_path, pairs["llama"]), adapter_dir=str(adapters["llama"]), target_dir=str(target))


def test_existing_output_is_refused_unless_overwrite(pairs, adapters, tmp_path):
    cfg = merge_config(tmp_path, pairs["llama"])
    cfg.paths.merged.mkdir(parents=True)
    (cfg.paths.merged / "keep.txt").write_text("user data")
    with pytest.raises(ContractError, match="exists.*--overwrite"):
        merge(cfg, adapter_dir=str(adapters["llama"]))
    assert (cfg.paths.merged / "keep.txt").is_file()
    cfg.merge.overwrite = True
    out = merge(cfg, adapter_dir=str(adapters["llama"]))
    assert not (out / "keep.txt").exists() and read_merged(out)


def test_dora_adapter_is_refused(pairs, tmp_path):
    adapter = make_adapter(pairs["llama"].base, tmp_path / "adapter", target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ContractError, match="lora_magnitude_vector.*DoRA"):
        merge(merge_config(tmp_path, pairs["llama"]), adapter_dir=str(adapter))


def test_output_onto_an_input_model_is_refused(pairs, adapters, tmp_path):
    from gift_dist.config import ConfigError

    cfg = merge_config(tmp_path, pairs["llama"], overwrite=True)
    with pytest.raises(ConfigError, match="would replace or sit inside the input model"):
        merge(cfg, adapter_dir=str(adapters["llama"]), output_dir=str(pairs["llama"].instruct))
    assert model_folder.weight_files(pairs["llama"].instruct)


def test_bad_max_shard_size_names_the_key(pairs, adapters, tmp_path):
    from gift_dist.config import ConfigError

    with pytest.raises(ConfigError, match="merge.max_shard_size"):
        merge(merge_config(tmp_path, pairs["llama"], max_shard_size="lots"), adapter_dir=str(adapters["llama"]))


def _checksummed_copy(adapter_dir: Path, out: Path) -> Path:
    """The peft-saved adapter rewritten through the adapter contract, which records its weights' sha256."""
    from peft import LoraConfig

    from gift_dist.contracts.adapter import read_adapter, write_adapter

    source = read_adapter(adapter_dir)
    return write_adapter(out, LoraConfig.from_pretrained(str(adapter_dir)), source.tensors, _provenance())


def test_flipped_byte_in_the_adapter_is_refused_before_merging(pairs, adapters, tmp_path):
    from gift_dist.contracts.adapter import WEIGHTS_NAME

    adapter = _checksummed_copy(adapters["llama"], tmp_path / "adapter")
    weights = adapter / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    start = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
    data[start + 101] ^= 0x40  # one bit of one LoRA value, as a bad disk or a copy gone wrong would
    weights.write_bytes(bytes(data))
    cfg = merge_config(tmp_path, pairs["llama"])
    with pytest.raises(ContractError, match=r"do not match the sha256 recorded"):
        merge(cfg, adapter_dir=str(adapter))
    assert not cfg.paths.merged.exists()


def test_non_finite_adapter_is_refused_naming_the_tensor(pairs, adapters, tmp_path):
    from gift_dist.contracts.adapter import WEIGHTS_NAME

    adapter = tmp_path / "adapter"
    shutil.copytree(adapters["llama"], adapter)
    tensors = load_file(str(adapter / WEIGHTS_NAME))
    name = sorted(n for n in tensors if "lora_B" in n)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(adapter / WEIGHTS_NAME), metadata={"format": "pt"})
    with pytest.raises(ContractError, match=rf"tensor {re.escape(name)} holds a non-finite value"):
        merge(merge_config(tmp_path, pairs["llama"]), adapter_dir=str(adapter))


def test_verify_merge_fails_on_nan_in_the_merged_weights(pairs, adapters, tmp_path):
    pair = pairs["llama"]
    cfg = merge_config(tmp_path, pair)
    out = merge(cfg, adapter_dir=str(adapters["llama"]))
    name = read_merged(out).record.merged_tensors[0]
    shard = out / json.loads((out / model_folder.SAFE_INDEX).read_text())["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name][:] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(ContractError, match=rf"merged tensor {re.escape(name)} .* non-finite"):
        verify_merged(cfg)


def test_verify_merge_recomputes_the_shard_checksums(pairs, adapters, tmp_path):
    """A changed tensor the merge did not touch, in a model too big for the logit comparison
    (merge.verify_logits_max_gb): no recomputation sees it, the checksum does."""
    pair = pairs["llama"]
    cfg = merge_config(tmp_path, pair)
    cfg.merge.verify_logits_max_gb = 0.0
    out = merge(cfg, adapter_dir=str(adapters["llama"]))
    record = read_merged(out).record
    assert set(record.shard_sha256) == set(record.shards)
    report = verify_merged(cfg)
    assert report.checksums_verified == len(record.shards) and not report.logits_compared
    # No logits to compare: every adapted tensor is recomputed, not a sample of merge.verify_sample_tensors.
    assert set(record.merged_tensors) <= set(report.checked_tensors) and len(record.merged_tensors) > 8
    untouched = next(name for name in json.loads((out / model_folder.SAFE_INDEX).read_text())["weight_map"]
                     if name not in record.merged_tensors and "norm" in name)
    shard = out / json.loads((out / model_folder.SAFE_INDEX).read_text())["weight_map"][untouched]
    tensors = load_file(str(shard))
    tensors[untouched] = tensors[untouched] * 1.5
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(ContractError, match=rf"shard {shard.name} does not match the sha256"):
        verify_merged(cfg)


def test_quantized_frozen_weights_round_trip_through_the_adapter_provenance(pairs, adapters, tmp_path):
    """Recorded, validated on read; an adapter written before the key existed still reads (None)."""
    tagged = _tag(adapters["llama"], tmp_path / "q", quantized_frozen_weights=True)
    assert read_adapter(tagged).provenance.quantized_frozen_weights is True
    old = tmp_path / "old"
    shutil.copytree(adapters["llama"], old)
    record = _provenance(weights_sha256=file_sha256(old / "adapter_model.safetensors")).to_json()
    del record["quantized_frozen_weights"]
    (old / "gift_adapter.json").write_text(json.dumps(record))
    assert read_adapter(old).provenance.quantized_frozen_weights is None
    (old / "gift_adapter.json").write_text(json.dumps({**record, "quantized_frozen_weights": "int8"}))
    with pytest.raises(ContractError, match="quantized_frozen_weights must be true, false or absent"):
        read_adapter(old)


@pytest.mark.parametrize("changes, expected", [
    ({"quantized_frozen_weights": True}, "trained against int8 base weights"),
    ({"quantized_frozen_weights": False, "train_config": {"ds_config": "zero3_multinode"}}, None),
    ({"train_config": {"ds_config": "zero3_multinode"}}, "may have been trained against int8 base weights"),
])
def test_merge_reports_an_adapter_trained_against_int8_base_weights(pairs, adapters, tmp_path, capsys, changes,
                                                                      expected):
    from gift_dist.cli import main

    pair = pairs["llama"]
    base = model_folder.model_identity(str(pair.base))
    record = _provenance(model_identity=base, base_model=base, **changes).to_json()
    if "quantized_frozen_weights" not in changes:  # written before the key existed
        del record["quantized_frozen_weights"]
    tagged = tmp_path / "adapter"
    shutil.copytree(adapters["llama"], tagged)
    record["weights_sha256"] = file_sha256(tagged / "adapter_model.safetensors")
    (tagged / "gift_adapter.json").write_text(json.dumps(record))
    args = ["merge", "--adapter", str(tagged), f"base_model={pair.base}", f"instruct_model={pair.instruct}",
            f"output_dir={tmp_path / 'run'}", "merge.verify=false", "merge.progress=false"]
    assert main(args) == 0
    out = capsys.readouterr().out
    note = read_merged(tmp_path / "run" / "merged").record.int8_base_weights
    if expected is None:
        assert note is None and "int8" not in out
    else:
        assert expected in note and f"adapter {note}" in out
