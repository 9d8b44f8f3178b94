from pathlib import Path

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
            printed = [line for line in printed if grep.strip() in line]
        for line in shown.splitlines():
            if line.strip() != "...":
                assert line in printed, f"README line not printed by `{command}`: {line}"
