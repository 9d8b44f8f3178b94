from pathlib import Path

import pytest

from gift_dist.cli import main

LLAMA_70B = Path(__file__).resolve().parents[1] / "examples/llama3-70b-config.json"


def _plan(capsys, *flags):
    assert main(["plan", "--model", str(LLAMA_70B), *flags]) == 0
    return capsys.readouterr().out


def test_70b_plan_picks_the_config_that_fits(capsys):
    out = _plan(capsys, "--gpus-per-node", "8", "--nodes", "2")
    assert "70.55B params" in out and "LoRA r=16: 207.1M trainable" in out
    assert "fits 80 GiB GPUs / 1024 GiB nodes: ds_configs/zero3.json" in out
    # 131 GiB of bf16 weights do not fit one 80 GiB GPU: tensor-parallel pairs, 4 per node, ~70 GiB per GPU.
    assert "score.parallel: auto -> tensor): 2 GPU(s) per replica (score.gpus_per_replica=2), 4 replica(s) per node, " \
           "69.5 GiB per GPU" in out
    assert "launch 8 process(es) per node" in out
    assert "auto -> tensor): 8 GPU(s) per replica" in _plan(capsys, "--gpus-per-node", "8", "--gpu-memory-gb", "24")
    assert "fits 24 GiB GPUs / 512 GiB nodes: ds_configs/zero3_offload.json" in _plan(
        capsys, "--gpus-per-node", "4", "--gpu-memory-gb", "24", "--cpu-memory-gb", "512")
    assert "fits 24 GiB GPUs / 128 GiB nodes: ds_configs/zero3_nvme.json" in _plan(
        capsys, "--gpus-per-node", "4", "--gpu-memory-gb", "24", "--cpu-memory-gb", "128")


def test_plan_of_a_local_checkpoint_reads_its_shard_sizes(tiny_llama, capsys):
    assert main(["plan", "--model", str(tiny_llama.instruct), "--gpus-per-node", "1"]) == 0
    out = capsys.readouterr().out
    shard_gib = (tiny_llama.instruct / "model.safetensors").stat().st_size / 1024**3
    assert f"largest shard {shard_gib:.1f} GiB" in out and "fits 80 GiB GPUs" in out


def test_8b_plan_replicates_the_base_on_80gib_gpus(capsys):
    llama_8b = Path(__file__).resolve().parents[1] / "examples/llama3-8b-config.json"
    out = _plan_of(capsys, llama_8b, "--gpus-per-node", "8")
    assert "fits 80 GiB GPUs / 1024 GiB nodes: ds_configs/replicate.json (train.sharding: auto -> replicate)" in out
    assert "gradient checkpointing (train.gradient_checkpointing: auto): off" in out  # 1 x 4096 tokens fit
    out = _plan_of(capsys, llama_8b, "--gpus-per-node", "8", "--micro-batch-size", "4")
    assert "gradient checkpointing (train.gradient_checkpointing: auto): on" in out
    out = _plan_of(capsys, LLAMA_70B, "--gpus-per-node", "8", "--nodes", "2")
    assert "(train.sharding: auto -> zero3)" in out


def _plan_of(capsys, model, *flags):
    assert main(["plan", "--model", str(model), *flags]) == 0
    return capsys.readouterr().out


@pytest.mark.slow
def test_the_readmes_plan_outputs_are_what_plan_prints(capsys):
    """Every ```$ gift-dist plan ...``` block of the README is the command's output (lines shown as `...` elided;
    a `| grep WORD` keeps the lines holding WORD), so a change to the plan cannot leave the README behind."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```text\n\$ (gift-dist plan [^\n]*)\n(.*?)```", readme, flags=re.S)
    assert len(blocks) >= 3
    for command, shown in blocks:
        command, _, grep = command.partition(" | grep ")
        assert main(shlex.split(command)[1:]) == 0
        printed = capsys.readouterr().out.splitlines()
        if grep:
            printed = [line for line in printed if grep.strip().strip('"') in line]
        for line in shown.splitlines():
            if line.strip() != "...":
                assert line in printed, f"README line not printed by `{command}`: {line}"


def test_zero3_model_states_against_deepspeeds_estimator_for_70b():
    """Like for like with DeepSpeed's estimator for the whole 70B model trained in full: ours is its figure less
    what the frozen base does not hold (16 bytes/param of gradient, fp32 master and Adam moments for every frozen
    parameter; the gathered layer's gradient), plus the LoRA weights kept whole on every GPU."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    from gift_dist.config import LoraConfig
    from gift_dist.memory_plan import GIB, model_shape, training_plan

    shape = model_shape(str(LLAMA_70B), 16, LoraConfig().target_modules)
    gpus, nodes = 8, 2
    world = gpus * nodes
    # The peft model DeepSpeed would see: the base (all frozen) and the LoRA tensors.
    _, ds_gpu, ds_largest_layer = estimate_zero3_model_states_mem_needs(
        shape.total_params + shape.lora_params, shape.largest_layer_params, gpus, nodes, cpu_offload=False, cpu_offload_params=False)
    items = training_plan(shape, gpus, nodes, 4096, 1024)["zero3"]["items"]
    ours = (items["lora_states"] + items["frozen_weights"] + items["gathered_layer"]) * GIB
    frozen = shape.total_params
    expected = ds_gpu - 16 * frozen / world - ds_largest_layer / 2 + 2 * shape.lora_params * (1 - 1 / world)
    assert abs(ours - expected) < 16  # bytes: DeepSpeed rounds to int
    assert ds_gpu / GIB > 75 and ours / GIB < 11  # trained in full it would not fit; LoRA on a frozen base does


def test_plan_counts_each_ds_config_item(capsys):
    """hpZ's secondary copy, int8 frozen weights, prefetch/live limits and reduce buckets from the ds_configs,
    activations at the token budget and the LoRA gather are line items of their own."""
    from gift_dist.config import LoraConfig
    from gift_dist.memory_plan import GIB, model_shape, training_plan

    shape = model_shape(str(LLAMA_70B), 16, LoraConfig().target_modules)
    plans = training_plan(shape, 8, 2, 4096, 1024)
    zero3, multi = plans["zero3"]["items"], plans["zero3_multinode"]["items"]
    weights = 2 * shape.total_params / GIB
    assert multi["hpz_secondary"] == weights / 8 and zero3["hpz_secondary"] == 0
    assert abs(multi["frozen_weights"] - weights / 16) < 1e-9
    assert plans["zero3"]["gpu_gib"] == sum(zero3.values())
    # "auto" sizes: one decoder layer prefetched, three alive; the gathered layer counts against the live limit.
    leaf = max(shape.largest_layer_params, shape.decoder_layer_params)
    assert zero3["prefetch"] == 2 * min(shape.decoder_layer_params, 3 * shape.decoder_layer_params - leaf) / GIB
    assert zero3["reduce_bucket"] == 2 * 50_000_000 / GIB
    assert plans["replicate"]["items"]["reduce_bucket"] == 4 * 500_000_000 / GIB  # ZeRO-1 accumulates in fp32
    assert zero3["lora_gather"] == 4 * shape.largest_lora_tensor / GIB
    assert plans["zero3"]["cpu_items"]["LoRA gather (save)"] == 4 * shape.lora_params * 8 / GIB
    quantized = training_plan(shape, 8, 2, 4096, 1024, quantized_frozen_weights=True)
    for key in ("frozen_weights", "hpz_secondary"):
        assert quantized["zero3_multinode"]["items"][key] == multi[key] / 2
    assert quantized["replicate"]["items"]["frozen_weights"] == plans["replicate"]["items"]["frozen_weights"]
    budget = training_plan(shape, 8, 2, 8192, 1024)["zero3"]["items"]["activations"]
    assert budget > zero3["activations"]
    out = _plan(capsys, "--gpus-per-node", "8", "--nodes", "2", "--micro-batch-tokens", "8192")
    assert "micro-batches of 8192 tokens (train.micro_batch_tokens)" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("activations"))
    assert f"{budget:.2f}" in row.split()
    assert "zero3_multinode: hpZ over 8 GPU(s)" in out and "hpZ secondary copy" in out
    assert "zero3_multinode" not in _plan(capsys, "--gpus-per-node", "8")
    out = _plan(capsys, "--gpus-per-node", "4", "--nodes", "2", "--quantized-frozen-weights")
    assert "frozen weights int8" in out and "set zero_hpz_partition_size to the GPUs per node (4), not 8" in out


@pytest.mark.slow
def test_the_70b_dry_run_passes_at_world_size_16(capsys):
    out = _plan(capsys, "--gpus-per-node", "8", "--nodes", "2", "--dry-run")
    assert "dry run at world size 16 (2 node(s) x 8), zero3_multinode.json: passed" in out
    assert "ZeRO-3 partition of 70.55B params: 8.21 GiB of frozen weights (bf16) per rank + hpZ copy 16.43 GiB" in out
    assert "adapter gather: 1120 LoRA tensors (207.1M params)" in out  # 80 layers x 7 projections x (A, B)
    assert "merge: 30 instruct shards of <= 4.7 GiB, every LoRA pair mapped" in out


def _dry_run_config(tiny_llama, tmp_path, *overrides, **zero):
    import json

    from gift_dist.config import load_config

    ds = json.loads((Path(__file__).resolve().parents[1] / "ds_configs/zero3.json").read_text())
    ds["zero_optimization"].update(zero)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    return load_config(None, [f"base_model={tiny_llama.base}", "train.sharding=zero3",
                              f"train.ds_config={tmp_path / 'ds.json'}", "train.lora.r=4", *overrides])


def test_the_dry_run_partitions_a_quantized_base_as_packed_weights(tiny_llama, tmp_path):
    """With train.quantize_base=nf4 each packed weight is a bf16 tensor of a quarter of its elements: the partition
    loses 3/4 of the quantizable weights' bf16 bytes (memory_plan counts them on its own), the rest is unchanged."""
    import json

    from gift_dist.memory_plan import BF16, model_shape
    from gift_dist.pipeline.dry_run import dry_run, dry_run_report

    # Llama-shaped, built on the meta device: every projection above the 10,000-element persistence threshold even
    # packed (512 x 256 / 4), so ZeRO-3 partitions all 14 of them.
    small = dict(json.loads((LLAMA_70B.parent / "llama3-8b-config.json").read_text()), vocab_size=1000,
                 hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=4)
    (tmp_path / "small.json").write_text(json.dumps(small))
    world = 16
    full, packed = (dry_run(_dry_run_config(tiny_llama, tmp_path, f"train.quantize_base={quantize}"),
                            str(tmp_path / "small.json"), world=world, ranks_per_node=8) for quantize in ("none", "nf4"))
    shape = model_shape(str(tmp_path / "small.json"), 16, "auto")
    saved = full.partitioned_bytes_per_rank - packed.partitioned_bytes_per_rank
    expected = 0.75 * BF16 * shape.quantizable_params / world
    assert shape.quantizable_params == 2 * (2 * 512 * 512 + 2 * 512 * 256 + 3 * 512 * 1024)
    assert abs(saved - expected) <= 2 * BF16 * 14  # a ceil per packed weight
    assert packed.persistent_bytes == full.persistent_bytes and packed.frozen_storage == "nf4"
    report = dry_run_report(packed)
    assert "of frozen weights (nf4 packed, the rest bf16) per rank" in report
    assert "nf4 base (train.quantize_base): 14 weights packed" in report and "constants" in report


def test_the_dry_run_refuses_what_would_gather_frozen_or_lora_weights_whole(tiny_llama, tmp_path):
    from gift_dist.config import ConfigError
    from gift_dist.pipeline.dry_run import dry_run

    result = dry_run(_dry_run_config(tiny_llama, tmp_path), str(tiny_llama.base), world=16, ranks_per_node=8)
    assert result.lora_tensors == 2 * 7 * 2 and result.merge_shards == 1
    with pytest.raises(ConfigError, match="stage3_gather_16bit_weights_on_model_save gathers every frozen weight"):
        dry_run(_dry_run_config(tiny_llama, tmp_path, stage3_gather_16bit_weights_on_model_save=True),
                str(tiny_llama.base), world=16, ranks_per_node=8)
    # A persistence threshold that would partition (and gather) the LoRA tensors: refused as the trainer refuses it.
    with pytest.raises(ConfigError, match="stage3_param_persistence_threshold=10 but the run config gives"):
        dry_run(_dry_run_config(tiny_llama, tmp_path, stage3_param_persistence_threshold=10),
                str(tiny_llama.base), world=16, ranks_per_node=8)
    with pytest.raises(ConfigError, match="zero_hpz_partition_size=3 does not divide the 8 ranks"):
        dry_run(_dry_run_config(tiny_llama, tmp_path, zero_hpz_partition_size=3), str(tiny_llama.base), world=16,
                ranks_per_node=8)
