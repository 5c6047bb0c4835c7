"""Where a run's numbers go: a JSON-lines file, TensorBoard event files, the console, and a curve PNG, in the run
folder (a local path or object storage)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from ddetr import io

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"
# On object storage, step records reach the bucket at most this often (epoch records and `close` at once): a lost
# node loses at most these last seconds of its step log, and a long run does not rewrite the log every step.
SYNC_EVERY_S = 5.0


class Logbook:
    """Append-only metrics of one run, written by rank 0 only.

    Every record is one JSON line {"kind": "step" | "epoch", "time": seconds since the logbook opened,
    "unix_time", "step", **metrics}; the same scalars go to TensorBoard (tensorboardX, which Ray brings) under the
    run folder, so `tensorboard --logdir RUN` shows them; each epoch record redraws `curves.png` (`plot_curves`).

    A run folder in object storage (`s3://...`) is written through a local folder: the log there continues the
    one already in the bucket (a restarted run), and every file is uploaded whole as it changes (`SYNC_EVERY_S`).
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True) -> None:
        self.run_dir = str(run_dir)
        self.enabled = enabled
        self._writer = None
        self._t0 = time.time()
        self._remote = io.is_uri(self.run_dir)
        self._synced = 0.0
        self.local_dir = Path(self.run_dir)
        if not enabled:
            return
        if self._remote:
            self.local_dir = Path(tempfile.mkdtemp(prefix="ddetr-logbook-"))
            remote_log = io.join(self.run_dir, METRICS_FILE)
            if io.exists(remote_log):  # a restarted run goes on with the log it had
                io.copy(remote_log, self.local_dir / METRICS_FILE)
        self.local_dir.mkdir(parents=True, exist_ok=True)
        try:
            from tensorboardX import SummaryWriter

            # Event files are named by second and host; the suffix keeps a writer restarted within the same second
            # on the same host from replacing its predecessor's file in the bucket.
            suffix = f".{os.getpid()}.{uuid.uuid4().hex[:8]}"
            self._writer = SummaryWriter(str(self.local_dir / TENSORBOARD_DIR), filename_suffix=suffix)
        except ImportError:  # TensorBoard files are a convenience; the JSON lines are the record
            log.info("tensorboardX is not installed: metrics go to %s only", io.join(self.run_dir, METRICS_FILE))

    def write(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        now = time.time()
        record = {"kind": kind, "time": round(now - self._t0, 3), "unix_time": round(now, 3), "step": step}
        record.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))})
        with open(self.local_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._writer.add_scalar(f"{kind}/{k}", v, step)
            self._writer.flush()
        if kind == "epoch":
            plot_curves(self.local_dir, self.local_dir / CURVES_FILE)
        self._sync(force=kind != "step")

    def flush(self) -> None:
        """Bring the run folder in object storage up to date now (before a checkpoint: a run resumed from it finds
        every record up to it)."""
        if self.enabled:
            self._sync(force=True)

    def _sync(self, force: bool) -> None:
        """Upload the changed files of the local folder to the run folder in object storage."""
        if not self._remote or (not force and time.time() - self._synced < SYNC_EVERY_S):
            return
        for path in sorted(p for p in self.local_dir.rglob("*") if p.is_file()):
            io.atomic_write(io.join(self.run_dir, *path.relative_to(self.local_dir).parts), path.read_bytes())
        self._synced = time.time()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self.enabled:
            self._sync(force=True)
        if self._remote and self.enabled:
            shutil.rmtree(self.local_dir, ignore_errors=True)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run folder's log (a local path or a URI), oldest first; [] without one."""
    path = io.join(str(run_dir), METRICS_FILE)
    if not io.exists(path):
        return []
    return [json.loads(line) for line in io.read_text(path).splitlines() if line.strip()]


def plot_curves(run_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Draw the training loss per step and validation AP / AP50 per epoch of a run into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

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
    for key, label in (("val/AP", "AP"), ("val/AP50", "AP50")):
        evaluated = [r for r in epochs if key in r]
        ax_ap.plot([r["epoch"] for r in evaluated], [r[key] for r in evaluated], marker="o", label=label)
    ax_ap.set(xlabel="epoch", ylabel="COCO bbox", title="validation", ylim=(0, 1))
    ax_ap.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax_ap.legend()
    fig.tight_layout()
    io.save_figure(fig, out)
    plt.close(fig)
    return Path(out)
