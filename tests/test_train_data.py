"""Streaming confidence reader, deterministic rank / micro-batch split, and packing equivalence on a tiny model."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from gift_dist.config import ConfigError, TrainConfig
from gift_dist.contracts import ContractError, file_sha256
from gift_dist.contracts import confidence as conf_contract
from gift_dist.contracts import prepared as prep_contract
from gift_dist.train.data import ConfidenceReader, TrainBatches
from gift_dist.train.loss import target_token_ce

EOS_ID = 2
PAD_ID = 0
INSTRUCT = {"name": "tiny-instruct", "hash": "abc"}


def make_prepared(out_dir: Path, num_samples: int = 40, samples_per_shard: int = 8, fingerprint: str = "fp-1"):
    """A prepared dataset of synthetic chats: a 3-token prompt, then targets ending in EOS (ids < 300)."""
    gen = torch.Generator().manual_seed(num_samples)
    input_ids, labels = [], []
    for i in range(num_samples):
        prompt = torch.randint(10, 300, (3,), generator=gen).tolist()
        answer = torch.randint(10, 300, (2 + i % 5,), generator=gen).tolist() + [EOS_ID]
        input_ids.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    from datasets import Dataset

    num_tokens = [len(x) for x in input_ids]
    num_targets = [sum(v != -100 for v in lab) for lab in labels]
    dataset = Dataset.from_dict({
        "input_ids": input_ids, "labels": labels, "record_index": list(range(num_samples)),
        "num_tokens": num_tokens, "num_target_tokens": num_targets,
    })
    manifest = prep_contract.PreparedManifest(
        fingerprint=fingerprint, tokenizer={}, settings={}, sources=[], counts={"kept": num_samples},
        tokens={"total": sum(num_tokens), "target": sum(num_targets)}, eos_token_ids=[EOS_ID], pad_token_id=PAD_ID,
        shards=prep_contract.plan_shards(num_tokens, num_targets, samples_per_shard),
    )
    prep_contract.write_prepared(out_dir, dataset, manifest)
    return prep_contract.load_prepared(out_dir)


def sample_logprobs(sample_index: int, count: int) -> torch.Tensor:
    """Distinct, recognisable values per sample and position."""
    return -(sample_index + 1 + torch.arange(count, dtype=torch.float32)) / 100.0


def start_confidence(conf_dir: Path, prepared, fingerprint=None):
    template = conf_contract.ConfidenceManifest(
        prepared_fingerprint=fingerprint or prepared.manifest.fingerprint, instruct_model=INSTRUCT,
        logprob_dtype="float32", num_shards=len(prepared.manifest.shards),
    )
    return conf_contract.init_manifest(conf_dir, template)


def write_confidence_shard(conf_dir: Path, prepared, manifest, shard_index: int, short_sample: int | None = None):
    spec = prepared.manifest.shards[shard_index]
    counts = prepared.dataset["num_target_tokens"][spec.start : spec.end]
    values = []
    for sample, count in zip(range(spec.start, spec.end), counts):
        values.append(sample_logprobs(sample, count - (sample == short_sample)))
    offsets = torch.tensor([0] + [v.numel() for v in values]).cumsum(0)
    conf_contract.write_shard(conf_dir, manifest, shard_index, torch.arange(spec.start, spec.end), offsets,
                              torch.cat(values))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def scored(prepared, tmp_path_factory):
    """A finished confidence directory for ``prepared``."""
    conf_dir = tmp_path_factory.mktemp("confidence")
    manifest = start_confidence(conf_dir, prepared)
    for shard in prepared.manifest.shards:
        write_confidence_shard(conf_dir, prepared, manifest, shard.index)
    return conf_dir


def reader(conf_dir, prepared, wait=5.0, poll=0.05):
    return ConfidenceReader(conf_dir, prepared, wait_seconds=wait, poll_seconds=poll, instruct_identity=INSTRUCT)


# ---------------------------------------------------------------------------------------------- ConfidenceReader


def test_reader_returns_each_samples_logprobs_and_caches_few_shards(prepared, scored, monkeypatch):
    """Every sample's values, each shard read from disk once while the samples come in order; only the last few
    shards stay decoded (going back to the first one reads it again)."""
    from gift_dist.train import data as train_data

    reads = []
    original = train_data.conf_contract.read_shard
    monkeypatch.setattr(train_data.conf_contract, "read_shard",
                        lambda conf_dir, manifest, index: reads.append(index) or original(conf_dir, manifest, index))
    confidence = reader(scored, prepared)
    counts = prepared.dataset["num_target_tokens"]
    for sample in range(len(prepared)):
        torch.testing.assert_close(confidence.logprobs(sample), sample_logprobs(sample, counts[sample]))
    num_shards = len(prepared.manifest.shards)
    assert reads == list(range(num_shards)) and num_shards > train_data.SHARD_CACHE_SIZE
    confidence.logprobs(len(prepared) - 1)  # still decoded
    assert len(reads) == num_shards
    confidence.logprobs(0)  # evicted long ago
    assert reads[-1] == 0 and len(reads) == num_shards + 1


def test_reader_waits_for_a_shard_written_by_a_slow_writer(prepared, tmp_path, caplog):
    conf_dir = tmp_path / "confidence"
    manifest = start_confidence(conf_dir, prepared)
    write_confidence_shard(conf_dir, prepared, manifest, 0)
    delay = 0.6

    def slow_writer():
        time.sleep(delay)
        write_confidence_shard(conf_dir, prepared, manifest, 1)

    confidence = reader(conf_dir, prepared, wait=30.0, poll=0.05)
    sample = prepared.manifest.shards[1].start + 2
    writer = threading.Thread(target=slow_writer)
    started = time.monotonic()
    writer.start()
    with caplog.at_level(logging.INFO, logger="gift_dist.train.data"):
        values = confidence.logprobs(sample)
    waited = time.monotonic() - started
    writer.join()
    assert waited >= delay * 0.9
    torch.testing.assert_close(values, sample_logprobs(sample, prepared.dataset[sample]["num_target_tokens"]))
    assert "waiting for confidence shard 1" in caplog.text and "1 of 5 shards finished" in caplog.text


def test_reader_times_out_naming_the_missing_shard(prepared, tmp_path):
    conf_dir = tmp_path / "confidence"
    manifest = start_confidence(conf_dir, prepared)
    write_confidence_shard(conf_dir, prepared, manifest, 0)
    confidence = reader(conf_dir, prepared, wait=0.3)
    started = time.monotonic()
    with pytest.raises(ContractError, match=r"confidence shard 2 \(shard-00002.safetensors, samples \[16, 24\)\)"
                                            r".*1 of 5 shards finished"):
        confidence.logprobs(17)
    assert 0.25 <= time.monotonic() - started < 5.0


def test_reader_times_out_when_the_scorer_never_started(prepared, tmp_path):
    with pytest.raises(ContractError, match="scorer has not started"):
        reader(tmp_path / "nothing", prepared, wait=0.1).logprobs(0)


def test_reader_refuses_a_wrong_fingerprint(prepared, tmp_path):
    conf_dir = tmp_path / "confidence"
    manifest = start_confidence(conf_dir, prepared, fingerprint="some-other-dataset")
    write_confidence_shard(conf_dir, prepared, manifest, 0)
    with pytest.raises(ContractError, match="prepared fingerprint some-other-dataset"):
        reader(conf_dir, prepared).logprobs(0)


def test_reader_refuses_another_instruct_model(prepared, scored):
    confidence = ConfidenceReader(scored, prepared, 1.0, 0.1, instruct_identity={"name": "other", "hash": "zzz"})
    with pytest.raises(ContractError, match="scored by instruct model tiny-instruct"):
        confidence.logprobs(0)


def test_reader_refuses_a_sample_whose_logprob_count_mismatches(prepared, tmp_path):
    conf_dir = tmp_path / "confidence"
    manifest = start_confidence(conf_dir, prepared)
    write_confidence_shard(conf_dir, prepared, manifest, 0, short_sample=5)
    expected = prepared.dataset[5]["num_target_tokens"]
    with pytest.raises(ContractError, match=f"shard-00000.safetensors: sample 5 has {expected - 1} logprobs but "
                                            f"{expected} target tokens"):
        reader(conf_dir, prepared).logprobs(3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_reader_rejects_non_finite_logprobs(prepared, tmp_path, bad):
    """A shard with a NaN / inf written behind the contract's back (write_shard itself refuses them)."""
    from safetensors.torch import save_file

    conf_dir = tmp_path / "confidence"
    manifest = start_confidence(conf_dir, prepared)
    spec = prepared.manifest.shards[0]
    counts = prepared.dataset["num_target_tokens"][spec.start : spec.end]
    values = torch.cat([sample_logprobs(s, c) for s, c in zip(range(spec.start, spec.end), counts)])
    offsets = torch.tensor([0] + counts).cumsum(0)
    values[int(offsets[3]) + 1] = bad
    path = conf_dir / conf_contract.shard_filename(0)
    save_file({"sample_index": torch.arange(spec.start, spec.end), "offsets": offsets, "logprobs": values},
              str(path), metadata={"format": conf_contract.FORMAT, "version": str(conf_contract.VERSION),
                                   "prepared_fingerprint": prepared.manifest.fingerprint})
    manifest.shards[0] = conf_contract.ShardRecord(0, path.name, file_sha256(path), spec.num_samples,
                                                   values.numel())
    (conf_dir / conf_contract.MANIFEST_NAME).write_text(json.dumps(manifest.to_json()))
    with pytest.raises(ContractError, match="non-finite logprob for sample 3 at target position 1"):
        reader(conf_dir, prepared).logprobs(0)


def test_reader_refuses_a_shard_plan_of_another_size(prepared, tmp_path):
    conf_dir = tmp_path / "confidence"
    conf_contract.init_manifest(conf_dir, conf_contract.ConfidenceManifest(
        prepared_fingerprint=prepared.manifest.fingerprint, instruct_model=INSTRUCT, logprob_dtype="float32",
        num_shards=3))
    with pytest.raises(ContractError, match="plans 3 shards"):
        reader(conf_dir, prepared).logprobs(0)


@pytest.mark.parametrize("wait, poll, message", [(1.0, 0.0, "confidence_poll_seconds"),
                                                  (-1.0, 1.0, "confidence_wait_seconds")])
def test_config_refuses_bad_wait_settings(wait, poll, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(confidence_wait_seconds=wait, confidence_poll_seconds=poll)


# ------------------------------------------------------------------------------------------------- TrainBatches


def batches(prepared, conf_dir, rank=0, world=1, seed=7, confidence=True, **cfg):
    train_cfg = TrainConfig(**cfg)
    return TrainBatches(prepared, train_cfg, rank, world, reader(conf_dir, prepared) if confidence else None, seed)


def rank_sets(prepared, conf_dir, step, world, **cfg):
    """{rank: [set per micro-batch]} of ``step``."""
    return {
        rank: [set(mb.sample_indices) for mb in batches(prepared, conf_dir, rank, world, **cfg).micro_batches(step)]
        for rank in range(world)
    }


@pytest.mark.parametrize("world, grad_accum", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)])
def test_rank_slices_are_disjoint_and_cover_the_global_batch(prepared, scored, world, grad_accum):
    cfg = dict(micro_batch_size=2, gradient_accumulation_steps=grad_accum, epochs=2)
    layout = batches(prepared, scored, 0, world, **cfg)
    for step in (0, layout.steps_per_epoch):  # one step of epoch 0 and one of the permuted epoch 1
        seen = [s for sets in rank_sets(prepared, scored, step, world, **cfg).values() for mb in sets for s in mb]
        assert len(seen) == len(set(seen)) == layout.global_batch == 2 * grad_accum * world
        assert set(seen) == set(layout.global_batch_indices(step).tolist())


def test_any_rank_and_accumulation_split_gives_the_same_samples_per_step(prepared, scored):
    # Each rank's batches built once and walked step by step, as a trainer walks them.
    ranks = [batches(prepared, scored, rank, 2, micro_batch_size=2, gradient_accumulation_steps=1, epochs=3)
             for rank in range(2)]
    accumulating = batches(prepared, scored, 0, 1, micro_batch_size=2, gradient_accumulation_steps=2, epochs=3)
    assert ranks[0].total_steps == accumulating.total_steps > 0
    for step in range(ranks[0].total_steps):
        by_ranks = {i for data in ranks for mb in data.micro_batches(step) for i in mb.sample_indices}
        by_accumulation = {i for mb in accumulating.micro_batches(step) for i in mb.sample_indices}
        assert by_ranks == by_accumulation and len(by_ranks) == 4


def test_epoch_zero_keeps_the_shard_order_and_later_epochs_are_seeded_permutations(prepared, scored):
    """Epoch 0 visits the scorer's shards in prepared order (so it can stream them), each shard's samples
    shuffled by the seed; later epochs are seeded permutations of everything."""
    data = batches(prepared, scored, micro_batch_size=4, epochs=3)
    epoch0 = [i for step in range(data.steps_per_epoch) for mb in data.micro_batches(step) for i in mb.sample_indices]
    assert epoch0 == data.epoch_order(0).tolist() != list(range(len(prepared)))
    for shard in prepared.manifest.shards:
        assert sorted(epoch0[shard.start : shard.end]) == list(range(shard.start, shard.end))
    epoch1 = data.epoch_order(1).tolist()
    epoch2 = data.epoch_order(2).tolist()
    assert sorted(epoch1) == list(range(len(prepared))) and epoch1 != epoch0 and epoch1 != epoch2
    assert batches(prepared, scored, micro_batch_size=4, epochs=3).epoch_order(1).tolist() == epoch1
    assert batches(prepared, scored, seed=8, micro_batch_size=4, epochs=3).epoch_order(1).tolist() != epoch1


def test_two_seeds_give_different_epoch_orders_and_each_seed_repeats_its_own(prepared, scored):
    """train.seed shuffles every epoch, the first included: with one epoch two seeds train on other batches; the
    same seed gives the same order in a new process-like instance (resume rebuilds it from nothing)."""
    def orders(seed):
        data = batches(prepared, scored, seed=seed, micro_batch_size=4, epochs=2)
        return [data.epoch_order(epoch).tolist() for epoch in (0, 1)], [
            data.global_batch_indices(step).tolist() for step in range(data.total_steps)]

    (seed7, steps7), (seed8, steps8) = orders(7), orders(8)
    assert seed7[0] != seed8[0] and seed7[1] != seed8[1]
    assert steps7[0] != steps8[0]  # the very first batch differs
    assert orders(7) == (seed7, steps7) and orders(8) == (seed8, steps8)
    budget = [batches(prepared, scored, seed=seed, micro_batch_tokens=30, epochs=1).epoch_micro_batches(0)
              for seed in (7, 7, 8)]
    as_lists = [[mb.tolist() for mb in plan] for plan in budget]
    assert as_lists[0] == as_lists[1] != as_lists[2]  # the token-budget plan follows the seeded order


def test_resume_is_calling_micro_batches_at_the_step(prepared, scored):
    first = batches(prepared, scored, micro_batch_size=4, epochs=2)
    walked = [mb for step in range(first.total_steps) for mb in first.micro_batches(step)]
    resumed = batches(prepared, scored, micro_batch_size=4, epochs=2)
    step = first.steps_per_epoch + 3
    for a, b in zip(walked[step:], [mb for s in range(step, resumed.total_steps) for mb in resumed.micro_batches(s)]):
        assert a.sample_indices == b.sample_indices
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.inst_logprobs, b.inst_logprobs)
    with pytest.raises(IndexError, match="outside the run"):
        resumed.micro_batches(resumed.total_steps)


def test_step_counts_drop_the_partial_batch_and_respect_max_steps(prepared, scored, caplog):
    with caplog.at_level(logging.INFO, logger="gift_dist.train.data"):
        data = batches(prepared, scored, 0, 2, micro_batch_size=3, gradient_accumulation_steps=2, epochs=3)
    assert data.steps_per_epoch == 40 // 12 and data.total_steps == 3 * (40 // 12)
    assert "4 samples per epoch" in caplog.text
    capped = batches(prepared, scored, micro_batch_size=4, epochs=3, max_steps=5)
    assert capped.total_steps == 5


def test_refuses_a_dataset_smaller_than_one_global_batch(prepared, scored):
    with pytest.raises(ConfigError, match="40 samples, fewer than one global batch of 48"):
        batches(prepared, scored, 0, 4, micro_batch_size=6, gradient_accumulation_steps=2)


@pytest.mark.parametrize("changes, message", [
    (dict(micro_batch_size=0), "micro_batch_size"),
    (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
    (dict(max_steps=0), "max_steps"),
])
def test_refuses_bad_batch_settings(prepared, scored, changes, message):
    with pytest.raises(ConfigError, match=message):
        batches(prepared, scored, **changes)


def test_micro_batch_tensors_align_with_the_confidence_order(prepared, scored):
    data = batches(prepared, scored, micro_batch_size=3, epochs=2)
    for mb in data.micro_batches(data.steps_per_epoch + 1):
        targets = mb.labels[:, 1:][mb.labels[:, 1:] != -100]
        expected = torch.cat([sample_logprobs(i, prepared.dataset[i]["num_target_tokens"]) for i in mb.sample_indices])
        torch.testing.assert_close(mb.inst_logprobs, expected)
        assert mb.is_eos.tolist() == (targets == EOS_ID).tolist() and int(mb.is_eos.sum()) == 3
        assert mb.sample_lengths.tolist() == [prepared.dataset[i]["num_target_tokens"] for i in mb.sample_indices]
        assert mb.num_target_tokens == targets.numel()
        assert mb.num_tokens == sum(prepared.dataset[i]["num_tokens"] for i in mb.sample_indices)
        assert (mb.input_ids[mb.attention_mask == 0] == PAD_ID).all()


def test_micro_batch_moves_all_its_tensors(prepared, scored):
    mb = batches(prepared, scored, micro_batch_size=2, packing=True).micro_batches(0)[0]
    moved = mb.to("meta")
    assert all(t.device.type == "meta" for t in (moved.input_ids, moved.labels, moved.position_ids,
                                                 moved.inst_logprobs, moved.is_eos, moved.sample_lengths))
    assert moved.attention_mask is None and moved.sample_indices == mb.sample_indices
    assert mb.input_ids.device.type == "cpu"


@pytest.mark.parametrize("name", ["uniform", "dft"])
def test_uniform_and_dft_need_no_confidence(prepared, name):
    data = TrainBatches(prepared, TrainConfig(weighting=name, micro_batch_size=4), 0, 1, None, seed=0)
    mb = data.micro_batches(0)[0]
    assert mb.inst_logprobs is None and mb.num_target_tokens > 0


def test_confidence_weightings_refuse_to_run_without_a_reader(prepared):
    with pytest.raises(ConfigError, match="weighting 'gift' needs the scorer's confidence"):
        TrainBatches(prepared, TrainConfig(weighting="gift"), 0, 1, None, seed=0)


def test_refuses_a_sample_whose_labels_disagree_with_its_target_count(tmp_path):
    prepared = make_prepared(tmp_path / "prepared", num_samples=8)
    bad = prepared.dataset.map(lambda row, i: {"num_target_tokens": row["num_target_tokens"] + (i == 2)},
                               with_indices=True)
    prepared = prep_contract.Prepared(prepared.path, prepared.manifest, bad)
    data = TrainBatches(prepared, TrainConfig(weighting="uniform", micro_batch_size=4), 0, 1, None, seed=0)
    with pytest.raises(ContractError, match="prepared sample 2: labels hold"):
        data.micro_batches(0)


# ------------------------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", "gift_varlen"])
def test_packed_micro_batch_gives_the_same_per_token_loss_as_one_by_one(prepared, scored, arch, attn):
    """transformers derives a block-diagonal mask from restarting position ids when attention_mask is None;
    gift_varlen attends within each sample from the batch's cumulative lengths instead (no mask at all)."""
    from transformers import AutoModelForCausalLM

    from gift_dist.tiny_pairs import tiny_config
    from gift_dist.train import attention

    attention.register()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=320), attn_implementation="sdpa")
    model.eval()

    def per_token_ce(mb):
        # Padded batches always run sdpa: the varlen path is for packed rows.
        model.set_attn_implementation(attn if mb.cu_seq_lens is not None or attn != "gift_varlen" else "sdpa")
        out = model.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids,
                          use_cache=False, **(mb.attention_kwargs() if attn == "gift_varlen" else {}))
        return target_token_ce(out.last_hidden_state, model.lm_head, mb.labels, chunk_tokens=7)

    packed_data = batches(prepared, scored, micro_batch_size=4, packing=True)
    packed = packed_data.micro_batches(1)[0]
    padded = batches(prepared, scored, micro_batch_size=4, packing=False).micro_batches(1)[0]
    single = batches(prepared, scored, micro_batch_size=1, packing=False)
    assert packed.input_ids.shape[0] == 1 and packed.attention_mask is None
    assert packed.position_ids[0].tolist() == [p for i in packed.sample_indices
                                               for p in range(prepared.dataset[i]["num_tokens"])]
    torch.testing.assert_close(packed.inst_logprobs, padded.inst_logprobs)
    assert packed.is_eos.tolist() == padded.is_eos.tolist()
    with torch.no_grad():
        one_by_one = torch.cat([per_token_ce(single.build([i])) for i in packed.sample_indices])
        packed_ce = per_token_ce(packed)
        padded_ce = per_token_ce(padded)
    assert packed.sample_indices == padded.sample_indices == packed_data.epoch_order(0)[4:8].tolist()
    torch.testing.assert_close(packed_ce, one_by_one, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(padded_ce, one_by_one, rtol=1e-4, atol=1e-5)
    # Without per-sample positions (or, for varlen, sample boundaries) the samples attend to each other: the
    # comparison above can fail.
    leaky = torch.arange(packed.input_ids.shape[1]).unsqueeze(0)
    boundaries = {}
    if attn == "gift_varlen":
        whole_row = torch.tensor([0, packed.input_ids.shape[1]], dtype=torch.int32)
        boundaries = {"cu_seq_lens_q": whole_row, "cu_seq_lens_k": whole_row,
                      "max_length_q": packed.input_ids.shape[1], "max_length_k": packed.input_ids.shape[1]}
    with torch.no_grad():
        out = model.model(input_ids=packed.input_ids, position_ids=leaky, use_cache=False, **boundaries)
        leaky_ce = target_token_ce(out.last_hidden_state, model.lm_head, packed.labels, chunk_tokens=7)
    assert not torch.allclose(leaky_ce, one_by_one, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("packing", [True, False])
def test_token_budget_fills_each_micro_batch_with_consecutive_samples_up_to_the_budget(prepared, scored, packing):
    """train.micro_batch_tokens: packed rows hold at most the budget in tokens, padded ones samples x longest; each
    micro-batch stops only where the next sample would break the budget; epoch 0 keeps the seeded epoch-0 order."""
    budget = 26
    data = batches(prepared, scored, micro_batch_tokens=budget, packing=packing, epochs=2)
    lengths = prepared.dataset["num_tokens"]

    def cost(indices):
        return sum(lengths[i] for i in indices) if packing else len(indices) * max(lengths[i] for i in indices)

    order = data.epoch_order(0).tolist()
    walked = []
    for step in range(data.steps_per_epoch):
        (mb,) = data.micro_batches(step)
        assert cost(mb.sample_indices) <= budget
        assert mb.input_ids.numel() == cost(mb.sample_indices)  # what the budget bounds, padding included
        position = len(walked) + len(mb.sample_indices)
        assert position == len(order) or cost(mb.sample_indices + [order[position]]) > budget
        walked += mb.sample_indices
    assert walked == order[: len(walked)] and len(walked) > len(lengths) - 4
    sizes = {len(data.micro_batches(step)[0].sample_indices) for step in range(data.total_steps)}
    assert len(sizes) > 1  # the sample count follows the lengths
    assert data.total_steps > data.steps_per_epoch  # epoch 1 (permuted) planned too


def test_token_budget_splits_a_step_the_same_way_for_any_ranks_and_accumulation(prepared, scored):
    one = batches(prepared, scored, 0, 1, micro_batch_tokens=30, gradient_accumulation_steps=2, epochs=2)
    for step in range(one.total_steps):
        alone = [set(mb.sample_indices) for mb in one.micro_batches(step)]
        split = rank_sets(prepared, scored, step, 2, micro_batch_tokens=30, gradient_accumulation_steps=1, epochs=2)
        assert alone == split[0] + split[1]


def test_token_budget_below_the_longest_sample_names_it(prepared, scored):
    longest = max(range(len(prepared)), key=lambda i: prepared.dataset["num_tokens"][i])
    with pytest.raises(ConfigError, match=rf"sample {longest} of .* has 10 tokens, more than "
                                          r"train.micro_batch_tokens=9; raise the budget to at least 10"):
        batches(prepared, scored, micro_batch_tokens=9)


def test_a_checkpoint_from_before_seeded_epoch_zero_orders_is_not_resumed(tmp_path):
    """Resuming is exact only under the same order scheme: a checkpoint whose settings lack (or differ in) the
    data order is refused, naming it."""
    from gift_dist.contracts.checkpoint import CheckpointRecord
    from gift_dist.train.checkpointing import Checkpoints
    from gift_dist.train.data import DATA_ORDER
    from gift_dist.train.recipe import adapter_result_settings

    def record(settings):
        return CheckpointRecord(step=3, world_size=1, global_batch_size=4, model_identity={"hash": "h"},
                                prepared_fingerprint="fp", train_model="base", train_settings=settings)

    now = adapter_result_settings(TrainConfig())
    assert now["data_order"] == DATA_ORDER
    Checkpoints._check(tmp_path, record(now), record(now))
    before = {key: value for key, value in now.items() if key != "data_order"}
    with pytest.raises(ContractError, match=rf"train.data_order: None -> {DATA_ORDER}"):
        Checkpoints._check(tmp_path, record(before), record(now))
