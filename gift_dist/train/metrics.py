"""What a training run shows and leaves behind: a progress bar, per-step JSONL, TensorBoard, a loss-curve PNG.

Only rank 0 writes; the other ranks get a logger that does nothing, so the recipe never branches on rank.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

from gift_dist.contracts import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

METRICS_NAME = "train_metrics.jsonl"
CURVE_NAME = "train_loss.png"
TENSORBOARD_DIR = "tensorboard"


class MetricsLogger:
    """Per-step metrics of rank 0. On resume, rows after the resumed step are dropped so the file is one curve."""

    def __init__(self, logs_dir: str | Path, total_steps: int, start_step: int, enabled: bool,
                 progress: bool = True, log_every: int = 1):
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.path = Path(logs_dir) / METRICS_NAME
        self.curve_path = Path(logs_dir) / CURVE_NAME
        self._bar = None
        self._writer = None
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
        self._writer = _tensorboard_writer(Path(logs_dir) / TENSORBOARD_DIR)

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
            if self._writer is not None:
                for key, value in values.items():
                    if isinstance(value, (int, float)) and value is not None:
                        self._writer.add_scalar(f"train/{key}", value, step)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}",
                                  tok_s=f"{values.get('tokens_per_second', 0.0):.0f}")
        elif step % self.log_every == 0:
            log.info("step %d/%d loss %.4f lr %.3g tokens/s %.0f", step, self._total, values.get("loss", float("nan")),
                     values.get("lr", 0.0), values.get("tokens_per_second", 0.0))

    def close(self) -> Optional[Path]:
        """Close the bar and writer and draw the loss curve of the whole run (resumed parts included)."""
        if not self.enabled:
            return None
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        return plot_loss_curve(self.path, self.curve_path)


def _tensorboard_writer(folder: Path):
    """TensorBoard is optional: used when installed, silently skipped otherwise."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


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
