"""The quick loop trains: one process, the smallest tiny pair, a few samples, uniform weighting (no scoring).

train -> checkpoint -> resume -> gathered adapter -> merge, each checked against something computed apart from the
code under test: the resumed run's losses are the unbroken run's, the adapter loads in peft, and the merged weights
are ``W + scale * B @ A`` computed here from the files. (The multi-process runs are in tests/test_train_dist.py,
behind the ``slow`` marker.)
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

STEPS = 3
MID = 2


def _safetensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def test_train_checkpoint_resume_gather_merge_in_one_process(tiny_pair, tmp_path, single_rank):
    from gift_dist.bundled import bundled_data_path, read_jsonl, write_jsonl
    from gift_dist.config import load_config
    from gift_dist.contracts.adapter import read_adapter
    from gift_dist.merge.stage import merge
    from gift_dist.prepare.stage import prepare
    from gift_dist.contracts.checkpoint import LATEST_NAME, tag_for
    from gift_dist.train.metrics import METRICS_NAME, read_metrics
    from gift_dist.train.recipe import train

    # The pair test_train_dist uses (2 pre-training steps: quality is irrelevant), shared through the session cache.
    pair = tiny_pair(arch="llama", seed=0, base_steps=2, instruct_steps=2)
    data = write_jsonl(read_jsonl(bundled_data_path())[:12], tmp_path / "data.jsonl")

    def config(name: str):
        return load_config(None, [
            f"base_model={pair.base}", f"instruct_model={pair.instruct}", f"output_dir={tmp_path / name}",
            f"data.files=[{data}]", "prepare.max_length=96", "prepare.samples_per_shard=8",
            "train.weighting=uniform", "train.sharding=replicate", f"train.max_steps={STEPS}",
            f"train.save_every_steps={MID}", "train.micro_batch_size=2", "train.gradient_accumulation_steps=1",
            "train.learning_rate=1e-2", "train.warmup_steps=0", "train.lora.r=4", "train.lora.alpha=8",
            "train.lora.dropout=0.0", "train.progress=false", "train.gradient_checkpointing=false",
            "merge.progress=false",
        ])

    unbroken = config("unbroken")
    prepare(unbroken)
    result = train(unbroken)
    assert result.steps == STEPS and not result.preempted
    rows = read_metrics(unbroken.paths.logs / METRICS_NAME)
    assert [row["step"] for row in rows] == [1, 2, 3]
    # Training moved: a stub that writes an adapter without stepping would leave the loss where it was.
    assert len({row["loss"] for row in rows}) == STEPS

    # Resume from the mid-run checkpoint (step 2) in a fresh run folder whose `latest` points at it.
    resumed = config("resumed")
    shutil.copytree(unbroken.paths.prepared, resumed.paths.prepared)
    shutil.copytree(unbroken.paths.checkpoints / tag_for(MID), resumed.paths.checkpoints / tag_for(MID))
    (resumed.paths.checkpoints / LATEST_NAME).write_text(tag_for(MID) + "\n")
    again = train(resumed, resume=True)
    assert again.steps == STEPS
    # Only step 3 ran after the resume; its loss (and so the restored LoRA, Adam state and schedule) is the
    # unbroken run's.
    after = read_metrics(resumed.paths.logs / METRICS_NAME)
    assert [row["step"] for row in after] == [3]
    assert after[0]["loss"] == pytest.approx(rows[-1]["loss"], rel=1e-6, abs=1e-7)

    # The gathered adapters agree, and each equals the final checkpoint's copy.
    adapter, adapter_resumed = read_adapter(result.adapter), read_adapter(again.adapter)
    assert adapter.provenance.complete and adapter.provenance.steps == STEPS
    assert set(adapter.tensors) == set(adapter_resumed.tensors) and adapter.tensors
    for name, tensor in adapter.tensors.items():
        torch.testing.assert_close(adapter_resumed.tensors[name], tensor, rtol=1e-5, atol=1e-7)
    assert any(bool(t.abs().sum() > 0) for n, t in adapter.tensors.items() if "lora_B" in n)  # B moved off zero

    # peft loads it as a LoRA on the base model, with the weights on disk.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(pair.base), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(result.adapter))
    loaded = {name.replace(".default", ""): p for name, p in peft_model.named_parameters() if "lora_" in name}
    assert set(loaded) == set(adapter.tensors)
    for name, tensor in adapter.tensors.items():
        assert torch.equal(loaded[name].detach(), tensor), name

    # Merge into the instruct model; every weight is W + (alpha / r) * B @ A computed here from the files.
    merged_dir = merge(unbroken, adapter_dir=str(result.adapter), target_dir=str(pair.instruct),
                       output_dir=str(tmp_path / "merged"))
    config_json = json.loads((result.adapter / "adapter_config.json").read_text())
    scale = config_json["lora_alpha"] / config_json["r"]
    instruct, merged = _safetensors(pair.instruct), _safetensors(merged_dir)
    assert set(merged) == set(instruct)
    lora = _safetensors(result.adapter)
    changed = set()
    for a_name, a in lora.items():
        if ".lora_A." not in a_name:
            continue
        b = lora[a_name.replace(".lora_A.", ".lora_B.")]
        weight = a_name.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight")
        expected = instruct[weight].double() + scale * (b.double() @ a.double())
        torch.testing.assert_close(merged[weight].double(), expected.to(merged[weight].dtype).double(),
                                   rtol=1e-5, atol=1e-6)
        changed.add(weight)
    assert changed
    for name in set(instruct) - changed:
        assert torch.equal(merged[name], instruct[name]), name


def test_train_resume_of_a_run_at_its_last_step_says_it_is_complete(tiny_pair, tmp_path, single_rank, capsys):
    """`gift-dist train --resume` on a run whose latest checkpoint is its last step trains nothing, rewrites the
    adapter from that checkpoint and says so (exit 0), instead of failing to format the loss of a step that never
    ran (it raised TypeError on final_loss=None)."""
    from gift_dist.bundled import bundled_data_path, read_jsonl, write_jsonl
    from gift_dist.cli import main
    from gift_dist.config import dump_config, load_config
    from gift_dist.contracts.adapter import read_adapter
    from gift_dist.prepare.stage import prepare
    from gift_dist.train.recipe import train

    pair = tiny_pair(arch="llama", seed=0, base_steps=2, instruct_steps=2)
    data = write_jsonl(read_jsonl(bundled_data_path())[:4], tmp_path / "data.jsonl")
    cfg = load_config(None, [
        f"base_model={pair.base}", f"instruct_model={pair.instruct}", f"output_dir={tmp_path / 'run'}",
        f"data.files=[{data}]", "prepare.max_length=96", "train.weighting=uniform", "train.sharding=replicate",
        f"train.max_steps={MID}", f"train.save_every_steps={MID}", "train.micro_batch_size=2", "train.lora.r=4",
        "train.progress=false", "train.gradient_checkpointing=false"])
    prepare(cfg)
    trained = read_adapter(train(cfg).adapter).tensors
    shutil.rmtree(cfg.paths.adapter)
    dump_config(cfg, tmp_path / "run.yaml")
    capsys.readouterr()
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--resume"]) == 0
    assert f"already complete at step {MID}/{MID}, nothing to train" in capsys.readouterr().out
    resumed = read_adapter(cfg.paths.adapter)
    assert resumed.provenance.complete and resumed.provenance.steps == MID
    assert resumed.tensors.keys() == trained.keys()
    for name, tensor in trained.items():
        assert torch.equal(resumed.tensors[name], tensor), name
