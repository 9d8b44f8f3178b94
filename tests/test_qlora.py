"""train.quantize_base (QLoRA): the config's refusals, the memory plan's bitsandbytes bytes (against a model
bitsandbytes loaded, and against peft's published 70B figure), the adapter's record, merge's note, compare's rows,
and training through bitsandbytes' CPU backend: in-process under `replicate` (train, resume, merge, verify), and on
2 ranks under ZeRO-3 against 1 rank x GA 2 (slow). The bf16 GPU path (quant storage in bf16, the load onto each
GPU) needs a GPU and is not run here.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gift_dist.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
LLAMA3_70B = REPO / "examples/llama3-70b-config.json"
STEPS = 3


def _config(*overrides: str):
    return load_config(None, list(overrides))


def test_quantize_base_defaults_to_none_and_refuses_what_cannot_work():
    assert _config().train.quantize_base == "none"
    with pytest.raises(ConfigError, match="both quantize the frozen base"):
        _config("train.quantize_base=nf4", "train.quantized_frozen_weights=true", "train.sharding=zero3")
    with pytest.raises(ConfigError, match="under train.sharding=zero3 needs gradient checkpointing"):
        _config("train.quantize_base=int8", "train.sharding=zero3", "train.gradient_checkpointing=false")
    with pytest.raises(ConfigError, match="quantize_base"):
        _config("train.quantize_base=nf3")


def test_without_bitsandbytes_the_config_is_one_line_naming_the_extra(monkeypatch, tmp_path, capsys):
    """Exit status 2 and the install command, before the output folder or the model (which does not exist)."""
    from gift_dist.cli import main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "bitsandbytes" else find_spec(name, *rest))
    run = tmp_path / "run"
    assert main(["train", f"output_dir={run}", "base_model=nowhere", "train.quantize_base=nf4"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'gift-dist[qlora]'" in err and "Traceback" not in err
    assert not run.exists()


def test_zero3_recomputes_with_a_quantized_base_and_nf4_is_stored_in_the_compute_dtype():
    """A zero3 ds_config under train.sharding=auto passes the config's check; the engine resolves the layout and
    turns recompute on (auto) or refuses it off."""
    pytest.importorskip("bitsandbytes")
    from gift_dist.train.engine import (Layout, bnb_quantization_config, choose_checkpointing, frozen_weights_note,
                                        resolve_ds_config)

    layout = Layout("zero3", resolve_ds_config("zero3"), "train.ds_config=zero3")
    cfg = _config("train.quantize_base=nf4", "train.ds_config=zero3")
    assert choose_checkpointing(cfg, layout, 2, None) == (True, "required: train.quantize_base=nf4 under ZeRO-3")
    off = _config("train.quantize_base=nf4", "train.ds_config=zero3", "train.gradient_checkpointing=false")
    with pytest.raises(ConfigError, match="needs gradient checkpointing"):
        choose_checkpointing(off, layout, 2, None)
    replicated = Layout("replicate", resolve_ds_config("replicate"), "train.sharding=replicate")
    assert choose_checkpointing(off, replicated, 2, None) == (False, "train.gradient_checkpointing=false")

    nf4 = bnb_quantization_config("nf4", torch.bfloat16)
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    # peft's ZeRO-3 QLoRA recipe: the packed codes stored in the compute dtype, so ZeRO-3 partitions them.
    assert nf4.bnb_4bit_quant_storage == nf4.bnb_4bit_compute_dtype == torch.bfloat16
    assert bnb_quantization_config("int8", torch.bfloat16).load_in_8bit
    assert bnb_quantization_config("none", torch.bfloat16) is None
    zero3 = {"zero_optimization": {"stage": 3}}
    assert frozen_weights_note(zero3, "nf4").startswith("nf4 by bitsandbytes") and frozen_weights_note(zero3, "none") \
        == "bf16"


def test_a_gpu_smaller_than_the_quantized_base_is_refused_before_loading(monkeypatch):
    """Llama-3-70B in nf4 is 36.8 GiB whole, which each GPU holds while it loads: a 24 GiB GPU is refused in one
    line, an 80 GiB one is not."""
    pytest.importorskip("bitsandbytes")
    from gift_dist.config import LoraConfig
    from gift_dist.memory_plan import model_shape
    from gift_dist.train import engine

    shape = model_shape(str(LLAMA3_70B), 16, LoraConfig().target_modules)
    cfg = _config("train.quantize_base=nf4")
    monkeypatch.setattr(engine, "on_gpu", lambda: True)
    monkeypatch.setattr(engine, "gpu_memory_gib", lambda: 24.0)
    with pytest.raises(ConfigError, match=r"whole quantized base \(~36.8 GiB\) while it loads, more than this 24 GiB"):
        engine.check_quantized_load(cfg, shape)
    monkeypatch.setattr(engine, "gpu_memory_gib", lambda: 80.0)
    engine.check_quantized_load(cfg, shape)


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_the_plan_counts_the_bytes_bitsandbytes_holds(tiny_pair, quantize):
    """model_shape's quantizable weights are the ones bitsandbytes replaced in a loaded model, and
    frozen_weight_bytes' packed weights and constants are the bytes it holds (nf4's nested constants up to the
    rounding of one 256-block per tensor)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from gift_dist.config import LoraConfig
    from gift_dist.memory_plan import (NF4_BLOCK, NF4_NESTED_BLOCK, QUANTIZED_WEIGHT_BYTES, model_shape,
                                       quantization_constant_bytes)
    from gift_dist.train.engine import bnb_quantization_config

    pair = tiny_pair(arch="llama", seed=0, base_steps=2, instruct_steps=2)
    shape = model_shape(str(pair.base), 4, LoraConfig().target_modules)
    model = AutoModelForCausalLM.from_pretrained(str(pair.base), dtype=torch.float32,
                                                 quantization_config=bnb_quantization_config(quantize, torch.float32))
    replaced = [m for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    weights = [m.weight for m in replaced]
    assert len(replaced) == 2 * 7 and shape.largest_quantizable_params == max(m.out_features * m.in_features
                                                                              for m in replaced)
    assert shape.quantizable_params == sum(m.out_features * m.in_features for m in replaced)
    assert sum(w.numel() * w.element_size() for w in weights) == QUANTIZED_WEIGHT_BYTES[quantize] * \
        shape.quantizable_params
    planned = quantization_constant_bytes(quantize, shape.quantizable_params, shape.quantizable_rows)
    if quantize == "int8":
        assert sum(w.SCB.numel() * w.SCB.element_size() for w in weights) == planned
        return
    states = [w.quant_state for w in weights]
    assert {(s.blocksize, s.state2.blocksize) for s in states} == {(NF4_BLOCK, NF4_NESTED_BLOCK)}
    held = sum(s.absmax.numel() * s.absmax.element_size() + s.state2.absmax.numel() * 4 for s in states)
    assert 0 <= held - planned <= 4 * len(states)


def _plan(capsys, model: Path, *flags: str) -> str:
    from gift_dist.cli import main

    assert main(["plan", "--model", str(model), *flags]) == 0
    return capsys.readouterr().out


def test_70b_with_a_4bit_base_on_2_x_24_and_8_x_80_gib(capsys):
    """Llama-3-70B nf4: each GPU loads the whole 4-bit base (36.8 GiB) before ZeRO-3 partitions it, so 24 GiB GPUs
    are too small however many; on 80 GiB GPUs the 4-bit base trains replicated (no per-layer gathers)."""
    from gift_dist.config import LoraConfig
    from gift_dist.memory_plan import GIB, frozen_weight_bytes, model_shape, training_plan

    small = _plan(capsys, LLAMA3_70B, "--gpus-per-node", "2", "--gpu-memory-gb", "24", "--quantize-base", "nf4")
    assert "frozen weights nf4 (bitsandbytes, train.quantize_base)" in small
    assert "  load (whole base)" in small
    assert "fits 24 GiB GPUs / 1024 GiB nodes: none: each GPU holds the whole nf4 base (36.8 GiB) while it loads" \
        in small
    large = _plan(capsys, LLAMA3_70B, "--gpus-per-node", "8", "--quantize-base", "nf4")
    assert "  replicate                47.1               6.2" in large
    assert "fits 80 GiB GPUs / 1024 GiB nodes: ds_configs/replicate.json (train.sharding: auto -> replicate)" in large

    shape = model_shape(str(LLAMA3_70B), 16, LoraConfig().target_modules)
    params, constants = frozen_weight_bytes(shape, "nf4")
    # Every decoder linear is quantized; the embeddings (and the output layer, 2 x 128256 x 8192) stay bf16.
    assert shape.total_params - shape.quantizable_params == 2 * 128256 * 8192 + (2 * 80 + 1) * 8192
    plans = training_plan(shape, 8, 1, 4096, 1024, quantize_base="nf4")
    zero3 = plans["zero3"]
    assert zero3["items"]["frozen_weights"] * GIB == pytest.approx(params / 8 + constants)
    assert zero3["load_gib"] * GIB == pytest.approx(params + constants)
    assert zero3["gpu_gib"] == max(sum(zero3["items"].values()), zero3["load_gib"])
    bf16 = training_plan(shape, 8, 1, 4096, 1024)["zero3"]
    assert bf16["load_gib"] == 0 and bf16["gpu_gib"] == sum(bf16["items"].values())
    assert sum(zero3["items"].values()) < bf16["gpu_gib"]


def test_the_plan_against_peft_s_published_zero3_qlora_figure(tmp_path):
    """peft's docs (accelerate/deepspeed.md, "Use PEFT QLoRA and DeepSpeed with ZeRO3"): Llama-2-70B, nf4 with
    double quantization and bf16 quant storage, ZeRO-3 on 2 GPUs, LoRA r 8 on every linear layer, 2 x 2048 packed
    tokens per micro-batch, gradient checkpointing: 36.6 GB per GPU. An estimate against one reading: the figure
    is nvidia-smi's (the CUDA context and the allocator's cache are in it, not in our sum), on another stack (TRL,
    flash-attention), and its unit may be GB or GiB (7.4% apart). 10% admits both readings of the unit; a plan
    without the load peak (the steady state alone, 27 GiB) is 20% below it and fails."""
    from gift_dist.memory_plan import GIB, model_shape, training_plan

    llama2 = {**json.loads(LLAMA3_70B.read_text()), "vocab_size": 32000, "rope_theta": 10000.0,
              "max_position_embeddings": 4096}
    config = tmp_path / "llama2-70b.json"
    config.write_text(json.dumps(llama2))
    shape = model_shape(str(config), 8, "auto")
    zero3 = training_plan(shape, 2, 1, 2 * 2048, 1024, quantize_base="nf4")["zero3"]
    published = 36.6e9
    assert abs(zero3["gpu_gib"] * GIB - published) <= 0.10 * published
    assert sum(zero3["items"].values()) * GIB < 0.85 * published


def test_the_adapter_records_the_quantized_base_and_older_ones_read_as_none():
    from gift_dist.contracts import ContractError
    from gift_dist.contracts.adapter import AdapterProvenance, quantized_base_note

    provenance = AdapterProvenance(
        train_model="base", model_identity={"hash": "b"}, base_model={"hash": "b"}, instruct_model={"hash": "i"},
        prepared_fingerprint="f", weighting={}, lora={}, train_config={}, steps=1, world_size=1,
        global_batch_size=1, complete=True, quantize_base="nf4")
    record = provenance.to_json()
    assert AdapterProvenance.from_json(record, "here").quantize_base == "nf4"
    assert "full-precision" in quantized_base_note(provenance) and "nf4" in quantized_base_note(provenance)
    older = {key: value for key, value in record.items() if key != "quantize_base"}
    assert quantized_base_note(AdapterProvenance.from_json(older, "here")) is None
    with pytest.raises(ContractError, match="quantize_base must be one of"):
        AdapterProvenance.from_json({**record, "quantize_base": "fp4"}, "here")


def test_compare_puts_each_quantized_row_beside_its_method(tmp_path):
    pytest.importorskip("bitsandbytes")
    from gift_dist.pipeline.compare import compared_rows, split_row, summarise, variant_config

    assert compared_rows(["gift", "shadow-ft"], ["nf4"]) == ["gift", "gift+nf4", "shadow-ft", "shadow-ft+nf4"]
    assert split_row("dft+int8") == ("dft", "int8") and split_row("dft") == ("dft", "none")
    cfg = _config(f"output_dir={tmp_path / 'run'}")
    variant = variant_config(cfg, "shadow-ft+nf4", 1)
    assert variant.train.quantize_base == "nf4" and variant.train.weighting == "uniform"
    assert variant.train.seed == cfg.train.seed + 1
    assert Path(variant.output_dir) == tmp_path / "run" / "compare" / "shadow-ft+nf4" / "seed-1"

    def scores(name: str, accuracy: float):
        return SimpleNamespace(name=name, task_accuracy=accuracy, task_ce=1.0, general_exact_match=None,
                               general_ce=None, kl_to_instruct=None, task_samples=100, general_generated=0)

    summary = summarise([scores("instruct", 0.1), scores("gift/seed-0", 0.5), scores("gift+nf4/seed-0", 0.3)],
                        ["gift", "gift+nf4"])
    assert summary["gift"]["task_accuracy"][0] == 0.5 and summary["gift+nf4"]["task_accuracy"][0] == 0.3
    assert summary["gift+nf4"]["vs_gift"]["diff"] == pytest.approx(-0.2)


def test_compare_refuses_unknown_or_redundant_quantize_variants(tmp_path):
    from gift_dist.cli import main

    options = ["--seeds", "1", "prepare.eval_fraction=0.1", "base_model=b", "instruct_model=i"]
    assert main(["compare", "--quantize-variants", "nf3", *options, f"output_dir={tmp_path / 'a'}"]) == 2
    if importlib.util.find_spec("bitsandbytes") is not None:
        assert main(["compare", "--quantize-variants", "nf4", *options, f"output_dir={tmp_path / 'b'}",
                     "train.quantize_base=nf4"]) == 2


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def _qlora_config(pair, data: Path, output: Path, *extra: str):
    return load_config(None, [
        f"base_model={pair.base}", f"instruct_model={pair.instruct}", f"output_dir={output}", f"data.files=[{data}]",
        "prepare.max_length=96", "prepare.samples_per_shard=8", "train.weighting=uniform", "train.quantize_base=nf4",
        f"train.max_steps={STEPS}", "train.save_every_steps=2", "train.micro_batch_size=2",
        "train.learning_rate=1e-2", "train.warmup_steps=0", "train.lora.r=4", "train.lora.alpha=8",
        "train.lora.dropout=0.0", "train.progress=false", "merge.progress=false",
        # A held-out split evaluated at every step: the trainer's evaluation runs the quantized layers in eval mode.
        "prepare.eval_fraction=0.25", "train.eval_every_steps=1", *extra,
    ])


@pytest.fixture
def qlora_data(tmp_path):
    from gift_dist.bundled import bundled_data_path, read_jsonl, write_jsonl

    return write_jsonl(read_jsonl(bundled_data_path())[:24], tmp_path / "data.jsonl")


# Slow (about 7 s, the quick loop's largest test): the quick loop trains, resumes and merges in full precision
# (tests/test_quick_train.py); the QLoRA config, plan and refusals stay quick.
@pytest.mark.slow
def test_a_qlora_adapter_trains_resumes_merges_and_verifies_on_cpu(tiny_pair, tmp_path, single_rank, qlora_data):
    """nf4 through bitsandbytes' CPU backend, `replicate`: the loss moves and differs from the full-precision run's
    (the base really is quantized), a resume from the step-2 checkpoint repeats step 3 (so the held-out evaluation
    after steps 1 and 2 left the quantized base as it was), the adapter records nf4,
    merge (verify on) writes W_inst + (alpha/r) B A into the full-precision instruct weights and says why."""
    pytest.importorskip("bitsandbytes")
    from gift_dist.contracts import merged as merged_contract
    from gift_dist.contracts.adapter import read_adapter
    from gift_dist.contracts.checkpoint import LATEST_NAME, tag_for
    from gift_dist.merge.stage import merge
    from gift_dist.prepare.stage import prepare
    from gift_dist.train.metrics import METRICS_NAME, read_metrics
    from gift_dist.train.recipe import train

    pair = tiny_pair(arch="llama", seed=0, base_steps=2, instruct_steps=2)
    cfg = _qlora_config(pair, qlora_data, tmp_path / "nf4", "train.sharding=replicate")
    prepare(cfg)
    result = train(cfg)
    losses = [row["loss"] for row in read_metrics(cfg.paths.logs / METRICS_NAME)]
    assert result.steps == STEPS and len(set(losses)) == STEPS

    full = _qlora_config(pair, qlora_data, tmp_path / "bf16", "train.sharding=replicate", "train.quantize_base=none",
                         "train.max_steps=1")
    shutil.copytree(cfg.paths.prepared, full.paths.prepared)
    train(full)
    assert read_metrics(full.paths.logs / METRICS_NAME)[0]["loss"] != pytest.approx(losses[0], abs=1e-6)

    resumed = _qlora_config(pair, qlora_data, tmp_path / "resumed", "train.sharding=replicate")
    shutil.copytree(cfg.paths.prepared, resumed.paths.prepared)
    shutil.copytree(cfg.paths.checkpoints / tag_for(2), resumed.paths.checkpoints / tag_for(2))
    (resumed.paths.checkpoints / LATEST_NAME).write_text(tag_for(2) + "\n")
    train(resumed, resume=True)
    assert read_metrics(resumed.paths.logs / METRICS_NAME)[0]["loss"] == pytest.approx(losses[-1], rel=1e-6)

    adapter = read_adapter(result.adapter)
    assert adapter.provenance.quantize_base == "nf4" and adapter.provenance.train_config["quantize_base"] == "nf4"
    merged_dir = merge(cfg)  # merge.verify: recomputed tensors and logits against peft on the instruct model
    record = merged_contract.read_merged(merged_dir).record
    assert "nf4" in record.quantized_base and "full-precision" in record.quantized_base
    instruct, merged = _safetensors(pair.instruct), _safetensors(merged_dir)
    changed = set()
    for a_name, a in adapter.tensors.items():
        if ".lora_A." not in a_name:
            continue
        b = adapter.tensors[a_name.replace(".lora_A.", ".lora_B.")]
        weight = a_name.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight")
        expected = instruct[weight].double() + adapter.scale * (b.double() @ a.double())
        torch.testing.assert_close(merged[weight].double(), expected.to(merged[weight].dtype).double(),
                                   rtol=1e-5, atol=1e-6)
        changed.add(weight)
    assert changed and all(torch.equal(merged[n], instruct[n]) for n in set(instruct) - changed)


def _launch(cfg, procs: int) -> None:
    import os

    from gift_dist.config import dump_config

    config_file = Path(cfg.output_dir) / "run.yaml"
    dump_config(cfg, config_file)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(procs), "-m", "gift_dist.cli", "train", "--config", str(config_file)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_zero3_on_2_ranks_trains_a_quantized_base_like_1_rank_x_ga_2(tiny_pair, tmp_path, qlora_data, quantize):
    """ZeRO-3 partitions the packed weights (bitsandbytes' constants stay whole on each rank) and gathers them for
    each layer: 2 ranks under ZeRO-3 (recompute on, as required) give the losses and adapter of 1 rank x GA 2 under
    replicate."""
    pytest.importorskip("bitsandbytes")
    from gift_dist.contracts.adapter import read_adapter
    from gift_dist.prepare.stage import prepare
    from gift_dist.train.metrics import METRICS_NAME, read_metrics

    pair = tiny_pair(arch="llama", seed=0, base_steps=2, instruct_steps=2)
    runs = {}
    for name, procs, extra in (("zero3", 2, ["train.sharding=zero3", "train.gradient_accumulation_steps=1"]),
                               ("replicate", 1, ["train.sharding=replicate", "train.gradient_accumulation_steps=2",
                                                 "train.gradient_checkpointing=true"])):
        cfg = _qlora_config(pair, qlora_data, tmp_path / name, f"train.quantize_base={quantize}", "train.max_steps=2",
                            *extra)
        if not runs:
            prepare(cfg)
        else:
            shutil.copytree(runs["zero3"].paths.prepared, cfg.paths.prepared)
        _launch(cfg, procs)
        runs[name] = cfg
    losses = {name: [row["loss"] for row in read_metrics(cfg.paths.logs / METRICS_NAME)] for name, cfg in runs.items()}
    assert len(losses["zero3"]) == 2 and losses["zero3"] == pytest.approx(losses["replicate"], rel=1e-5)
    sharded, single = (read_adapter(runs[name].paths.adapter) for name in ("zero3", "replicate"))
    assert sharded.provenance.quantize_base == quantize and sharded.provenance.world_size == 2
    for name, tensor in single.tensors.items():
        torch.testing.assert_close(sharded.tensors[name], tensor, rtol=1e-4, atol=1e-6)
