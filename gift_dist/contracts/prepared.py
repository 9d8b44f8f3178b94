"""The prepared-dataset contract: the token ids the instruct model scores and the base model trains on.

Layout of a prepared directory::

    prepared/
      prepared.json      # this module's manifest (format, version, fingerprint, counts, shard plan)
      data/              # a `datasets` Arrow dataset (save_to_disk), rows in epoch-0 order
      eval/              # optional held-out split (prepare.eval_fraction): the same layout, split "eval"; whole
                         # prompt groups (prepare.split_key), so no held-out prompt is in data/

Columns: ``input_ids`` (int32 list), ``labels`` (int32 list, -100 on every non-target token),
``record_index`` (int64: row of the source data), ``num_tokens`` and ``num_target_tokens`` (int32).
Row ``i`` of ``data/`` is *sample index* ``i``: the key the confidence shards use.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from gift_dist.config import DataConfig, PrepareConfig, config_to_dict, result_settings
from gift_dist.contracts import (
    ContractError,
    changed_settings,
    file_sha256,
    folder_digests,
    read_json,
    record_from,
    staged_directory,
    verify_folder_digests,
)

FORMAT = "gift_dist.prepared"
# 2: the held-out split is taken by prompt (prepare.split_key) and the training manifest reports
#    ``prompt_overlap``; a version-1 split may share prompts with training, so it is refused (rerun prepare).
# 3: records sharing any user turn are one prompt group (split_key any_user_turn) and the overlap is counted turn
#    by turn; a version-2 split may hold out a question that training asks in another record (rerun prepare).
VERSION = 3
MANIFEST_NAME = "prepared.json"
DATA_DIR = "data"
EVAL_DIR = "eval"
IGNORE_INDEX = -100
REQUIRED_COLUMNS = ("input_ids", "labels", "record_index", "num_tokens", "num_target_tokens")


@dataclass(frozen=True)
class ShardSpec:
    """One entry of the shard plan: samples ``[start, end)`` of the epoch-0 order."""

    index: int
    start: int
    end: int
    num_tokens: int
    num_target_tokens: int

    @property
    def num_samples(self) -> int:
        return self.end - self.start


@dataclass
class PreparedManifest:
    fingerprint: str
    tokenizer: dict[str, Any]
    settings: dict[str, Any]
    sources: list[dict[str, Any]]
    counts: dict[str, Any]
    tokens: dict[str, int]
    eos_token_ids: list[int]
    pad_token_id: int
    shards: list[ShardSpec]
    format: str = FORMAT
    version: int = VERSION
    created_with: dict[str, str] = field(default_factory=dict)
    # "train", or "eval" for the held-out split in eval/ (same fingerprint: one prepare made both, disjointly).
    split: str = "train"
    # sha256 of every file of data/ by name, checked on load (empty in manifests written before it was recorded).
    data_sha256: dict[str, str] = field(default_factory=dict)
    # Training split only: held-out records with a user turn (any of them) seen in training, as prepare measured:
    # {"key", "split_key", "held_out", "held_out_prompts_in_training", "eval_files": [{"file", "sha256", "records",
    # "prompts", "prompts_in_training"}]} (eval.general_files at prepare time). Empty for the eval split.
    prompt_overlap: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return self.shards[-1].end if self.shards else 0

    def shard_of(self, sample_index: int) -> ShardSpec:
        """The shard that holds ``sample_index`` (shards are contiguous and equal-sized but the last)."""
        if not 0 <= sample_index < self.num_samples:
            raise IndexError(f"sample index {sample_index} outside the prepared dataset (0..{self.num_samples - 1})")
        size = self.shards[0].num_samples
        return self.shards[min(sample_index // size, len(self.shards) - 1)]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, where: str) -> "PreparedManifest":
        def build(**values) -> "PreparedManifest":
            return cls(**{**values, "shards": [ShardSpec(**s) for s in values["shards"]]})

        return record_from(data, build, FORMAT, VERSION, where, "re-run `gift-dist prepare`", "prepared manifest",
                           errors=(KeyError, TypeError))

    def validate(self, where: str) -> None:
        expected_start = 0
        for i, shard in enumerate(self.shards):
            if shard.index != i or shard.start != expected_start or shard.end <= shard.start:
                raise ContractError(f"{where}: shard plan entry {i} is inconsistent: {shard}")
            expected_start = shard.end
        if self.counts.get("kept") != self.num_samples:
            raise ContractError(
                f"{where}: counts.kept={self.counts.get('kept')} but the shard plan covers {self.num_samples} samples"
            )
        overlap = self.prompt_overlap
        if overlap:
            held_out, in_training = overlap.get("held_out"), overlap.get("held_out_prompts_in_training")
            files = overlap.get("eval_files")
            if (not isinstance(held_out, int) or not isinstance(in_training, int) or not 0 <= in_training <= held_out
                    or held_out != self.counts.get("held_out", 0) or not isinstance(files, list)
                    or not all(isinstance(f, dict) and 0 <= f.get("prompts_in_training", -1) <= f.get("prompts", -1)
                               for f in files)):
                raise ContractError(f"{where}: prompt_overlap is inconsistent (held out {self.counts.get('held_out')} "
                                    f"samples): {overlap}")


def plan_shards(num_tokens: list[int], num_target_tokens: list[int], samples_per_shard: int) -> list[ShardSpec]:
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    shards = []
    for index, start in enumerate(range(0, len(num_tokens), samples_per_shard)):
        end = min(start + samples_per_shard, len(num_tokens))
        shards.append(
            ShardSpec(index, start, end, int(sum(num_tokens[start:end])), int(sum(num_target_tokens[start:end])))
        )
    return shards


def write_prepared(out_dir: str | Path, dataset: Any, manifest: PreparedManifest, num_proc: int = 1,
                   eval_split: Optional[tuple[Any, PreparedManifest]] = None) -> Path:
    """Write dataset + manifest (and the held-out split, if any, into eval/) into a temporary sibling and rename
    it: a prepared dir is complete or absent."""
    out_dir = Path(out_dir)
    parts = [(Path("."), dataset, manifest)] + ([(Path(EVAL_DIR), *eval_split)] if eval_split else [])
    for _, data, part_manifest in parts:
        missing = [c for c in REQUIRED_COLUMNS if c not in data.column_names]
        if missing:
            raise ContractError(f"prepared dataset lacks columns {missing}")
        part_manifest.validate(str(out_dir))
    with staged_directory(out_dir) as tmp:
        for folder, data, part_manifest in parts:
            data.save_to_disk(str(tmp / folder / DATA_DIR), num_proc=num_proc if num_proc > 1 else None)
            part_manifest = replace(part_manifest, data_sha256=folder_digests(tmp / folder / DATA_DIR))
            (tmp / folder / MANIFEST_NAME).write_text(
                json.dumps(part_manifest.to_json(), indent=2, sort_keys=True) + "\n")
    return out_dir


def verify_data_files(data_dir: Path, manifest: PreparedManifest) -> None:
    """The Arrow files are the ones prepare wrote: same names, same sha256."""
    if manifest.data_sha256:
        verify_folder_digests(data_dir, manifest.data_sha256, "prepared data", "prepare", "rerun `gift-dist prepare`")


def read_manifest(prepared_dir: str | Path) -> PreparedManifest:
    prepared_dir = Path(prepared_dir)
    path = prepared_dir / MANIFEST_NAME
    if not path.is_file():
        raise ContractError(
            f"no prepared dataset at {prepared_dir} ({MANIFEST_NAME} missing); run `gift-dist prepare` first"
        )
    manifest = PreparedManifest.from_json(read_json(path), str(path))
    manifest.validate(str(path))
    return manifest


# The fingerprint: what the prepared rows are a function of. Its parts are kept in the manifest, so a reader that
# has the config and the tokenizer at hand can recompute them and say which one changed.


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_description(tokenizer, model: str) -> dict[str, Any]:
    return {
        "name_or_path": model,
        "size": len(tokenizer),
        "vocab_sha256": _sha(tokenizer.get_vocab()),
        "chat_template_sha256": _sha(tokenizer.chat_template),
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
    }


def fingerprint_settings(data: DataConfig, prep: PrepareConfig) -> dict[str, Any]:
    # File locations are left out (their contents are in the sources' hashes): moving the data keeps the fingerprint.
    data_settings = {k: v for k, v in config_to_dict(data).items() if k not in ("files", "sources")}
    if data.sources:
        data_settings["sources"] = [{k: v for k, v in source.items() if k != "path"}
                                    for source in config_to_dict(data)["sources"]]
    # Settings that cannot change the prepared output are left out (marked operational on the config fields).
    prep_settings = result_settings(PrepareConfig, prep)
    return {"data": data_settings, "prepare": prep_settings}


def source_descriptions(data: DataConfig) -> list[dict[str, Any]]:
    """What the data is, source by source: file names with content hashes, or hub ids (files must exist)."""
    sources = data.all_sources()
    if not sources:
        raise ContractError("no training data configured: set data.files (local files), data.hub_id or data.sources")
    return [{"hub_id": s.hub_id, "split": s.split, "revision": s.revision} if s.hub_id is not None
            else {"file": Path(s.path).name, "sha256": file_sha256(s.path)} for s in sources]


def compute_fingerprint(sources: list[dict], tokenizer_desc: dict, settings: dict) -> str:
    tokenizer_part = {k: v for k, v in tokenizer_desc.items() if k != "name_or_path"}
    return _sha({"version": VERSION, "sources": sources, "tokenizer": tokenizer_part, "settings": settings})[:32]


def _listed(changes: dict) -> list[str]:
    return [f"{key}: {then!r} -> {now!r}" for key, (then, now) in changes.items()]


def check_prepared_identity(manifest: PreparedManifest, where: str, tokenizer_desc: dict, settings: dict,
                            sources: Optional[list[dict]]) -> None:
    """Refuse prepared data whose recorded tokenizer, settings or (when given) sources differ from what this
    config would prepare, naming what changed: the fix is to rerun prepare, or to restore what changed."""
    changes = []
    then_tokenizer = {k: v for k, v in manifest.tokenizer.items() if k != "name_or_path"}
    now_tokenizer = {k: v for k, v in tokenizer_desc.items() if k != "name_or_path"}
    if then_tokenizer != now_tokenizer:
        changes.append(f"the tokenizer ({manifest.tokenizer.get('name_or_path')} then, "
                       f"{tokenizer_desc.get('name_or_path')} now: "
                       + ", ".join(_listed(changed_settings(then_tokenizer, now_tokenizer))) + ")")
    changes += [f"setting {change}" for change in _listed(changed_settings(manifest.settings, settings))]
    if sources is not None and sources != manifest.sources:
        changes.append(f"the data: {manifest.sources} then, {sources} now")
    if changes:
        raise ContractError(f"prepared dataset {where} was made from other inputs than this config's: "
                            + "; ".join(changes) + ". Rerun `gift-dist prepare` (then score) for this config, or "
                            "restore the config it was made with")


@dataclass
class Prepared:
    """A validated prepared dataset: the manifest plus the memory-mapped Arrow rows."""

    path: Path
    manifest: PreparedManifest
    dataset: Any

    def __len__(self) -> int:
        return len(self.dataset)


def load_prepared(prepared_dir: str | Path, expected_fingerprint: Optional[str] = None) -> Prepared:
    """Open a prepared dataset memory-mapped and check it against its manifest."""
    from datasets import load_from_disk

    prepared_dir = Path(prepared_dir)
    manifest = read_manifest(prepared_dir)
    if expected_fingerprint is not None and manifest.fingerprint != expected_fingerprint:
        raise ContractError(
            f"prepared dataset {prepared_dir} has fingerprint {manifest.fingerprint}, expected {expected_fingerprint}"
        )
    data_dir = prepared_dir / DATA_DIR
    if not data_dir.is_dir():
        raise ContractError(f"prepared dataset {prepared_dir} lacks its {DATA_DIR}/ folder")
    verify_data_files(data_dir, manifest)
    try:
        dataset = load_from_disk(str(data_dir))
    except Exception as exc:  # datasets raises several types for a damaged dir
        raise ContractError(f"cannot open prepared data in {data_dir}: {exc}") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ContractError(f"prepared data in {data_dir} lacks columns {missing}")
    if len(dataset) != manifest.num_samples:
        raise ContractError(
            f"prepared data in {data_dir} has {len(dataset)} rows but {MANIFEST_NAME} plans {manifest.num_samples}"
        )
    return Prepared(prepared_dir, manifest, dataset)


def load_eval_split(prepared_dir: str | Path) -> Optional[Prepared]:
    """The held-out split of a prepared dataset (``eval/``), checked against the training split's fingerprint;
    None when prepare made none."""
    prepared_dir = Path(prepared_dir)
    if not (prepared_dir / EVAL_DIR / MANIFEST_NAME).is_file():
        return None
    fingerprint = read_manifest(prepared_dir).fingerprint
    held_out = load_prepared(prepared_dir / EVAL_DIR, expected_fingerprint=fingerprint)
    if held_out.manifest.split != "eval":
        raise ContractError(f"{prepared_dir / EVAL_DIR / MANIFEST_NAME}: split is {held_out.manifest.split!r}, "
                            f"expected 'eval'")
    return held_out
