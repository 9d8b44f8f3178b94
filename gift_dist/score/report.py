"""The scoring summary (summary.json) and confidence histogram (confidence_histogram.png) beside the manifest.

Both are computed from every finished shard listed in the manifest, so whichever worker writes them last
writes the same content.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gift_dist.config import TrainConfig
from gift_dist.contracts import atomic_write, atomic_write_text
from gift_dist.contracts import confidence as contract
from gift_dist.models import weights

HISTOGRAM_NAME = "confidence_histogram.png"
HISTOGRAM_BINS = 50
LOW_CONFIDENCE = 0.1


@dataclass
class ScoreSummary:
    """What `score` reports: totals over all finished shards, plus this worker's own share."""

    shards_finished: int
    shards_total: int
    samples: int
    tokens: int
    # Sum of per-shard scoring times and tokens / that sum: throughput of one replica.
    scoring_seconds: float
    tokens_per_second: float
    mean_confidence: float
    low_confidence_share: float  # share of target tokens with p_inst < 0.1
    histogram_counts: list[int]
    worker: str = ""
    worker_shards: int = 0
    worker_tokens: int = 0
    worker_tokens_per_second: float = 0.0

    @property
    def complete(self) -> bool:
        return self.shards_finished == self.shards_total

    def to_json(self) -> dict:
        """The shared, worker-independent part written to summary.json."""
        data = asdict(self)
        for key in ("worker", "worker_shards", "worker_tokens", "worker_tokens_per_second"):
            data.pop(key)
        data["low_confidence_threshold"] = LOW_CONFIDENCE
        data["histogram_bins"] = HISTOGRAM_BINS
        return data


def summarize(conf_dir: str | Path, manifest: contract.ConfidenceManifest) -> ScoreSummary:
    """Totals over every finished shard (read and checksum-verified one at a time)."""
    histogram = torch.zeros(HISTOGRAM_BINS, dtype=torch.float64)
    confidence_sum, low, tokens, samples, seconds = 0.0, 0, 0, 0, 0.0
    for index in sorted(manifest.shards):
        shard = contract.read_shard(conf_dir, manifest, index)
        probs = shard.logprobs.double().exp()
        confidence_sum += float(probs.sum())
        low += int((probs < LOW_CONFIDENCE).sum())
        histogram += torch.histc(probs, bins=HISTOGRAM_BINS, min=0.0, max=1.0)
        tokens += shard.logprobs.numel()
        samples += len(shard)
        seconds += manifest.shards[index].seconds
    return ScoreSummary(
        shards_finished=len(manifest.shards),
        shards_total=manifest.num_shards,
        samples=samples,
        tokens=tokens,
        scoring_seconds=round(seconds, 3),
        tokens_per_second=round(tokens / seconds, 1) if seconds > 0 else 0.0,
        mean_confidence=confidence_sum / tokens if tokens else 0.0,
        low_confidence_share=low / tokens if tokens else 0.0,
        histogram_counts=[int(c) for c in histogram.tolist()],
    )


def write_confidence_report(conf_dir: str | Path, summary: ScoreSummary) -> tuple[Path, Path]:
    """summary.json and the histogram PNG, each replaced whole."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf_dir = Path(conf_dir)
    summary_path, histogram_path = conf_dir / contract.SUMMARY_NAME, conf_dir / HISTOGRAM_NAME
    text = json.dumps(summary.to_json(), indent=2) + "\n"
    atomic_write_text(summary_path, text)

    width = 1.0 / HISTOGRAM_BINS
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([i * width for i in range(HISTOGRAM_BINS)], summary.histogram_counts, width=width, align="edge")
    ax.axvline(LOW_CONFIDENCE, color="tab:red", linestyle="--", label=f"p < {LOW_CONFIDENCE}: "
               f"{summary.low_confidence_share:.1%}")
    ax.set_xlabel("instruct model confidence p(target token)")
    ax.set_ylabel("target tokens")
    ax.set_title(f"{summary.tokens} target tokens, mean confidence {summary.mean_confidence:.3f}")
    ax.legend()
    fig.tight_layout()
    atomic_write(histogram_path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return summary_path, histogram_path


TOKEN_VIEW_NAME = "report.html"


def _shade(value: float) -> str:
    """Red (0) through yellow to green (1), light enough to read black text on."""
    value = min(max(value, 0.0), 1.0)
    red, green = (255, int(120 + 270 * value)) if value < 0.5 else (int(255 - 250 * (value - 0.5)), 255)
    return f"rgb({min(red, 255)},{min(green, 255)},150)"


def _weighting_note(train: TrainConfig) -> str:
    """How ``train``'s weighting makes a token's weight from p, for the view's header (HTML)."""
    floored = f"max(p, {train.prob_floor:g})<sup>{train.gamma:g}</sup>"
    formula = {
        "gift": floored,
        "clipped": f"{floored} clipped to [{train.weight_min:g}, {train.weight_max:g}]",
        "mean_normalized": f"{floored} divided by its mean over the sample (colours saturate at 1)",
    }[train.weighting]
    note = f"Weight (<code>train.weighting: {train.weighting}</code>) = {formula}."
    if weights.overrides_eos(train):
        note += f" End-of-sequence targets: weight {float(train.eos_weight):g} (<code>train.eos_weight</code>)."
    return note


# What the view says instead of a weight row for the weightings that do not read the instruct confidence.
_NO_CONFIDENCE_WEIGHTS = {
    "uniform": "every target token has the same weight, whatever the instruct model's confidence",
    "dft": "a token's weight is the trained model's own probability of it, known only during training",
}


def write_token_view(conf_dir: str | Path, manifest: contract.ConfidenceManifest, prepared, tokenizer, *,
                     train: TrainConfig, num_samples: int = 40) -> Path:
    """``report.html``: the first ``num_samples`` scored samples token by token, each target token shaded by the
    instruct model's probability p and by the training weight ``train.weighting`` gives it (the formulas of
    models/weights.py, the trainer's own, end-of-sequence override included), prompt tokens in grey. What training
    up- and down-weights, at a glance; hover a token for its numbers. ``uniform`` and ``dft`` have no weights made
    from p: the view says so and shades p alone. ``train``: the run's train settings (required: a weight shown
    under any other weighting than the one trained with would mislead)."""
    import html

    from gift_dist.contracts.prepared import IGNORE_INDEX

    weighted = train.weighting in weights.CONFIDENCE_FORMULAS
    eos_ids = torch.tensor(sorted(prepared.manifest.eos_token_ids), dtype=torch.long)
    conf_dir = Path(conf_dir)
    rows = []
    for shard_index in sorted(manifest.shards):
        shard = contract.read_shard(conf_dir, manifest, shard_index)
        for i, sample_index in enumerate(shard.sample_index.tolist()):
            if len(rows) >= num_samples:
                break
            record = prepared.dataset[sample_index]
            logprobs = shard.values(i).float()
            targets = [label for position, label in enumerate(record["labels"])
                       if position > 0 and label != IGNORE_INDEX]
            sample_weights = iter([])
            if weighted:
                is_eos = torch.isin(torch.tensor(targets, dtype=torch.long), eos_ids)
                sample_weights = iter(weights.confidence_weights(
                    train, logprobs, is_eos, torch.tensor([logprobs.numel()])).tolist())
            probs = iter(logprobs.exp().tolist())
            by_p, by_weight = [], []
            for position, (token, label) in enumerate(zip(record["input_ids"], record["labels"])):
                text = html.escape(tokenizer.decode([token])).replace("\n", "&#x21B5;<br>")
                if label == IGNORE_INDEX or position == 0:
                    by_p.append(f'<span class="prompt">{text}</span>')
                    by_weight.append(f'<span class="prompt">{text}</span>')
                    continue
                p = next(probs)
                if not weighted:
                    by_p.append(f'<span title="p={p:.3f}" style="background:{_shade(p)}">{text}</span>')
                    continue
                weight = next(sample_weights)
                tip = f"p={p:.3f} w={weight:.3f}"
                by_p.append(f'<span title="{tip}" style="background:{_shade(p)}">{text}</span>')
                by_weight.append(f'<span title="{tip}" style="background:{_shade(weight)}">{text}</span>')
            row = f"<h3>sample {sample_index}</h3><div class=\"row\"><b>p_instruct</b> {''.join(by_p)}</div>"
            if weighted:
                row += f"<div class=\"row\"><b>weight</b> {''.join(by_weight)}</div>"
            rows.append(row)
        if len(rows) >= num_samples:
            break
    if weighted:
        legend = (f"Two rows per sample: p, then the training weight. Green: the instruct model is confident (p "
                  f"near 1, full weight); red: it is not (low weight). {_weighting_note(train)}")
    else:
        legend = (f"Green: the instruct model is confident (p near 1); red: it is not. No weight row: with "
                  f"<code>train.weighting: {train.weighting}</code> {_NO_CONFIDENCE_WEIGHTS[train.weighting]}, "
                  f"so there are no instruct-confidence weights to show.")
    page = ("<!doctype html><meta charset=\"utf-8\"><title>GIFT confidence by token</title><style>"
            "body{font-family:sans-serif;max-width:70em;margin:auto}.row{font-family:monospace;line-height:1.7;"
            "margin:.3em 0}.prompt{color:#999}span{white-space:pre-wrap}</style>"
            f"<h1>Instruct-model confidence by token</h1><p>{legend} Grey: prompt tokens, not trained on.</p>"
            + "".join(rows))
    path = conf_dir / TOKEN_VIEW_NAME
    atomic_write_text(path, page)
    return path
