"""What a training run shows and leaves behind: a progress bar, per-step JSONL, TensorBoard, a loss-curve PNG.

Only rank 0 writes; the other ranks get a logger that does nothing, so the recipe never branches on rank.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Optional

import yaml

from gift_dist.config import ConfigError, RunConfig, TrainConfig, config_to_dict
from gift_dist.contracts import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

METRICS_NAME = "train_metrics.jsonl"
CURVE_NAME = "train_loss.png"
TENSORBOARD_DIR = "tensorboard"


class MetricsLogger:
    """Per-step metrics of rank 0. On resume, rows after the resumed step are dropped so the file is one curve."""

    def __init__(self, logs_dir: str | Path, total_steps: int, start_step: int, enabled: bool,
                 progress: bool = True, log_every: int = 1, trackers: Optional[list] = None):
        self.enabled = enabled
        self._trackers = list(trackers or []) if enabled else []
        self.log_every = max(1, log_every)
        self.path = Path(logs_dir) / METRICS_NAME
        self.curve_path = Path(logs_dir) / CURVE_NAME
        self._bar = None
        self._started = time.monotonic()
        self._start_step = start_step
        self._total = total_steps
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        rows = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_text(self.path, "".join(row + "\n" for row in rows))

    def log(self, step: int, values: dict) -> None:
        """Record ``values`` for ``step`` (1-based: the number of optimizer steps done)."""
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **values}
        if step % self.log_every == 0 or step == self._total:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
            numeric = {f"train/{key}": value for key, value in values.items()
                       if isinstance(value, (int, float)) and not isinstance(value, bool)}
            for tracker in self._trackers:
                tracker.log(step, numeric)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}",
                                  tok_s=f"{values.get('tokens_per_second', 0.0):.0f}")
        elif step % self.log_every == 0:
            log.info("step %d/%d loss %.4f lr %.3g tokens/s %.0f", step, self._total, values.get("loss", float("nan")),
                     values.get("lr", 0.0), values.get("tokens_per_second", 0.0))

    def close(self, summary: Optional[dict] = None) -> Optional[Path]:
        """Close the bar and the trackers (handing them ``summary``, e.g. the scorer's confidence totals) and draw
        the loss curve of the whole run (resumed parts included)."""
        if not self.enabled:
            return None
        if self._bar is not None:
            self._bar.close()
        for tracker in self._trackers:
            if summary:
                tracker.summary(summary)
            tracker.close()
        return plot_loss_curve(self.path, self.curve_path)


def check_trackers(train: TrainConfig) -> None:
    """A tracker named in ``train.report_to`` that is not installed is refused before any work (TensorBoard, the
    default, is skipped with a warning instead: it is optional)."""
    if "wandb" in train.report_to and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.report_to names wandb but it is not installed; pip install wandb, or remove it "
                          "from train.report_to")


def open_trackers(cfg: RunConfig) -> list:
    """The experiment trackers of ``train.report_to``, each given the run config (call on rank 0 only)."""
    trackers = []
    for name in cfg.train.report_to:
        if name == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("train.report_to names tensorboard but it is not installed (pip install tensorboard): "
                            "metrics go to %s only", METRICS_NAME)
                continue
            trackers.append(TensorBoardTracker(SummaryWriter(str(cfg.paths.logs / TENSORBOARD_DIR)), cfg))
        elif name == "wandb":
            trackers.append(WandbTracker(cfg))
    return trackers


class TensorBoardTracker:
    """Scalars under train/, the run config and the confidence summary as text."""

    def __init__(self, writer, cfg: RunConfig):
        self.writer = writer
        writer.add_text("run_config", "```yaml\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False) + "```")

    def log(self, step: int, values: dict) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def summary(self, values: dict) -> None:
        self.writer.add_text("summary", "```json\n" + json.dumps(values, indent=2) + "\n```")

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One W&B run per output_dir (its id derives from the folder, so a resumed training continues it), with the
    run config, the method (weighting, trained model) as tags, per-step metrics and the summary."""

    def __init__(self, cfg: RunConfig):
        import wandb

        out = Path(cfg.output_dir).resolve()
        self.run = wandb.init(
            project=cfg.train.wandb_project, name=out.name, dir=str(cfg.paths.logs), resume="allow",
            id=hashlib.sha256(str(out).encode()).hexdigest()[:16], config=config_to_dict(cfg),
            tags=[cfg.train.weighting, f"train_model:{cfg.train.train_model}"],
        )

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def close(self) -> None:
        self.run.finish()


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: Path, out_path: Path) -> Optional[Path]:
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="weighted loss")
    if all("ce" in r for r in rows):
        ax.plot(steps, [r["ce"] for r in rows], label="unweighted CE", alpha=0.7)
    held_out = [r for r in rows if "eval_ce" in r]
    if held_out:
        ax.plot([r["step"] for r in held_out], [r["eval_ce"] for r in held_out], "o-", label="held-out CE")
        ax.plot([r["step"] for r in held_out], [r["eval_weighted_ce"] for r in held_out], "s--",
                label="held-out weighted CE")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(out_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return out_path
