"""Where a run's numbers go: a JSON-lines file, TensorBoard event files, the console, and a curve PNG."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class Logbook:
    """Append-only metrics of one run, written by rank 0 only.

    Every record is one JSON line {"kind": "step" | "epoch", "time": seconds since the logbook opened,
    "unix_time", "step", **metrics}; the same scalars go to TensorBoard (tensorboardX, which Ray brings) under the
    run folder, so `tensorboard --logdir RUN` shows them.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._writer = None
        self._t0 = time.time()
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                from tensorboardX import SummaryWriter

                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # TensorBoard files are a convenience; the JSON lines are the record
                log.info("tensorboardX is not installed: metrics go to %s only", self.run_dir / METRICS_FILE)

    def write(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        now = time.time()
        record = {"kind": kind, "time": round(now - self._t0, 3), "unix_time": round(now, 3), "step": step}
        record.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))})
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._writer.add_scalar(f"{kind}/{k}", v, step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(run_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Draw the training loss per step and validation AP / AP50 per epoch of a run into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    steps = [r for r in records if r["kind"] == "step" and "loss" in r]
    epochs = [r for r in records if r["kind"] == "epoch"]
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.5, alpha=0.4, label="per step")
    window = 25  # a running mean shows the trend through the per-batch noise
    if len(steps) >= window:
        losses = [r["loss"] for r in steps]
        means = [sum(losses[i - window : i]) / window for i in range(window, len(losses) + 1)]
        ax_loss.plot([r["step"] for r in steps[window - 1 :]], means, lw=1.5, label=f"mean of {window}")
        ax_loss.legend()
    ax_loss.set(xlabel="optimizer step", ylabel="weighted loss", title="training loss", yscale="log")
    evaluated = [r for r in epochs if "val/AP" in r]
    for key, label in (("val/AP", "AP"), ("val/AP50", "AP50")):
        ax_ap.plot([r["epoch"] for r in evaluated], [r[key] for r in evaluated], marker="o", label=label)
    ax_ap.set(xlabel="epoch", ylabel="COCO bbox", title="validation", ylim=(0, 1))
    ax_ap.legend()
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out
