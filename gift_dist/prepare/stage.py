"""`gift-dist prepare`: tokenize the training data exactly once, with the instruct model's chat template.

Reads like the algorithm:
  1. check the base/instruct pair and the instruct tokenizer's chat template;
  2. fingerprint data + tokenizer + settings;
  3. read every record, normalise it to messages, render and label it (datasets.map, num_proc workers);
  4. count drops by reason (or fail on the first with --strict), apply the max-length policy;
  5. fix a seeded epoch-0 order, hold out whole prompt groups (``prepare.split_key``) from its end, measure the
     prompt overlap of the held-out split and of eval.general_files with training, plan the shards, write the
     prepared contract.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np

from gift_dist import __version__, dist
from gift_dist.config import (
    DataConfig,
    DataSource,
    PrepareConfig,
    RunConfig,
    add_config_arguments,
    config_from_args,
    require,
)
from gift_dist.contracts import ContractError, require_writable
from gift_dist.contracts import prepared as contract
from gift_dist.models.pair import check_pair, load_tokenizer
from gift_dist.prepare.readers import (
    NO_PROMPT_KEYS,
    DropRecord,
    describe_sources,
    load_raw_records,
    normalize_record,
    prompt_keys,
)
from gift_dist.chat import TemplateError, render_conversation, require_chat_template

log = logging.getLogger(__name__)
# Part of the datasets cache keys of the intermediate tables: the data fingerprint says what the rows are made
# from, not which columns this code gives them, so a change of those columns must change this too.
TABLE_LAYOUT = "sources-2"

def _identify(cfg: RunConfig, tokenizer) -> tuple[list[dict], dict, dict, str]:
    sources = describe_sources(cfg.data)
    tok_desc = contract.tokenizer_description(tokenizer, cfg.instruct_model)
    settings = contract.fingerprint_settings(cfg.data, cfg.prepare)
    return sources, tok_desc, settings, contract.compute_fingerprint(sources, tok_desc, settings)


def expected_fingerprint(cfg: RunConfig) -> str:
    """The fingerprint `prepare` would write for this config (hashes the data files; tokenizes nothing)."""
    return _identify(cfg, load_tokenizer(cfg.instruct_model, cfg.trust_remote_code))[3]


def _tokenize_batch(batch: dict, tokenizer, data_cfg: DataConfig, prep_cfg: PrepareConfig,
                    formats: list[Optional[str]]) -> dict:
    """datasets.map worker: one output row per input record, with an empty drop_reason when it is kept;
    ``formats``: each source's record shape (None: data.format)."""
    out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "end_of_turn_ids", "drop_reason", "drop_detail",
                                            "prompt_key", "first_prompt_key", "turn_keys")}
    for raw, source_index in zip(batch["record"], batch["source_index"]):
        ids: list[int] = []
        labels: list[int] = []
        eot: list[int] = []
        reason = detail = ""
        keys = NO_PROMPT_KEYS
        try:
            conversation = normalize_record(raw, data_cfg, formats[source_index])
            keys = prompt_keys(conversation.messages)
            rendered = render_conversation(tokenizer, conversation.messages, prep_cfg.train_on, conversation.tools)
            ids, labels, eot = rendered.input_ids, rendered.labels, rendered.end_of_turn_ids
            if len(ids) > prep_cfg.max_length:
                if prep_cfg.overlength == "drop":
                    raise DropRecord("over_length", f"{len(ids)} tokens > max_length {prep_cfg.max_length}")
                ids, labels = ids[: prep_cfg.max_length], labels[: prep_cfg.max_length]
            if all(label == contract.IGNORE_INDEX for label in labels):
                raise DropRecord("no_target_tokens", "no assistant token left (truncated away by max_length)")
        except DropRecord as drop:
            ids, labels, eot, reason, detail = [], [], [], drop.reason, drop.detail
            keys = NO_PROMPT_KEYS
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["end_of_turn_ids"].append(sorted(set(eot)))
        out["drop_reason"].append(reason)
        out["drop_detail"].append(detail)
        out["prompt_key"].append(keys["user_turns"])
        out["first_prompt_key"].append(keys["first_user_turn"])
        out["turn_keys"].append(keys["turns"])
    out["num_tokens"] = [len(x) for x in out["input_ids"]]
    out["num_target_tokens"] = [sum(1 for v in x if v != contract.IGNORE_INDEX) for x in out["labels"]]
    return out


def prepare(cfg: RunConfig) -> contract.Prepared:
    """Run the prepare stage and return the written, re-validated prepared dataset; one writer per run folder
    (``dist.stage_lock``)."""
    require(cfg, "instruct_model")
    require_writable(cfg.paths.prepared.parent, "the output directory (output_dir)")
    with dist.stage_lock(cfg.paths.root, "prepare"):
        return _prepare(cfg)


def _prepare(cfg: RunConfig) -> contract.Prepared:
    from datasets import Features, Sequence, Value

    if cfg.base_model:
        check_pair(cfg.base_model, cfg.instruct_model, cfg.trust_remote_code)
    tokenizer = load_tokenizer(cfg.instruct_model, cfg.trust_remote_code)
    require_chat_template(tokenizer, cfg.instruct_model)

    sources, tok_desc, settings, fingerprint = _identify(cfg, tokenizer)
    log.info("prepare: fingerprint %s", fingerprint)

    raw = load_raw_records(cfg.data, sources)
    features = Features({
        "source": Value("string"), "row": Value("int64"), "record": Value("string"), "source_index": Value("int64"),
        "input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
        "end_of_turn_ids": Sequence(Value("int32")), "drop_reason": Value("string"),
        "drop_detail": Value("string"), "num_tokens": Value("int32"), "num_target_tokens": Value("int32"),
        "prompt_key": Value("string"), "first_prompt_key": Value("string"), "turn_keys": Sequence(Value("string")),
    })
    try:
        tokenized = raw.map(
            _tokenize_batch,
            batched=True,
            batch_size=256,
            num_proc=cfg.prepare.num_proc if cfg.prepare.num_proc > 1 else None,
            fn_kwargs={"tokenizer": tokenizer, "data_cfg": cfg.data, "prep_cfg": cfg.prepare,
                       "formats": [source.format for source in cfg.data.all_sources()]},
            features=features,
            new_fingerprint=f"{fingerprint}-tokenized-{TABLE_LAYOUT}",
            desc="tokenize",
        )
    except TemplateError:
        raise
    except Exception as exc:
        if isinstance(exc.__cause__, TemplateError):
            raise exc.__cause__ from None
        raise

    # A list: a dataset column (datasets >= 4: a lazy Column) reads one row per index, and reasons[i] is read
    # for every record below (per source); ~0.2 ms a read.
    reasons = list(tokenized["drop_reason"])
    dropped = Counter(r for r in reasons if r)
    if dropped and cfg.prepare.strict:
        first = next(i for i, r in enumerate(reasons) if r)
        bad = tokenized[first]
        raise ContractError(
            f"--strict: record {bad['row']} of {bad['source']} is unusable ({bad['drop_reason']}: "
            f"{bad['drop_detail']}); {sum(dropped.values())} records would be dropped: {dict(dropped)}"
        )
    kept_rows = np.flatnonzero(np.array([r == "" for r in reasons], dtype=bool))
    if len(kept_rows) == 0:
        raise ContractError(f"no usable records in the data: all {len(reasons)} records dropped: "
                            f"{drop_summary(dropped, cfg.prepare)}")
    for reason, count in sorted(dropped.items()):
        log.warning("prepare: dropped %d records: %s", count, reason)

    order = kept_rows[np.random.default_rng(cfg.prepare.seed).permutation(len(kept_rows))]
    # The held-out samples are whole prompt groups taken from the end of the seeded order: disjoint from training
    # by content (prepare.split_key), the same on every run (and taken before the mix, so an up-sampled record
    # never lands on both sides).
    turns_of = list(tokenized["turn_keys"])
    group_of = {"any_user_turn": lambda: linked_groups(turns_of), "user_turns": lambda: list(tokenized["prompt_key"]),
                "first_user_turn": lambda: list(tokenized["first_prompt_key"]), "none": lambda: None,
                }[cfg.prepare.split_key]()
    order, eval_order = split_held_out(order, group_of, eval_count(len(order), cfg.prepare), cfg.prepare)
    held_out = len(eval_order)
    source_of = np.asarray(tokenized["source_index"])
    for index, source in enumerate(cfg.data.all_sources()):
        mine = [reasons[i] for i in np.flatnonzero(source_of == index)]
        if mine and all(mine) and (source.samples or source.weight):
            raise ContractError(f"data source {source.name}: all {len(mine)} records dropped: "
                                f"{drop_summary(Counter(mine), cfg.prepare)}; nothing to sample from")
    order = mix_sources(order, source_of, cfg.data.all_sources(), cfg.prepare.seed)
    per_source = source_counts(cfg.data.all_sources(), source_of, reasons, order, eval_order)
    trained_turns = {turn for row in order.tolist() for turn in turns_of[row]}
    overlap = prompt_overlap(cfg, turns_of, trained_turns, eval_order)
    eos_ids = sorted({int(i) for ids in tokenized.select(kept_rows)["end_of_turn_ids"] for i in ids}
                     | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))
    def split(rows: np.ndarray, name: str):
        samples = (
            tokenized.select(rows, new_fingerprint=f"{fingerprint}-{name}-ordered-{TABLE_LAYOUT}")
            .map(lambda row: {"record_index": row}, input_columns="row",
                 new_fingerprint=f"{fingerprint}-{name}-indexed-{TABLE_LAYOUT}")
            .remove_columns(["source", "source_index", "row", "record", "end_of_turn_ids", "drop_reason",
                             "drop_detail", "prompt_key", "first_prompt_key", "turn_keys"])
            .flatten_indices(new_fingerprint=f"{fingerprint}-{name}-flat-{TABLE_LAYOUT}")
        )
        num_tokens, num_targets = samples["num_tokens"], samples["num_target_tokens"]
        counts = {"records_read": len(reasons), "kept": len(rows), "dropped": dict(sorted(dropped.items()))}
        if name == "train":
            counts["held_out"] = held_out
            counts["sources"] = per_source
        return samples, contract.PreparedManifest(
            fingerprint=fingerprint,
            tokenizer=tok_desc,
            settings=settings,
            sources=sources,
            counts=counts,
            tokens={"total": int(sum(num_tokens)), "target": int(sum(num_targets))},
            eos_token_ids=eos_ids,
            pad_token_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id),
            shards=contract.plan_shards(num_tokens, num_targets, cfg.prepare.samples_per_shard),
            created_with={"gift_dist": __version__},
            split=name,
            prompt_overlap=overlap if name == "train" else {},
        )

    samples, manifest = split(order, "train")
    contract.write_prepared(cfg.paths.prepared, samples, manifest,
                            eval_split=split(eval_order, "eval") if held_out else None)
    log.info(
        "prepare: %d of %d records kept, %d target tokens of %d, %d shards -> %s",
        len(order), len(reasons), manifest.tokens["target"], manifest.tokens["total"], len(manifest.shards),
        cfg.paths.prepared,
    )
    return contract.load_prepared(cfg.paths.prepared, expected_fingerprint=fingerprint)


def split_held_out(order: np.ndarray, group_of: Optional[list[str]], count: int,
                   prep: PrepareConfig) -> tuple[np.ndarray, np.ndarray]:
    """``order`` split into (training rows, held-out rows), both in ``order``'s order: walking the seeded order
    from its end, each record's whole group (rows sharing a non-empty ``group_of[row]``; every row its own group
    when ``group_of`` is None or the key is empty) is held out while it fits in ``count``. Record by record this is
    the last ``count`` rows; with groups it is ``count`` rows unless only groups too large for the rest are left."""
    if count == 0:
        return order, order[:0]
    positions: dict[Any, list[int]] = {}
    for position, row in enumerate(order.tolist()):
        key = group_of[row] if group_of is not None and group_of[row] else ("row", row)
        positions.setdefault(key, []).append(position)
    held = np.zeros(len(order), dtype=bool)
    taken, seen = 0, set()
    for position in range(len(order) - 1, -1, -1):
        if taken == count:
            break
        row = int(order[position])
        key = group_of[row] if group_of is not None and group_of[row] else ("row", row)
        if key in seen:
            continue
        seen.add(key)
        if taken + len(positions[key]) <= count:
            held[positions[key]] = True
            taken += len(positions[key])
    if taken == 0:
        raise ContractError(
            f"prepare.eval_fraction={prep.eval_fraction} asks for {count} held-out records but every prompt group "
            f"(records with the same prepare.split_key={prep.split_key}) is larger: no prompt can be held out "
            f"without training on it. Raise prepare.eval_fraction, or set prepare.split_key=none to split record by "
            f"record")
    if taken < count:
        log.warning("prepare: held out %d records instead of %d (whole prompt groups only, prepare.split_key=%s)",
                    taken, count, prep.split_key)
    return order[~held], order[held]


def linked_groups(turns_of: list[list[str]]) -> list[str]:
    """Each row's prompt group under ``any_user_turn``: rows sharing a user turn are linked, and linked rows form one
    group, transitively (a union-find over turns; its name is the group's smallest turn digest). "" for a row
    without user text (a group of its own)."""
    parent: dict[str, str] = {}

    def root(turn: str) -> str:
        while parent.setdefault(turn, turn) != turn:
            parent[turn] = parent[parent[turn]]
            turn = parent[turn]
        return turn

    for turns in turns_of:
        for turn in turns[1:]:
            first, other = root(turns[0]), root(turn)
            if first != other:
                parent[max(first, other)] = min(first, other)  # the smaller digest names the group
    return [root(turns[0]) if turns else "" for turns in turns_of]


def prompt_overlap(cfg: RunConfig, turns_of: list[list[str]], trained: set[str], eval_rows: np.ndarray) -> dict:
    """What prepare.json reports of user turns seen in training: held-out samples with any user turn that is
    trained on (in any training record, as any turn; 0 by construction with prepare.split_key any_user_turn), and
    per eval.general_files file its records with one; each non-zero count is logged as a warning."""
    in_training = sum(1 for row in eval_rows.tolist() if not trained.isdisjoint(turns_of[row]))
    report: dict[str, Any] = {"key": "any_user_turn", "split_key": cfg.prepare.split_key,
                              "held_out": int(len(eval_rows)), "held_out_prompts_in_training": int(in_training),
                              "eval_files": []}
    if in_training:
        log.warning("prepare: %d of %d held-out samples have a user turn that is also trained on "
                    "(prepare.split_key=%s; any_user_turn holds none out)", in_training, len(eval_rows),
                    cfg.prepare.split_key)
    for name in cfg.eval.general_files:
        counted = eval_file_overlap(Path(name), trained)
        if counted is None:
            log.warning("prepare: eval.general_files %s not found: its overlap with training is not measured", name)
            continue
        report["eval_files"].append(counted)
        if counted["prompts_in_training"]:
            log.warning("prepare: %d of %d records of eval file %s have a user turn that is also in the training "
                        "data",
                        counted["prompts_in_training"], counted["records"], name)
    return report


def eval_file_overlap(path: Path, trained: set[str]) -> Optional[dict]:
    """A user's evaluation file (chat records with ``messages``, jsonl) against the training user turns: records
    read, records with a usable prompt, and those with a user turn trained on; None when the file does not exist."""
    from gift_dist.contracts import file_sha256

    if not path.is_file():
        return None
    records = prompts = in_training = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            records += 1
            try:
                turns = prompt_keys(normalize_record(line, DataConfig(), "messages").messages)["turns"]
            except DropRecord:
                continue
            if turns:
                prompts += 1
                in_training += not trained.isdisjoint(turns)
    return {"file": path.name, "sha256": file_sha256(path), "records": records, "prompts": prompts,
            "prompts_in_training": in_training}


def drop_summary(dropped: Counter, prep: PrepareConfig) -> str:
    """Every drop reason with its count, most frequent first, with the setting behind it:
    "58 over_length (max_length=256; raise prepare.max_length or set prepare.overlength=truncate), 2 ..."."""
    settings = {"over_length": f" (max_length={prep.max_length}; raise prepare.max_length or set "
                               f"prepare.overlength=truncate)",
                "no_target_tokens": f" (no assistant token within max_length={prep.max_length})"}
    return ", ".join(f"{count} {reason}{settings.get(reason, '')}"
                     for reason, count in sorted(dropped.items(), key=lambda item: (-item[1], item[0])))


def mix_sources(order: np.ndarray, source_of: np.ndarray, sources: list[DataSource], seed: int) -> np.ndarray:
    """The training rows of the mix, in a seeded order: each source's rows of ``order`` taken whole, at its weight's
    share of the weighted sources' total, or at its sample count, down-sampled without replacement or up-sampled
    by whole repeats plus a random remainder. Without any weight or count the order is returned unchanged."""
    if all(s.weight is None and s.samples is None for s in sources):
        return order
    rng = np.random.default_rng([seed, 1])
    rows = [order[source_of[order] == index] for index in range(len(sources))]
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    pool = sum(len(rows[i]) for i in weighted)
    total_weight = sum(sources[i].weight for i in weighted)
    picked = []
    for index, source in enumerate(sources):
        have = rows[index]
        if source.samples is not None:
            want = source.samples
        elif source.weight is not None:
            want = round(pool * source.weight / total_weight)
        else:
            want = len(have)
        if want and not len(have):
            raise ContractError(f"data source {source.name} has no usable record to take {want} from")
        repeats, remainder = divmod(want, max(len(have), 1))
        picked += [np.tile(have, repeats), rng.choice(have, remainder, replace=False) if remainder else have[:0]]
    mixed = np.concatenate(picked)
    return mixed[rng.permutation(len(mixed))]


def source_counts(sources: list[DataSource], source_of: np.ndarray, reasons: list[str], train_rows: np.ndarray,
                  eval_rows: np.ndarray) -> list[dict]:
    """Per source: records read, kept, dropped by reason, held out, and samples in the training mix."""
    counts = []
    for index, source in enumerate(sources):
        mine = np.flatnonzero(source_of == index)
        dropped = Counter(reasons[i] for i in mine if reasons[i])
        counts.append({
            "source": source.name, "weight": source.weight, "samples": source.samples,
            "records_read": int(len(mine)), "kept": int(len(mine) - sum(dropped.values())),
            "dropped": dict(sorted(dropped.items())), "held_out": int((source_of[eval_rows] == index).sum()),
            "trained": int((source_of[train_rows] == index).sum()),
        })
    return counts


def eval_count(kept: int, prep: PrepareConfig) -> int:
    """How many of the kept records are held out: ``eval_fraction`` of them, at most ``eval_max_samples``, and
    never all of them."""
    if not 0.0 <= prep.eval_fraction < 1.0:
        raise ContractError(f"config key 'prepare.eval_fraction' must lie in [0, 1), got {prep.eval_fraction}")
    if prep.eval_fraction == 0.0:
        return 0
    count = min(max(1, round(kept * prep.eval_fraction)), prep.eval_max_samples, kept - 1)
    if count < 1:
        raise ContractError(f"prepare.eval_fraction={prep.eval_fraction} leaves nothing to train on ({kept} records "
                            f"kept); lower it or add data")
    return count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, sections=("data", "prepare"))
    parser.add_argument("--strict", action="store_true", help="fail on the first unusable record instead of dropping")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.strict:
        cfg.prepare.strict = True
    prepared = prepare(cfg)
    m = prepared.manifest
    print(json.dumps({"prepared": str(prepared.path), "fingerprint": m.fingerprint, "counts": m.counts,
                      "tokens": m.tokens, "shards": len(m.shards)}, indent=2))
    return 0
