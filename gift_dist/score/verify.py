"""`gift-dist verify-confidence DIR`: check every confidence shard against the manifest and the prepared dataset.

Checks the manifest belongs to the prepared dataset (fingerprint, shard count), then for every finished shard:
checksum, metadata, CSR layout, finite values, exactly the plan's samples and one value per target token.
Every problem is reported naming its shard file; the exit code is 1 when any is found.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from gift_dist.contracts import ContractError
from gift_dist.contracts import confidence as contract
from gift_dist.contracts.prepared import Prepared, load_prepared


@dataclass
class ConfidenceVerifyReport:
    conf_dir: Path
    shards_ok: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unfinished: list[int] = field(default_factory=list)
    # The finished shards that failed a check (``problems`` says why), for `score --rescore-corrupt`.
    bad_shards: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_confidence(conf_dir: str | Path, prepared_dir: str | Path,
                      prepared: Optional[Prepared] = None) -> ConfidenceVerifyReport:
    """``prepared``: the dataset at ``prepared_dir`` when the caller has it open already (not read again)."""
    conf_dir = Path(conf_dir)
    manifest = contract.read_manifest(conf_dir)
    if manifest is None:
        raise ContractError(f"no confidence manifest in {conf_dir}; run `gift-dist score` first")
    prepared = prepared or load_prepared(prepared_dir)
    manifest.check_matches(prepared.manifest.fingerprint, None, str(conf_dir))
    plan = prepared.manifest.shards
    if manifest.num_shards != len(plan):
        raise ContractError(f"{conf_dir} plans {manifest.num_shards} shards, the prepared dataset {len(plan)}")
    report = ConfidenceVerifyReport(conf_dir)
    target_counts = list(prepared.dataset["num_target_tokens"])
    for spec in plan:
        if spec.index not in manifest.shards:
            report.unfinished.append(spec.index)
            continue
        try:
            shard = contract.read_shard(conf_dir, manifest, spec.index)
            where = f"confidence shard {conf_dir / manifest.shards[spec.index].file}"
            contract.check_shard_against_plan(shard, spec.start, spec.end, target_counts[spec.start:spec.end], where)
        except ContractError as exc:
            report.problems.append(str(exc))
            report.bad_shards.append(spec.index)
        else:
            report.shards_ok.append(spec.index)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", nargs="?", help="the confidence directory (default: confidence/ of --config's run)")
    parser.add_argument("--prepared", help="the prepared dataset (default: prepared/ beside DIR, or of --config's run)")
    parser.add_argument("--config", help="run config YAML giving both directories")
    parser.add_argument("--allow-incomplete", action="store_true", help="do not fail on unfinished shards")


def _resolve_dirs(args: argparse.Namespace) -> tuple[Path, Path]:
    from gift_dist.config import load_config

    cfg = load_config(args.config) if args.config else None
    conf_dir: Optional[Path] = Path(args.dir) if args.dir else (cfg.paths.confidence if cfg else None)
    if conf_dir is None:
        raise ContractError("give the confidence directory (DIR) or --config")
    if args.prepared:
        prepared_dir = Path(args.prepared)
    elif cfg is not None:
        prepared_dir = cfg.paths.prepared
    else:
        prepared_dir = conf_dir.resolve().parent / "prepared"
    return conf_dir, prepared_dir


def run(args: argparse.Namespace) -> int:
    conf_dir, prepared_dir = _resolve_dirs(args)
    report = verify_confidence(conf_dir, prepared_dir)
    for problem in report.problems:
        print(f"BAD  {problem}")
    if report.unfinished:
        print(f"{'note' if args.allow_incomplete else 'BAD '} {len(report.unfinished)} shard(s) unfinished: "
              f"{report.unfinished[:20]}{' ...' if len(report.unfinished) > 20 else ''}")
    failed = bool(report.problems) or (bool(report.unfinished) and not args.allow_incomplete)
    print(f"{'FAILED' if failed else 'ok'}: {len(report.shards_ok)} shard(s) verified in {conf_dir} "
          f"against {prepared_dir}")
    return 1 if failed else 0
