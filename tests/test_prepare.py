import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from transformers import AutoTokenizer

from gift_dist.bundled import write_jsonl
from gift_dist.cli import main
from gift_dist.config import load_config
from gift_dist.contracts import ContractError
from gift_dist.contracts import prepared as contract
from gift_dist.contracts.prepared import IGNORE_INDEX, load_prepared, read_manifest
from gift_dist.models.pair import PairMismatch
from gift_dist.prepare.stage import prepare
from tests.conftest import make_run_config

MULTI_TURN = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4. The answer is 4."},
        {"role": "user", "content": "And 3 * 3?"},
        {"role": "assistant", "content": "3 * 3 = 9."},
    ]
}


def _files_digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _target_segments(tokenizer, row) -> list[str]:
    segments, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            segments.append(tokenizer.decode(current))
            current = []
    if current:
        segments.append(tokenizer.decode(current))
    return segments


# End-to-end: seven prepares of the whole bundled set; the quick loop keeps the held-out split's determinism test.
@pytest.mark.slow
def test_bundled_manifest_and_determinism(tiny_llama, tmp_path):
    cfg = make_run_config(tiny_llama, tmp_path / "a", **{"prepare.max_length": 512, "prepare.samples_per_shard": 500})
    first = prepare(cfg)
    m = first.manifest
    assert m.format == "gift_dist.prepared" and m.version == 3
    assert m.counts["records_read"] == 3000 and m.counts["kept"] == len(first.dataset) == 3000
    assert m.counts["dropped"] == {}
    assert [s.num_samples for s in m.shards] == [500] * 6
    assert m.tokens["total"] == sum(first.dataset["num_tokens"])
    assert m.tokens["target"] == sum(first.dataset["num_target_tokens"]) > 0
    tok = AutoTokenizer.from_pretrained(tiny_llama.instruct)
    assert tok.convert_tokens_to_ids("<|im_end|>") in m.eos_token_ids
    # the epoch-0 order is a seeded shuffle of the records
    assert first.dataset["record_index"][:20] != list(range(20))
    digest = _files_digest(cfg.paths.prepared)

    again = prepare(cfg)
    assert again.manifest.fingerprint == m.fingerprint
    assert _files_digest(cfg.paths.prepared) == digest

    for override in ({"prepare.seed": 7}, {"prepare.max_length": 511}, {"prepare.train_on": "last_assistant"},
                     {"prepare.samples_per_shard": 400}, {"data.system_prompt": "Hi"}):
        other = make_run_config(tiny_llama, tmp_path / "b", **{"prepare.max_length": 512,
                                                               "prepare.samples_per_shard": 500, **override})
        assert prepare(other).manifest.fingerprint != m.fingerprint, override


def test_held_out_split_is_disjoint_deterministic_and_fingerprinted(tiny_llama, tmp_path):
    from gift_dist.bundled import bundled_data_path, read_jsonl
    from gift_dist.contracts.prepared import load_eval_split

    # The whole bundled set once (every record kept, a tenth held out); the rerun and the variants on 600 of its
    # records (the split's maths is the same for any count, at a fifth of the tokenizing).
    settings = {"prepare.max_length": 512, "prepare.samples_per_shard": 500, "prepare.eval_fraction": 0.1}
    whole = make_run_config(tiny_llama, tmp_path / "whole", **settings)
    train_split = prepare(whole)
    held_out = load_eval_split(whole.paths.prepared)
    assert len(held_out) == 300 and len(train_split) == 2700
    assert train_split.manifest.counts["held_out"] == 300 and held_out.manifest.split == "eval"
    assert held_out.manifest.fingerprint == train_split.manifest.fingerprint
    trained_on, held = set(train_split.dataset["record_index"]), set(held_out.dataset["record_index"])
    assert not trained_on & held and len(trained_on | held) == 3000

    part = write_jsonl(read_jsonl(bundled_data_path())[:600], tmp_path / "part.jsonl")
    first = make_run_config(tiny_llama, tmp_path / "a", [part], **settings)
    prepare(first)
    held_out = load_eval_split(first.paths.prepared)
    assert len(held_out) == 60
    again = make_run_config(tiny_llama, tmp_path / "b", [part], **settings)
    prepare(again)
    assert load_eval_split(again.paths.prepared).dataset["record_index"] == held_out.dataset["record_index"]
    capped = make_run_config(tiny_llama, tmp_path / "c", [part], **{**settings, "prepare.eval_max_samples": 25})
    assert len(load_eval_split(prepare(capped).path)) == 25
    none = make_run_config(tiny_llama, tmp_path / "d", [part], **{**settings, "prepare.eval_fraction": 0.0})
    assert prepare(none).manifest.fingerprint != held_out.manifest.fingerprint
    assert load_eval_split(none.paths.prepared) is None


def test_fingerprint_follows_tokenizer(tiny_llama, tmp_path):
    data = write_jsonl([MULTI_TURN] * 4, tmp_path / "d.jsonl")
    base_fp = prepare(make_run_config(tiny_llama, tmp_path / "a", [data])).manifest.fingerprint
    inst = tmp_path / "instruct"
    shutil.copytree(tiny_llama.instruct, inst)
    template = (inst / "chat_template.jinja").read_text()
    (inst / "chat_template.jinja").write_text(template.replace("'\\n' }}{%- endfor", "'\\n\\n' }}{%- endfor"))
    cfg = make_run_config(tiny_llama, tmp_path / "b", [data])
    cfg.instruct_model = str(inst)
    assert prepare(cfg).manifest.fingerprint != base_fp


@pytest.mark.parametrize("train_on, expected", [
    ("all_assistant", ["2 + 2 = 4. The answer is 4.<|im_end|>", "3 * 3 = 9.<|im_end|>"]),
    ("last_assistant", ["3 * 3 = 9.<|im_end|>"]),
])
def test_labels_cover_exactly_assistant_tokens(tiny_llama, tmp_path, train_on, expected):
    data = write_jsonl([MULTI_TURN], tmp_path / "d.jsonl")
    prepared = prepare(make_run_config(tiny_llama, tmp_path / "run", [data], **{"prepare.train_on": train_on}))
    tok = AutoTokenizer.from_pretrained(tiny_llama.instruct)
    row = prepared.dataset[0]
    assert _target_segments(tok, row) == expected
    assert row["num_target_tokens"] == sum(1 for x in row["labels"] if x != IGNORE_INDEX)
    assert tok.decode(row["input_ids"]).startswith("<|im_start|>system\nBe brief.")


def test_other_shapes_and_file_types(tiny_llama, tmp_path):
    (tmp_path / "pr.jsonl").write_text(json.dumps({"prompt": "1 + 1?", "response": "2."}) + "\n")
    pd.DataFrame([{"instruction": "Add", "input": "3 and 4", "output": "7."}]).to_parquet(tmp_path / "al.parquet")
    pd.DataFrame([{"q": "5 - 2?", "a": "3."}]).to_csv(tmp_path / "c.csv", index=False)
    (tmp_path / "m.json").write_text(json.dumps([MULTI_TURN]))
    files = [tmp_path / n for n in ("pr.jsonl", "al.parquet", "m.json")]
    prepared = prepare(make_run_config(tiny_llama, tmp_path / "run", files))
    assert prepared.manifest.counts["kept"] == 3
    tok = AutoTokenizer.from_pretrained(tiny_llama.instruct)
    texts = sorted(tok.decode(r["input_ids"]) for r in prepared.dataset)
    assert any("user\nAdd\n\n3 and 4<|im_end|>" in t for t in texts)
    csv_cfg = make_run_config(tiny_llama, tmp_path / "csv", [tmp_path / "c.csv"],
                              **{"data.prompt_column": "q", "data.response_column": "a"})
    assert prepare(csv_cfg).manifest.counts["kept"] == 1


def test_sharegpt_records_are_read_with_their_role_names_mapped(tiny_llama, tmp_path):
    """The format LLaMA-Factory and axolotl users hold: `conversations` of {from, value} turns."""
    records = [
        {"conversations": [{"from": "human", "value": "2 + 2?"}, {"from": "gpt", "value": "4."}],
         "system": "Be brief."},
        {"conversations": [{"from": "system", "value": "Count."}, {"from": "human", "value": "1, 2, ?"},
                           {"from": "gpt", "value": "3."}, {"from": "human", "value": "and then?"},
                           {"from": "gpt", "value": "4."}]},
        {"conversations": [{"from": "narrator", "value": "?"}, {"from": "gpt", "value": "x"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "hello"}]},
    ]
    path = write_jsonl(records, tmp_path / "sharegpt.jsonl")
    prepared = prepare(make_run_config(tiny_llama, tmp_path / "run", [path]))
    assert prepared.manifest.counts["kept"] == 2 and prepared.manifest.counts["dropped"] == {"unknown_role": 2}
    tok = AutoTokenizer.from_pretrained(tiny_llama.instruct)
    texts = sorted(tok.decode(r["input_ids"]) for r in prepared.dataset)
    assert any(t.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2 + 2?") for t in texts)
    mapped = make_run_config(tiny_llama, tmp_path / "mapped", [path], **{"data.role_map": {"human": "user",
                                                                                           "gpt": "assistant",
                                                                                           "bot": "assistant",
                                                                                           "system": "system"}})
    assert prepare(mapped).manifest.counts["kept"] == 3


def test_bad_records_are_dropped_and_counted(tiny_llama, tmp_path):
    good = {"prompt": "1 + 1?", "response": "2."}
    records = [
        good,
        {"prompt": "no response column"},
        {"prompt": "x", "response": "   "},
        {"prompt": "x", "response": 42},
        {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"prompt": "long " * 200, "response": "ok"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n{not json\n")
    cfg = make_run_config(tiny_llama, tmp_path / "run", [path], **{"prepare.max_length": 64})
    manifest = prepare(cfg).manifest
    assert manifest.counts["records_read"] == 8 and manifest.counts["kept"] == 1
    assert manifest.counts["dropped"] == {
        "missing_column": 1, "empty_response": 1, "non_string_content": 1, "unknown_role": 1,
        "no_assistant_turn": 1, "over_length": 1, "malformed_json": 1,
    }
    cfg.prepare.strict = True
    with pytest.raises(ContractError, match=r"--strict: record 1 of .*d.jsonl is unusable \(missing_column"):
        prepare(cfg)


def test_truncate_policy_keeps_prefix(tiny_llama, tmp_path):
    path = write_jsonl([{"prompt": "q", "response": "long answer " * 50}, {"prompt": "long " * 100, "response": "a"}],
                       tmp_path / "d.jsonl")
    cfg = make_run_config(tiny_llama, tmp_path / "run", [path],
                          **{"prepare.max_length": 32, "prepare.overlength": "truncate"})
    prepared = prepare(cfg)
    assert prepared.manifest.counts["dropped"] == {"no_target_tokens": 1}
    assert prepared.dataset[0]["num_tokens"] == 32 and prepared.dataset[0]["num_target_tokens"] > 0


def test_missing_and_unsupported_files(tiny_llama, tmp_path):
    with pytest.raises(ContractError, match="data file not found: .*missing.jsonl"):
        prepare(make_run_config(tiny_llama, tmp_path / "r", [tmp_path / "missing.jsonl"]))
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(ContractError, match=r"d.txt has unsupported extension '.txt'"):
        prepare(make_run_config(tiny_llama, tmp_path / "r", [tmp_path / "d.txt"]))
    empty = tmp_path / "e.jsonl"
    empty.write_text(json.dumps({"prompt": "x", "response": " "}) + "\n")
    with pytest.raises(ContractError, match="no usable records.*empty_response"):
        prepare(make_run_config(tiny_llama, tmp_path / "r", [empty]))


def test_tokenizer_without_chat_template(tiny_llama, tmp_path):
    inst = tmp_path / "instruct"
    shutil.copytree(tiny_llama.instruct, inst)
    (inst / "chat_template.jinja").unlink()
    cfg = make_run_config(tiny_llama, tmp_path / "run", [write_jsonl([MULTI_TURN], tmp_path / "d.jsonl")])
    cfg.instruct_model = str(inst)
    with pytest.raises(ContractError, match="has no chat template"):
        prepare(cfg)


def test_mismatched_pair_fails_before_compute(tiny_llama, tiny_qwen2, tmp_path):
    cfg = make_run_config(tiny_llama, tmp_path / "run")
    cfg.instruct_model = str(tiny_qwen2.instruct)
    with pytest.raises(PairMismatch, match="architectures differ"):
        prepare(cfg)
    assert not cfg.paths.prepared.exists()


def test_reader_checks_version_and_cli(tiny_llama, tmp_path, capsys):
    data = write_jsonl([MULTI_TURN] * 3, tmp_path / "d.jsonl")
    config = tmp_path / "run.yaml"
    config.write_text(f"base_model: {tiny_llama.base}\ninstruct_model: {tiny_llama.instruct}\n"
                      f"output_dir: {tmp_path / 'run'}\ndata:\n  files: [{data}]\n")
    assert main(["prepare", "--config", str(config), "prepare.samples_per_shard=2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["counts"]["kept"] == 3 and out["shards"] == 2
    manifest_path = tmp_path / "run/prepared/prepared.json"
    data = json.loads(manifest_path.read_text())
    data["version"] = 99
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(ContractError, match="prepared format version 99 is not supported"):
        read_manifest(tmp_path / "run/prepared")
    assert main(["prepare", "--config", str(config), "prepare.bogus=1"]) == 2
    with pytest.raises(ContractError, match="run `gift-dist prepare` first"):
        load_prepared(tmp_path / "nothing")


@pytest.mark.parametrize("content, message", [
    (b"", r"data file .*empty\.jsonl is empty"),
    (b"\n\n  \n", r"data file .*empty\.jsonl holds no records"),
    ('{"prompt": "caf\u00e9?", "response": "ok"}\n'.encode("latin-1"),
     r"empty\.jsonl, line 1: byte 0xe9 at column 16 is not UTF-8; re-encode"),
])
def test_unreadable_data_files_are_named_with_exit_2(tiny_llama, tmp_path, capsys, content, message):
    from gift_dist.cli import main
    from gift_dist.config import dump_config

    data = tmp_path / "empty.jsonl"
    data.write_bytes(content)
    cfg = make_run_config(tiny_llama, tmp_path / "run", [data])
    dump_config(cfg, tmp_path / "run.yaml")
    assert main(["prepare", "--config", str(tmp_path / "run.yaml")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not cfg.paths.prepared.exists()


def test_a_modified_prepared_data_file_is_refused_on_load(tiny_llama, tmp_path):
    """prepared.json records every data/ file's sha256; a flipped byte or a stray file is named when any stage
    opens the dataset."""
    cfg = make_run_config(tiny_llama, tmp_path / "run", **{"prepare.max_length": 256})
    prepared = prepare(cfg)
    data_dir = cfg.paths.prepared / contract.DATA_DIR
    assert set(prepared.manifest.data_sha256) == {p.name for p in data_dir.iterdir()}
    arrow = next(data_dir.glob("*.arrow"))
    raw = bytearray(arrow.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    arrow.write_bytes(bytes(raw))
    with pytest.raises(ContractError, match=rf"{arrow.name} does not match its recorded sha256.*gift-dist prepare"):
        contract.load_prepared(cfg.paths.prepared)
    raw[len(raw) // 2] ^= 0x01
    arrow.write_bytes(bytes(raw))
    (data_dir / "extra.arrow").write_bytes(b"x")
    with pytest.raises(ContractError, match=r"files prepare did not write: \['extra.arrow'\]"):
        contract.load_prepared(cfg.paths.prepared)


# A ChatML template that renders tools the way Qwen2.5's does (schemas in the system turn, calls in <tool_call>,
# results as <tool_response> user turns): the tiny models' own template knows no tools.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n{% endif %}"
    "# Tools\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}<|im_start|>user\n<tool_response>{{ message.content }}</tool_response>"
    "<|im_end|>\n"
    "{%- elif message.role != 'system' %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "{%- for call in message.tool_calls or [] %}<tool_call>{{ call.function | tojson }}</tool_call>{%- endfor %}"
    "<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}


def _labelled_text(tok, rendered):
    return tok.decode([t for t, label in zip(rendered.input_ids, rendered.labels) if label != IGNORE_INDEX])


def test_tool_turns_of_openai_and_sharegpt_records_train_on_the_calls_not_the_results(tiny_llama):
    """OpenAI messages (system, tool_calls, tool results, `tools`) and the same conversation in LLaMA-Factory's
    ShareGPT form (function_call / observation turns, `tools` as a JSON string) render identically; the
    assistant's tool call and final answer are labelled, the tool schemas and the tool's result are not."""
    from gift_dist.config import DataConfig
    from gift_dist.chat import render_conversation
    from gift_dist.prepare.readers import normalize_record

    tok = AutoTokenizer.from_pretrained(tiny_llama.instruct)
    tok.chat_template = TOOL_TEMPLATE
    openai = {"tools": [WEATHER_TOOL], "messages": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "rain, 4 degrees"},
        {"role": "assistant", "content": "Rainy and 4 degrees."}]}
    sharegpt = {"tools": json.dumps([WEATHER_TOOL]), "system": "Use tools.", "conversations": [
        {"from": "human", "value": "Weather in Oslo?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
        {"from": "observation", "value": "rain, 4 degrees"},
        {"from": "gpt", "value": "Rainy and 4 degrees."}]}
    rendered = [render_conversation(tok, c.messages, "all_assistant", c.tools)
                for c in (normalize_record(json.dumps(r), DataConfig()) for r in (openai, sharegpt))]
    assert rendered[0].input_ids == rendered[1].input_ids and rendered[0].labels == rendered[1].labels
    full, labelled = tok.decode(rendered[0].input_ids), _labelled_text(tok, rendered[0])
    assert "# Tools" in full and "get_weather" in full and "rain, 4 degrees" in full
    assert '"name": "get_weather"' in labelled and "Oslo" in labelled and "Rainy and 4 degrees." in labelled
    assert "rain, 4 degrees" not in labelled and "# Tools" not in labelled and "Use tools." not in labelled


def test_tool_use_with_a_template_that_cannot_render_it_is_refused(tiny_llama, tmp_path, capsys):
    """The tiny models' template prints only `content`: a tool call would train on an empty reply, so prepare
    refuses the template (exit 2, naming it) instead of dropping every tool record silently; a malformed call is
    one dropped record."""
    records = [{"messages": [{"role": "user", "content": "Oslo?"},
                             {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather",
                                                                               "arguments": "{\"city\": 1"}}]},
                             {"role": "assistant", "content": "ok"}]},
               {"messages": [{"role": "user", "content": "Oslo?"},
                             {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather",
                                                                               "arguments": {"city": "Oslo"}}}]},
                             {"role": "tool", "content": "rain"}, {"role": "assistant", "content": "Rain."}]}]
    path = write_jsonl(records, tmp_path / "tools.jsonl")
    cfg = make_run_config(tiny_llama, tmp_path / "run", [path])
    from gift_dist.config import dump_config

    dump_config(cfg, tmp_path / "run.yaml")
    assert main(["prepare", "--config", str(tmp_path / "run.yaml")]) == 2
    assert "the chat template drops tool calls (turn 1 calls 'get_weather'" in capsys.readouterr().err
    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl([records[0], plain], tmp_path / "malformed_call.jsonl")
    prepared = prepare(make_run_config(tiny_llama, tmp_path / "run2", [path]))
    assert prepared.manifest.counts["dropped"] == {"malformed_tool_call": 1}


def test_sources_are_mixed_by_weight_and_count_and_reported_one_by_one(tiny_llama, tmp_path):
    """data.sources: a weighted source takes its share of the weighted sources' usable records (up-sampled by
    repeats when above what it has), a counted one exactly its count; prepared.json reports each source's reads,
    drops and share; each source may have its own record shape."""
    def qa(i):
        return {"messages": [{"role": "user", "content": f"{i}+{i}?"}, {"role": "assistant", "content": str(2 * i)}]}

    maths = write_jsonl([qa(i) for i in range(30)], tmp_path / "maths.jsonl")
    chat = write_jsonl([{"prompt": f"say {i}", "response": f"{i}"} for i in range(20)]
                       + [{"prompt": "no reply"}], tmp_path / "chat.jsonl")
    extra = write_jsonl([qa(100 + i) for i in range(10)], tmp_path / "extra.jsonl")
    sources = [{"path": str(maths), "weight": 3.0}, {"path": str(chat), "weight": 1.0, "format": "prompt_response"},
               {"path": str(extra), "samples": 25}]
    prepared = prepare(load_config(None, [f"base_model={tiny_llama.base}", f"instruct_model={tiny_llama.instruct}",
                                          f"output_dir={tmp_path / 'run'}", f"data.sources={json.dumps(sources)}"]))
    report = {Path(s["source"]).name: s for s in prepared.manifest.counts["sources"]}
    # weighted pool: 30 + 20 usable records = 50, shared 3:1 -> 38 maths (8 repeated), 12 chat (down-sampled)
    assert report["maths.jsonl"] == {"source": str(maths), "weight": 3.0, "samples": None, "records_read": 30,
                                     "kept": 30, "dropped": {}, "held_out": 0, "trained": 38}
    assert report["chat.jsonl"]["trained"] == 12 and report["chat.jsonl"]["dropped"] == {"missing_column": 1}
    assert report["extra.jsonl"]["trained"] == 25 and len(prepared) == 38 + 12 + 25
    tok = AutoTokenizer.from_pretrained(tiny_llama.instruct)
    texts = [tok.decode(ids) for ids in prepared.dataset["input_ids"]]
    assert sum("user\nsay " in t for t in texts) == 12  # the prompt_response shape of the chat source was read
    again = prepare(load_config(None, [f"base_model={tiny_llama.base}", f"instruct_model={tiny_llama.instruct}",
                                       f"output_dir={tmp_path / 'again'}", f"data.sources={json.dumps(sources)}"]))
    assert again.dataset["input_ids"] == prepared.dataset["input_ids"]  # seeded: the same mix every time


def test_when_every_record_is_dropped_each_reason_is_counted(tiny_llama, tmp_path):
    """All records unusable: the error counts every drop reason with the setting behind it, for the whole data and
    for a sampled source whose records are all dropped (instead of "no usable record to take 36 from")."""
    long = [{"messages": [{"role": "user", "content": f"tell {i}"},
                          {"role": "assistant", "content": " ".join(["word"] * 80)}]} for i in range(5)]
    path = write_jsonl([*long, {"prompt": "x", "response": " "}], tmp_path / "long.jsonl")
    with pytest.raises(ContractError, match=r"all 6 records dropped: 5 over_length \(max_length=24; raise "
                                            r"prepare\.max_length.*\), 1 empty_response"):
        prepare(make_run_config(tiny_llama, tmp_path / "r", [path], **{"prepare.max_length": 24}))
    short = write_jsonl([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
                         for _ in range(10)], tmp_path / "short.jsonl")
    sources = [{"path": str(short)}, {"path": str(path), "samples": 36}]
    cfg = load_config(None, [f"base_model={tiny_llama.base}", f"instruct_model={tiny_llama.instruct}",
                             f"output_dir={tmp_path / 'mix'}", f"data.sources={json.dumps(sources)}",
                             "prepare.max_length=24"])
    with pytest.raises(ContractError, match=r"data source .*long.jsonl: all 6 records dropped: 5 over_length "
                                            r"\(max_length=24.*\), 1 empty_response; nothing to sample from"):
        prepare(cfg)


@pytest.mark.parametrize("overrides, message", [
    (["data.files=[a.jsonl]", 'data.sources=[{"path": "b.jsonl"}]'], "data.sources replaces data.files"),
    (['data.sources=[{"path": "b.jsonl", "hub_id": "x/y"}]'], "exactly one of path and hub_id"),
    (['data.sources=[{"path": "b.jsonl", "weight": 1, "samples": 3}]'], "give weight or samples, not both"),
    (['data.sources=[{"path": "b.jsonl", "weight": 0}]'], "weight must be a finite number > 0"),
])
def test_contradictory_sources_are_refused_when_the_config_loads(overrides, message):
    from gift_dist.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


# ------------------------------------------------------------------------------------ held-out split by prompt

def _chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _planted_records() -> tuple[list[dict], dict[int, int]]:
    """30 unique questions and 10 planted ones asked three times each (differing in case and whitespace, with
    other replies); returns the records and, for each planted record's row, its question number."""
    records, planted = [], {}
    for i in range(30):
        records.append(_chat(f"What is {i} plus {i + 1}?", f"{2 * i + 1}."))
    for j in range(10):
        for variant in (f"How many legs do {j + 2} spiders have?", f"how many legs do {j + 2}  spiders HAVE?",
                        f"  How many legs\ndo {j + 2} spiders have? "):
            planted[len(records)] = j
            records.append(_chat(variant, f"{8 * (j + 2)} legs, reply {len(records)}."))
    return records, planted


def _sides(prepared_dir: Path) -> tuple[set[int], set[int]]:
    held_out = contract.load_eval_split(prepared_dir)
    return set(load_prepared(prepared_dir).dataset["record_index"]), set(held_out.dataset["record_index"])


def test_planted_duplicate_prompts_end_up_on_one_side_only(tiny_llama, tmp_path, caplog):
    """prepare.split_key any_user_turn (default): each planted question's three records (same words, other case and
    spacing) are all trained on or all held out, on every run; prepared.json reports no held-out prompt in
    training. Split record by record (split_key none) the same data has held-out prompts that are trained on:
    counted and warned about."""
    records, planted = _planted_records()
    data = write_jsonl(records, tmp_path / "d.jsonl")
    settings = {"prepare.eval_fraction": 0.25, "prepare.max_length": 128}
    prepared = prepare(make_run_config(tiny_llama, tmp_path / "a", [data], **settings))
    trained, held = _sides(prepared.path)
    assert not trained & held and len(trained | held) == 60 and len(held) == 15
    planted_held = {q for row, q in planted.items() if row in held}
    planted_trained = {q for row, q in planted.items() if row in trained}
    assert planted_held and not planted_held & planted_trained  # some question held out, each on one side only
    overlap = prepared.manifest.prompt_overlap
    assert overlap["key"] == "any_user_turn" and overlap["split_key"] == "any_user_turn"
    assert overlap["held_out"] == 15 and overlap["held_out_prompts_in_training"] == 0
    again = prepare(make_run_config(tiny_llama, tmp_path / "b", [data], **settings))
    assert _sides(again.path) == (trained, held)

    with caplog.at_level("WARNING", logger="gift_dist.prepare.stage"):
        by_record = prepare(make_run_config(tiny_llama, tmp_path / "c", [data],
                                            **{**settings, "prepare.split_key": "none"}))
    trained, held = _sides(by_record.path)
    shared = [row for row in held if row in planted and any(
        other in trained for other, q in planted.items() if q == planted[row])]
    assert shared  # this data split record by record puts a planted question on both sides
    assert by_record.manifest.prompt_overlap["held_out_prompts_in_training"] == len(shared)
    assert f"{len(shared)} of 15 held-out samples have a user turn that is also trained on" in caplog.text
    assert by_record.manifest.fingerprint != prepared.manifest.fingerprint


def _conversation(*questions: str) -> dict:
    messages = []
    for n, question in enumerate(questions):
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": f"Reply {n}."}]
    return {"messages": messages}


def test_a_question_asked_alone_and_as_a_follow_up_is_held_out_on_one_side(tiny_llama, tmp_path, caplog):
    """prepare.split_key any_user_turn (default) links records that share any user turn, transitively: a chain
    q0 -> (q0, q1) -> (q1, q2) -> ... is one group, so no held-out user turn is asked in training, whichever turn it
    is. split_key user_turns (whole conversations) splits the chain and prepared.json counts the held-out records
    whose turn training asks."""
    chain = [_conversation("Tell me about q0.")] + [
        _conversation(f"Tell me about q{i}.", f"Tell me about q{i + 1}.") for i in range(5)]  # 6 records, 1 group
    alone = [_conversation(f"Tell me about r{i}.") for i in range(6)] + [
        _conversation(f"Say {i}.", f"Tell me about r{i}.") for i in range(6)]  # 6 groups of 2: alone and after
    data = write_jsonl(chain + alone + [_chat(f"Count to {i}.", f"{i}.") for i in range(18)], tmp_path / "d.jsonl")
    settings = {"prepare.eval_fraction": 0.25, "prepare.max_length": 128}  # 9 of 36 records
    linked = prepare(make_run_config(tiny_llama, tmp_path / "a", [data], **settings))
    trained, held = _sides(linked.path)
    assert len(held) == 9 and not trained & held
    assert set(range(6)) <= trained or set(range(6)) <= held
    for i in range(6):
        assert {6 + i, 12 + i} <= trained or {6 + i, 12 + i} <= held
    assert linked.manifest.prompt_overlap["held_out_prompts_in_training"] == 0

    with caplog.at_level("WARNING", logger="gift_dist.prepare.stage"):
        whole = prepare(make_run_config(tiny_llama, tmp_path / "b", [data],
                                        **{**settings, "prepare.split_key": "user_turns"}))
    trained, held = _sides(whole.path)
    split_pairs = sum(1 for i in range(6) if len({6 + i, 12 + i} & held) == 1)
    split_chain = sum(1 for row in held if row < 6 and ({row - 1, row + 1} & trained) - {-1, 6})
    leaked = whole.manifest.prompt_overlap["held_out_prompts_in_training"]
    assert leaked == split_pairs + split_chain and leaked > 0  # this split asks some held-out turn in training
    assert "held-out samples have a user turn that is also trained on (prepare.split_key=user_turns" in caplog.text


def test_linked_groups_join_records_through_any_shared_turn():
    from gift_dist.prepare.stage import linked_groups

    groups = linked_groups([["b", "c"], ["a"], ["c", "d"], [], ["d"], ["e", "a"], ["f"]])
    assert groups[0] == groups[2] == groups[4] and groups[1] == groups[5]
    assert len({groups[0], groups[1], groups[6]}) == 3 and groups[3] == ""


def test_split_key_first_user_turn_groups_conversations_that_open_alike(tiny_llama, tmp_path):
    def two_turns(i: int, follow_up: str) -> dict:
        return {"messages": [{"role": "user", "content": "Count with me."}, {"role": "assistant", "content": "1."},
                             {"role": "user", "content": follow_up}, {"role": "assistant", "content": f"{i}."}]}

    records = [two_turns(i, f"And {i}?") for i in range(6)] + [_chat(f"Say {i}.", f"{i}.") for i in range(14)]
    data = write_jsonl(records, tmp_path / "d.jsonl")
    settings = {"prepare.eval_fraction": 0.3, "prepare.max_length": 128}
    opening = prepare(make_run_config(tiny_llama, tmp_path / "a", [data],
                                      **{**settings, "prepare.split_key": "first_user_turn"}))
    trained, held = _sides(opening.path)
    assert set(range(6)) <= trained or set(range(6)) <= held
    assert len(held) == 6 and opening.manifest.prompt_overlap["held_out_prompts_in_training"] == 0


def test_a_prompt_group_larger_than_the_held_out_split_is_never_split():
    from gift_dist.config import PrepareConfig
    from gift_dist.prepare.stage import split_held_out

    order = np.array([3, 0, 4, 1, 2, 5])
    groups = ["a", "b", "a", "", "", "a"]  # rows 0, 2, 5 share a prompt; rows 3 and 4 have no user text
    train, held = split_held_out(order, groups, 2, PrepareConfig(eval_fraction=0.3))
    # from the end of the order: row 5's group (3 rows) does not fit, row 2 is in it, row 1 ("b") and row 4 fit
    assert held.tolist() == [4, 1] and train.tolist() == [3, 0, 2, 5]
    assert split_held_out(order, None, 2, PrepareConfig())[1].tolist() == [2, 5]  # record by record: the tail
    with pytest.raises(ContractError, match="every prompt group .* is larger"):
        split_held_out(np.array([0, 1, 2]), ["a", "a", "a"], 1, PrepareConfig(eval_fraction=0.3))


def test_prompt_keys_collapse_whitespace_and_case_and_ignore_replies():
    from gift_dist.prepare.readers import prompt_keys

    one = prompt_keys(_chat("What  is\n2+2?", "4")["messages"])
    assert one == prompt_keys(_chat("what is 2+2? ", "four")["messages"])
    assert one != prompt_keys(_chat("what is 2+3?", "5")["messages"])
    assert prompt_keys([{"role": "assistant", "content": "hi"}]) == {"turns": [], "user_turns": "",
                                                                     "first_user_turn": ""}


def test_an_eval_file_overlapping_training_is_counted_and_warned_about(tiny_llama, tmp_path, caplog):
    records = [_chat(f"What is {i} times 3?", f"{3 * i}.") for i in range(20)]
    data = write_jsonl(records, tmp_path / "d.jsonl")
    general = write_jsonl([_chat("WHAT is 4 times  3?", "12"), _chat("What is 7 times 3?", "21"),
                           _chat("Spell 'cat'.", "c-a-t"), {"messages": [{"role": "user", "content": "no reply"}]}],
                          tmp_path / "general.jsonl")
    cfg = make_run_config(tiny_llama, tmp_path / "run", [data], **{"prepare.max_length": 128})
    cfg.eval.general_files = [str(general)]
    with caplog.at_level("WARNING", logger="gift_dist.prepare.stage"):
        prepared = prepare(cfg)
    (counted,) = prepared.manifest.prompt_overlap["eval_files"]
    assert counted["file"] == "general.jsonl" and counted["sha256"] == hashlib.sha256(general.read_bytes()).hexdigest()
    assert (counted["records"], counted["prompts"], counted["prompts_in_training"]) == (4, 3, 2)
    assert "2 of 4 records of eval file" in caplog.text and "also in the training data" in caplog.text
    manifest = json.loads((prepared.path / "prepared.json").read_text())
    assert manifest["prompt_overlap"]["eval_files"][0]["prompts_in_training"] == 2


def test_a_manifest_with_an_inconsistent_overlap_report_is_refused(tiny_llama, tmp_path):
    data = write_jsonl([_chat(f"Say {i}.", f"{i}.") for i in range(10)], tmp_path / "d.jsonl")
    prepared = prepare(make_run_config(tiny_llama, tmp_path / "run", [data],
                                       **{"prepare.eval_fraction": 0.2, "prepare.max_length": 128}))
    path = prepared.path / "prepared.json"
    manifest = json.loads(path.read_text())
    manifest["prompt_overlap"]["held_out_prompts_in_training"] = 3
    path.write_text(json.dumps(manifest))
    with pytest.raises(ContractError, match="prompt_overlap is inconsistent"):
        read_manifest(prepared.path)
