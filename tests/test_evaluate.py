"""`gift-dist eval` against independent computations: CE by a full log-softmax, generations one by one with
`model.generate`, KL from the two models' own distributions."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from gift_dist.bundled import bundled_data_path, bundled_general_path, read_jsonl, write_jsonl
from gift_dist.config import ConfigError
from gift_dist.evaluate import stage
from tests.conftest import make_run_config


@pytest.fixture(scope="module")
def held_out_run(tiny_llama, tmp_path_factory):
    from gift_dist.prepare.stage import prepare

    root = tmp_path_factory.mktemp("eval")
    data = write_jsonl(read_jsonl(bundled_data_path())[:120], root / "data.jsonl")
    cfg = make_run_config(tiny_llama, root / "run", [data], **{"prepare.max_length": 256,
                                                               "prepare.eval_fraction": 0.2,
                                                               "eval.batch_size": 5})
    cfg.eval.general_files = [str(bundled_general_path())]
    prepare(cfg)
    return cfg


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_task_ce_equals_a_full_log_softmax_sample_by_sample(held_out_run):
    samples = stage.task_samples(held_out_run)
    assert len(samples) == 24
    model = _model(held_out_run.instruct_model)
    batched, count = stage.teacher_forced_ce(model, samples, batch_size=5, pad=0)
    total, expected_count = 0.0, 0
    with torch.no_grad():
        for sample in samples:
            logits = model(input_ids=torch.tensor([sample.input_ids])).logits[0, :-1].float()
            labels = torch.tensor(sample.labels[1:])
            total += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            expected_count += int((labels != -100).sum())
    assert count == expected_count
    assert batched == pytest.approx(total / expected_count, rel=1e-5)


def test_batched_greedy_replies_equal_generate_one_by_one(held_out_run):
    tokenizer = AutoTokenizer.from_pretrained(held_out_run.instruct_model)
    model = _model(held_out_run.instruct_model)
    prompts = [stage.first_reply(s)[0] for s in stage.task_samples(held_out_run)[:7]]
    stop = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    batched = stage.greedy_replies(model, tokenizer, prompts, batch_size=4, max_new_tokens=12, stop_ids=stop)
    for prompt, reply in zip(prompts, batched):
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                             eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        cut = next((i for i, t in enumerate(out) if t in stop), len(out))
        assert reply == tokenizer.decode(out[:cut], skip_special_tokens=True)


def test_kl_to_itself_is_zero_and_to_another_model_is_its_definition(held_out_run, tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(held_out_run.instruct_model)
    general = stage.general_samples([str(bundled_general_path())], tokenizer, limit=6)
    instruct, base = _model(tiny_llama.instruct), _model(tiny_llama.base)
    _, self_kl, _ = stage.ce_and_kl(instruct, instruct, general, batch_size=4, pad=0)
    assert self_kl == pytest.approx(0.0, abs=1e-6)
    ce, kl, count = stage.ce_and_kl(base, instruct, general, batch_size=4, pad=0)
    total_kl = 0.0
    with torch.no_grad():
        for sample in general:
            ids = torch.tensor([sample.input_ids])
            keep = torch.tensor(sample.labels[1:]) != -100
            p = F.log_softmax(instruct(input_ids=ids).logits[0, :-1][keep].float(), -1)
            q = F.log_softmax(base(input_ids=ids).logits[0, :-1][keep].float(), -1)
            total_kl += float((p.exp() * (p - q)).sum())
    assert kl == pytest.approx(total_kl / count, rel=1e-4) and kl > 0 and ce > 0


def test_answer_patterns():
    assert stage.extract_answer(stage.answer_regex("answer_is"), "so 3 + 4 = 7. The answer is 1,234.") == "1234"
    assert stage.extract_answer(stage.answer_regex("gsm8k"), "work\n#### -12") == "-12"
    assert stage.extract_answer(stage.answer_regex("boxed"), r"so \boxed{x+1} done") == "x+1"
    assert stage.extract_answer(stage.answer_regex("last_number"), "3 then 5 then 8 apples") == "8"
    assert stage.extract_answer(stage.answer_regex(r"ANSWER: (\w+)"), "ANSWER: yes") == "yes"
    assert stage.extract_answer(stage.answer_regex("answer_is"), "no idea") is None
    with pytest.raises(ConfigError, match="needs a group"):
        stage.answer_regex(r"\d+")
    with pytest.raises(ConfigError, match="not a preset"):
        stage.answer_regex("(unclosed")


def test_eval_writes_results_for_every_model(held_out_run, tiny_llama, tmp_path, capsys):
    from gift_dist.cli import main
    from gift_dist.config import dump_config

    config_file = tmp_path / "run.yaml"
    dump_config(held_out_run, config_file)
    out = tmp_path / "eval"
    assert main(["eval", "--config", str(config_file), "--model", f"base={tiny_llama.base}", "--output", str(out),
                 "eval.max_generate_samples=3", "eval.max_new_tokens=16", "eval.max_general_samples=8"]) == 0
    results = {r["name"]: r for r in json.loads((out / "results.json").read_text())}
    assert list(results) == ["instruct", "base"]
    assert results["instruct"]["kl_to_instruct"] == pytest.approx(0.0, abs=1e-6)
    assert results["base"]["kl_to_instruct"] > 0 and 0.0 <= results["base"]["task_accuracy"] <= 1.0
    assert (out / "results.md").read_text().startswith("| model |") and (out / "tradeoff.png").is_file()
    assert "| base |" in capsys.readouterr().out


def test_eval_without_a_held_out_split_says_how_to_make_one(tiny_llama, tmp_path, capsys):
    from gift_dist.cli import main
    from gift_dist.config import dump_config
    from gift_dist.prepare.stage import prepare

    data = write_jsonl(read_jsonl(bundled_data_path())[:20], tmp_path / "data.jsonl")
    cfg = make_run_config(tiny_llama, tmp_path / "run", [data], **{"prepare.max_length": 256})
    prepare(cfg)
    dump_config(cfg, tmp_path / "run.yaml")
    assert main(["eval", "--config", str(tmp_path / "run.yaml")]) == 2
    assert "prepare.eval_fraction > 0" in capsys.readouterr().err


def write_local_lm_eval_task(folder):
    """An lm-evaluation-harness task YAML ``gift_arith_local`` over 12 bundled arithmetic records in ``folder``
    (a local dataset: no hub), its test split also its few-shot split."""
    records = [{"question": r["messages"][-2]["content"], "answer": r["messages"][-1]["content"]}
               for r in read_jsonl(bundled_data_path())[:12]]
    data = write_jsonl(records, folder / "arith.jsonl")
    (folder / "gift_arith.yaml").write_text(
        "task: gift_arith_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\nfewshot_split: test\noutput_type: loglikelihood\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: " {{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )


@pytest.mark.slow  # lm-evaluation-harness end to end
def test_lm_eval_runs_a_local_task_on_every_model(held_out_run, tiny_llama, tmp_path):
    """lm-evaluation-harness through its Python API, on a task YAML with a local dataset (no hub)."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the test extra; install gift-dist[test]")
    from gift_dist.evaluate.stage import evaluate_models

    write_local_lm_eval_task(tmp_path / "tasks")
    held_out_run.eval.lm_eval_tasks = ["gift_arith_local"]
    held_out_run.eval.lm_eval_include = str(tmp_path / "tasks")
    held_out_run.eval.max_generate_samples = 0
    try:
        results = evaluate_models(held_out_run, {"instruct": str(tiny_llama.instruct), "base": str(tiny_llama.base)})
    finally:
        held_out_run.eval.lm_eval_tasks, held_out_run.eval.lm_eval_include = [], None
        held_out_run.eval.max_generate_samples = 500
    assert [scores.name for scores in results] == ["instruct", "base"]
    for scores in results:
        assert 0.0 <= scores.lm_eval["gift_arith_local"]["acc,none"] <= 1.0
    table = stage.markdown_table(results)
    assert "lm-evaluation-harness:" in table
    # The harness's non-metric numbers and its stderr keys are no columns (the stderr shows as ± in a cell).
    harness_header = table.split("lm-evaluation-harness:")[1].strip().splitlines()[0]
    assert "gift_arith_local acc" in harness_header
    assert not any(word in table for word in ("sample_len", "alias", "_stderr")), table


@pytest.mark.slow  # lm-evaluation-harness end to end
def test_lm_eval_takes_the_chat_template_the_fewshot_count_and_the_limit(held_out_run, tiny_llama, tmp_path,
                                                                          monkeypatch):
    """--lm-eval-chat-template / --lm-eval-fewshot / --lm-eval-limit reach the harness: on the local task, 2
    documents scored with 1 few-shot example each, rendered through the instruct model's chat template."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the test extra")
    from gift_dist.cli import build_parser, parse_command_line

    write_local_lm_eval_task(tmp_path / "tasks")
    argv = ["eval", "--lm-eval", "gift_arith_local", "--lm-eval-include", str(tmp_path / "tasks"),
            "--lm-eval-chat-template", "--lm-eval-fewshot", "1", "--lm-eval-limit", "2",
            f"output_dir={held_out_run.paths.root}", f"base_model={tiny_llama.base}",
            f"instruct_model={tiny_llama.instruct}"]
    settings = stage.config_with_arguments(parse_command_line(build_parser("eval"), argv)).eval
    seen = {}
    real = lm_eval.simple_evaluate

    def spy(**kwargs):
        seen["out"] = real(**kwargs)
        return seen["out"]

    monkeypatch.setattr(lm_eval, "simple_evaluate", spy)
    harness = stage.run_lm_eval(str(tiny_llama.instruct), settings)
    out = seen["out"]
    assert out["n-samples"]["gift_arith_local"]["effective"] == 2
    assert out["configs"]["gift_arith_local"]["num_fewshot"] == 1
    prompts = [json.dumps(sample["arguments"], default=str) for sample in out["samples"]["gift_arith_local"]]
    assert len(prompts) == 2
    for prompt in prompts:  # through the chat template, the one example as a turn before the question
        assert "<|im_start|>" in prompt and prompt.count("Question:") == 2, prompt
    assert 0.0 <= harness["gift_arith_local"]["acc,none"] <= 1.0


# ------------------------------------------------------------------------ the general set's greedy exact match


def test_exact_match_rate_hand_counted():
    replies = ["The plural of 'comet' is 'comets'.", "  'river' has 5 letters.\n", "In capital letters: LEMON",
               "Backwards, 'timber' is 'rebmit'.", ""]
    references = ["The plural of 'comet' is 'comets'.", "'river' has 5 letters.", "In capital letters: LEMON.",
                  "Backwards, 'timber' is 'rebmit'.", "The first letter of 'anchor' is 'a'."]
    # equal, equal up to surrounding whitespace, a missing full stop, equal, empty: 3 of 5
    assert stage.exact_match_rate(replies, references) == pytest.approx(3 / 5)
    with pytest.raises(ValueError):
        stage.exact_match_rate(["a"], ["a", "b"])


def test_general_references_are_the_records_replies(held_out_run):
    tokenizer = AutoTokenizer.from_pretrained(held_out_run.instruct_model)
    records = read_jsonl(bundled_general_path())[:6]
    samples = stage.general_samples([str(bundled_general_path())], tokenizer, limit=6)
    for record, sample in zip(records, samples):
        prompt, reply = stage.first_reply(sample)
        assert tokenizer.decode(reply, skip_special_tokens=True) == record["messages"][-1]["content"]
        assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
        assert record["messages"][0]["content"] in tokenizer.decode(prompt)


def test_general_exact_match_counts_generations_equal_to_the_reply(held_out_run, monkeypatch):
    """Generations stubbed by prompt: 3 of the 8 general prompts get their reference reply (one padded with
    whitespace), the others a wrong one; the task's prompts get nothing. Hand count: 3 / 8."""
    tokenizer = AutoTokenizer.from_pretrained(held_out_run.instruct_model)
    records = read_jsonl(bundled_general_path())[:8]
    general = stage.general_samples([str(bundled_general_path())], tokenizer, limit=8)
    answers = {}
    for index, (record, sample) in enumerate(zip(records, general)):
        reply = record["messages"][-1]["content"]
        answers[tuple(stage.first_reply(sample)[0])] = {0: reply, 3: f" {reply}\n", 5: reply}.get(index, reply[:-1])
    seen = []

    def fake_replies(model, tok, prompts, batch_size, max_new_tokens, stop_ids):
        seen.append(len(prompts))
        return [answers.get(tuple(p), "") for p in prompts]

    monkeypatch.setattr(stage, "greedy_replies", fake_replies)
    monkeypatch.setattr(held_out_run.eval, "max_general_samples", 8)
    monkeypatch.setattr(held_out_run.eval, "max_generate_samples", 8)
    results = stage.evaluate_models(held_out_run, {"instruct": held_out_run.instruct_model})
    (instruct,) = results
    assert instruct.general_exact_match == pytest.approx(3 / 8) and instruct.general_generated == 8
    assert instruct.task_accuracy == 0.0 and seen[1] == 8
    assert "| instruct | 0.000 |" in stage.markdown_table(results) and "| 0.375 (SE 0.171, n=8) |" in stage.markdown_table(results)


def test_task_accuracy_counts_the_generations_with_the_reference_answer(held_out_run, monkeypatch):
    """Generations stubbed by prompt for the first 6 held-out samples: 3 say "The answer is N" with the reference
    reply's N, 1 says it as "$N", 1 gives another number, 1 no answer. Hand count: 4 / 6."""
    tokenizer = AutoTokenizer.from_pretrained(held_out_run.instruct_model)
    regex = stage.answer_regex(held_out_run.eval.answer_pattern)
    replies = {}
    for index, sample in enumerate(stage.task_samples(held_out_run)[:6]):
        prompt, reference = stage.first_reply(sample)
        answer = stage.extract_answer(regex, tokenizer.decode(reference, skip_special_tokens=True))
        assert answer is not None and answer != "-7"
        replies[tuple(prompt)] = [f"The answer is {answer}.", f"So: {answer}. The answer is {answer}",
                                  f"The answer is {answer}", f"The answer is ${answer}.", "The answer is -7.",
                                  "I cannot tell."][index]
    assert len(replies) == 6  # six different prompts

    def fake_replies(model, tok, prompts, batch_size, max_new_tokens, stop_ids):
        return [replies[tuple(p)] for p in prompts]

    monkeypatch.setattr(stage, "greedy_replies", fake_replies)
    monkeypatch.setattr(held_out_run.eval, "max_generate_samples", 6)
    monkeypatch.setattr(held_out_run.eval, "general_files", [])
    results = stage.evaluate_models(held_out_run, {"instruct": held_out_run.instruct_model})
    assert results[0].task_accuracy == pytest.approx(4 / 6)
    assert "| instruct | 0.667 |" in stage.markdown_table(results)


def test_general_exact_match_is_off_with_max_generate_samples_zero(held_out_run, monkeypatch):
    monkeypatch.setattr(held_out_run.eval, "max_generate_samples", 0)
    monkeypatch.setattr(held_out_run.eval, "max_general_samples", 4)
    (instruct,) = stage.evaluate_models(held_out_run, {"instruct": held_out_run.instruct_model})
    assert instruct.general_exact_match is None and instruct.general_generated == 0
    assert instruct.general_ce is not None


def test_a_general_file_prepare_did_not_measure_is_named_in_a_warning(held_out_run, tmp_path, monkeypatch, caplog):
    """prepare measured the bundled general set's overlap with training (prepared.json, by sha256): the same bytes
    under another name are measured; an edited copy is not, and eval says so before it loads any model."""
    measured = str(bundled_general_path())
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_bytes(bundled_general_path().read_bytes())
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(bundled_general_path().read_text(encoding="utf-8").splitlines(True)[1:]),
                      encoding="utf-8")

    monkeypatch.setattr(held_out_run.eval, "general_files", [measured, str(renamed)])
    with caplog.at_level("WARNING", logger=stage.log.name):
        stage.warn_unmeasured_general_files(held_out_run)
    assert "not measured" not in caplog.text

    class NoModelLoaded(Exception):
        pass

    def no_model(path, trust_remote_code):
        raise NoModelLoaded

    monkeypatch.setattr(stage, "_load", no_model)
    monkeypatch.setattr(held_out_run.eval, "general_files", [measured, str(edited)])
    with caplog.at_level("WARNING", logger=stage.log.name), pytest.raises(NoModelLoaded):
        stage.evaluate_models(held_out_run, {"instruct": held_out_run.instruct_model})
    warnings = [r.getMessage() for r in caplog.records if "not measured" in r.getMessage()]
    assert len(warnings) == 1 and str(edited) in warnings[0] and "rerun `gift-dist prepare`" in warnings[0]


# ------------------------------------------------------------------------ the lm-evaluation-harness bridge, quick


def _eval_args(*flags: str):
    from gift_dist.cli import build_parser, parse_command_line

    return parse_command_line(build_parser("eval"), ["eval", "--lm-eval", "gsm8k,ifeval", *flags,
                                                     "output_dir=/tmp/nowhere", "base_model=b", "instruct_model=i"])


def test_the_lm_eval_flags_reach_simple_evaluate(monkeypatch):
    """The three flags land in eval.lm_eval_* and from there in the harness's apply_chat_template, num_fewshot
    and limit (a stand-in harness records the call)."""
    import sys
    import types

    cfg = stage.config_with_arguments(_eval_args("--lm-eval-chat-template", "--lm-eval-fewshot", "5",
                                                 "--lm-eval-limit", "50"))
    assert cfg.eval.lm_eval_tasks == ["gsm8k", "ifeval"]
    assert (cfg.eval.lm_eval_chat_template, cfg.eval.lm_eval_fewshot, cfg.eval.lm_eval_limit) == (True, 5, 50)
    calls = []
    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = lambda **kwargs: calls.append(kwargs) or {"results": {"gsm8k": {
        "alias": "gsm8k", "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.1,
        "sample_len": 50}}}
    fake_tasks = types.ModuleType("lm_eval.tasks")
    fake_tasks.TaskManager = lambda **kwargs: "manager"
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", fake_tasks)
    harness = stage.run_lm_eval("/models/merged", cfg.eval)
    assert len(calls) == 1
    assert {key: calls[0][key] for key in ("apply_chat_template", "num_fewshot", "limit", "tasks")} == {
        "apply_chat_template": True, "num_fewshot": 5, "limit": 50, "tasks": ["gsm8k", "ifeval"]}
    assert harness["gsm8k"]["exact_match,strict-match"] == 0.5  # results.json keeps every number

    defaults = stage.config_with_arguments(_eval_args())  # unset: the harness's own defaults
    assert stage.lm_eval_options(defaults.eval) == {"apply_chat_template": False, "num_fewshot": None,
                                                    "limit": None}


@pytest.mark.parametrize("flags, configured, expected", [
    ((), True, True), ((), False, False),                                   # no flag: the config's value
    (("--lm-eval-chat-template",), False, True),
    (("--no-lm-eval-chat-template",), True, False),                         # a config's true turned off
])
def test_the_chat_template_flag_turns_the_config_key_on_or_off(flags, configured, expected):
    args = _eval_args(*flags, f"eval.lm_eval_chat_template={str(configured).lower()}")
    assert stage.config_with_arguments(args).eval.lm_eval_chat_template is expected


@pytest.mark.parametrize("flags", [("--lm-eval-fewshot", "-1"), ("--lm-eval-limit", "0"),
                                   ("--lm-eval-limit", "ten")])
def test_a_bad_lm_eval_count_is_refused(flags, capsys):
    with pytest.raises(SystemExit):
        _eval_args(*flags)
    assert flags[0] in capsys.readouterr().err


def test_the_lm_eval_count_keys_are_checked(held_out_run):
    held_out_run.eval.lm_eval_limit = 0
    try:
        with pytest.raises(ConfigError, match="eval.lm_eval_limit must be 1 or more"):
            stage.lm_eval_options(held_out_run.eval)
    finally:
        held_out_run.eval.lm_eval_limit = None


def test_the_harness_table_shows_metrics_with_their_stderr_beside_them():
    def scores(name, harness):
        return stage.ModelScores(name, f"/m/{name}", 1.0, 0.5, 10, None, None, 0, harness)

    results = [
        scores("instruct", {"gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.0125,
                                      "exact_match,flexible-extract": 0.3, "sample_len": 1319},
                            "local": {"acc,none": 0.41666, "acc_stderr,none": 0.14863, "sample_len": 12}}),
        scores("merged", {"gsm8k": {"exact_match,strict-match": 0.5, "sample_len": 1319},
                          "local": {"acc,none": 0.5, "acc_stderr,none": 0.15, "sample_len": 12}}),
    ]
    table = stage.markdown_table(results)
    harness = table.split("lm-evaluation-harness:")[1].strip().splitlines()
    assert harness[0] == ("| model | gsm8k exact_match (strict-match) | gsm8k exact_match (flexible-extract) | "
                          "local acc |")
    assert harness[2] == "| instruct | 0.2500 ± 0.0125 | 0.3000 | 0.4167 ± 0.1486 |"
    assert harness[3] == "| merged | 0.5000 | n/a | 0.5000 ± 0.1500 |"
    assert "sample_len" not in table and "stderr" not in table
