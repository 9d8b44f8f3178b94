"""The bundled data: the demo's general set (the preservation set) is held out by content from the word tasks
the demo's instruct model is tuned on, and varied enough to measure a skill."""

from __future__ import annotations

from collections import Counter

import pytest

from gift_dist import bundled
from gift_dist import tiny_pairs


def _prompts(records: list[dict]) -> set[str]:
    return {" ".join(m["content"].lower().split()) for r in records for m in r["messages"] if m["role"] == "user"}


def test_word_task_sides_are_disjoint_by_content_and_cover_every_task():
    tuning, held_out = bundled.word_tasks("tuning"), bundled.word_tasks("held_out")
    assert len(tuning) + len(held_out) == len(bundled.word_tasks("all")) == \
        len(bundled.GENERAL_WORDS) * len(bundled.WORD_TASK_KINDS)
    assert not {q for q, _ in tuning} & {q for q, _ in held_out}
    for side in (tuning, held_out):  # every kind of task, many words, on both sides
        kinds = Counter(q.split("'")[0] + q.split("'")[-1] for q, _ in side)
        assert len(kinds) == len(bundled.WORD_TASK_KINDS)
        assert len({q.split("'")[1] for q, _ in side}) >= 40


def test_the_shipped_general_set_is_the_held_out_side_with_unique_prompts():
    shipped = bundled.read_jsonl(bundled.bundled_general_path())
    assert shipped == bundled.generate_general_chat()  # `python -m gift_dist.bundled` wrote it
    assert len(shipped) == len(_prompts(shipped)) == len(bundled.word_tasks("held_out")) >= 60
    for seed in range(5):  # no seed of the tuning side reaches a held-out prompt
        assert not _prompts(shipped) & _prompts(bundled.generate_general_chat(2000, seed=seed, split="tuning"))


def test_the_demo_instruct_model_is_never_tuned_on_the_demo_general_set(tmp_path, monkeypatch):
    """build_demo_pair with its training stubbed: the chat records the instruct model is tuned on share no prompt
    with the general set the demo evaluates (eval.general_files of demo_config)."""
    from gift_dist.pipeline.demo import demo_config, demo_data

    tuned: list[dict] = []
    trained: list[list[list[int]]] = []

    def capture(tokenizer, records):
        tuned.extend(records)
        return [[1, 2]], [[1, 2]]

    def train(model, token_lists, *args, **kwargs):
        trained.append(token_lists)
        return 0.0

    monkeypatch.setattr(tiny_pairs, "_chat_examples", capture)
    monkeypatch.setattr(tiny_pairs, "_train", train)
    tiny_pairs.build_demo_pair(tmp_path / "models")
    assert len(tuned) == tiny_pairs.DEMO_INSTRUCT_RECORDS + tiny_pairs.DEMO_INSTRUCT_MATHS
    maths = [r for r in tuned if "The answer is" in r["messages"][-1]["content"]]
    assert len(maths) == tiny_pairs.DEMO_INSTRUCT_MATHS  # a real instruct model is tuned on some maths
    cfg = demo_config(tmp_path, [])
    assert cfg.eval.general_files == [str(bundled.bundled_general_path())]
    general = _prompts(bundled.read_jsonl(cfg.eval.general_files[0]))
    assert len(_prompts(tuned)) >= 100 and not _prompts(tuned) & general
    # nor on any prompt of the demo's task data
    task = _prompts(bundled.read_jsonl(demo_data(tmp_path)))
    assert len(task) > 200 and not _prompts(tuned) & task
    # The base's pre-training: a share of its documents as one chat user turn (the template's tokens are not new
    # to it), never a reply in an assistant turn (answering in chat form stays the instruct model's skill).
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "models" / "base"))
    texts = [tokenizer.decode(ids) for ids in trained[0]]
    chat = [t for t in texts if t.startswith("<|im_start|>")]
    assert abs(len(chat) / len(texts) - tiny_pairs.DEMO_BASE_CHAT_SHARE) < 0.05
    assert all(t.startswith("<|im_start|>user\n") and t.count("<|im_start|>") == 1 for t in chat)
    assert not any("<|im_start|>assistant" in t for t in texts)


def test_the_chat_maths_is_right_and_never_a_prompt_of_the_task():
    import re

    maths = bundled.generate_chat_maths(500, seed=3, max_operand=9)
    for record in maths:
        a, op, b, value = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (\d+)\. The answer is \4\.",
                                       record["messages"][-1]["content"]).groups()
        assert int(value) == eval(f"{a} {op} {b}") >= 0
    assert len({r["messages"][1]["content"].split(" = ")[0] for r in maths}) > 100
    task = _prompts(bundled.generate_arithmetic(3000, seed=0, max_operand=9) + bundled.read_jsonl(
        bundled.bundled_data_path()))
    assert not _prompts(maths) & task


def test_unknown_split_is_refused():
    with pytest.raises(ValueError):
        bundled.word_tasks("train")


def test_a_pair_build_logs_progress_on_one_thread_and_restores_the_count(tmp_path, monkeypatch, caplog):
    """Several builds on a shared machine each spinning a thread per core ran 15-30x slower: a build runs on one
    intra-op thread unless OMP_NUM_THREADS says otherwise, and says how far it is."""
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads_seen = []
    train = tiny_pairs._train
    monkeypatch.setattr(tiny_pairs, "_train", lambda *a, **k: threads_seen.append(torch.get_num_threads())
                        or train(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with caplog.at_level("INFO", logger="gift_dist.tiny_pairs"):
            tiny_pairs.build_tiny_pair(tmp_path, base_steps=5, instruct_steps=5, num_records=40)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert threads_seen == [1, 1]
    progress = [r.getMessage() for r in caplog.records if "step" in r.getMessage()]
    assert any("base pre-training: step 5/5" in line for line in progress), progress
    assert any("instruct chat-tuning: step 5/5" in line for line in progress), progress
