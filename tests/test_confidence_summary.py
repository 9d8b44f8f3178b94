"""The scorer's summary.json: written by score's report, read through one contract function by every stage."""

from __future__ import annotations

import json

import pytest

from gift_dist.config import load_config
from gift_dist.contracts import ContractError
from gift_dist.contracts import confidence as contract
from gift_dist.score.report import HISTOGRAM_BINS, ScoreSummary, write_confidence_report
from gift_dist.train.recipe import confidence_summary


def _summary(**changes) -> ScoreSummary:
    values = dict(shards_finished=2, shards_total=2, samples=10, tokens=120, scoring_seconds=1.5,
                  tokens_per_second=80.0, mean_confidence=0.625, low_confidence_share=0.125,
                  histogram_counts=[0] * (HISTOGRAM_BINS - 1) + [120], worker="host:1:0")
    return ScoreSummary(**{**values, **changes})


def test_the_summary_the_scorer_writes_is_what_train_and_the_demo_read(tmp_path):
    assert contract.read_summary(tmp_path) is None  # scoring has not finished yet
    write_confidence_report(tmp_path, _summary())
    data = contract.read_summary(tmp_path)
    assert (data["mean_confidence"], data["low_confidence_share"], data["tokens"], data["samples"]) == \
        (0.625, 0.125, 120, 10)
    assert "worker" not in data  # the worker's own share is not the folder's
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}"])
    cfg.paths.confidence.mkdir(parents=True)
    write_confidence_report(cfg.paths.confidence, _summary())
    assert confidence_summary(cfg) == {"confidence/mean_confidence": 0.625, "confidence/low_confidence_share": 0.125,
                                       "confidence/tokens": 120, "confidence/samples": 10}
    cfg.train.weighting = "uniform"  # Shadow-FT reads no confidence, so it reports none
    assert confidence_summary(cfg) is None


@pytest.mark.parametrize("text", ["{not json", json.dumps({"mean_confidence": float("nan"), "tokens": 1,
                                                            "low_confidence_share": 0.0, "samples": 1}),
                                  json.dumps({"tokens": 3})])
def test_a_broken_summary_is_one_error_naming_the_file(tmp_path, text, caplog):
    (tmp_path / contract.SUMMARY_NAME).write_text(text)
    with pytest.raises(ContractError, match=f"{contract.SUMMARY_NAME}"):
        contract.read_summary(tmp_path)
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}"])
    cfg.paths.confidence.mkdir(parents=True)
    (cfg.paths.confidence / contract.SUMMARY_NAME).write_text(text)
    with caplog.at_level("WARNING"):
        assert confidence_summary(cfg) is None  # the trackers go without it, the training does not stop
    assert "cannot read the confidence summary" in caplog.text
