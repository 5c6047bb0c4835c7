"""Where a run's numbers go: a JSON-lines file, TensorBoard event files, the console, and a curve PNG, in the run
folder (a local path or object storage).

A local run folder is written directly: `metrics.jsonl`, `tensorboard/events.out.tfevents.*`, `curves.png`.
A run folder in object storage is written through a local folder that a background thread mirrors into it
(`log_mirror.FolderMirror`), uploading only what is new; there the log is a sequence of parts
`metrics/part-00000.jsonl`, `metrics/part-00001.jsonl`, ... (each a run of whole lines, the newest one growing until
it holds `log_mirror.PART_BYTES`), and each event file `E` goes up as `E.part-00000`, ... (TensorBoard reads every
`*tfevents*` file of a folder, in name order). `read_metrics` reads either layout, and a bucket folder written by an
earlier version (one whole `metrics.jsonl`), whose parts then follow it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ddetr import io
from ddetr.train.log_mirror import PART_BYTES, SYNC_EVERY_S, FolderMirror, Stream, line_ends, tfrecord_ends

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
METRICS_PARTS = "metrics"  # the folder of the log's parts in object storage
_PART = re.compile(r"part-(\d+)\.jsonl")
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"
# How long the training thread waits for the bucket at an epoch record, `flush` and `close` before it goes on (the
# uploads go on behind it): a run never waits on a store that does not answer for longer than this.
WAIT_S = 30.0


def metrics_part(index: int) -> str:
    """The path of the log's part `index` in a run folder: `metrics/part-00000.jsonl`, ..."""
    return f"{METRICS_PARTS}/part-{index:05d}.jsonl"


def _event_file_parts(relative: str) -> Stream | None:
    """TensorBoard event files go up in parts; any other file of the run folder whole."""
    if "tfevents" not in relative.rsplit("/", 1)[-1]:
        return None
    return Stream(part_path=lambda i: f"{relative}.part-{i:05d}", record_ends=tfrecord_ends)


class Logbook:
    """Append-only metrics of one run, written by rank 0 only.

    Every record is one JSON line {"kind": "step" | "epoch", "time": seconds since the logbook opened,
    "unix_time", "step", **metrics}; the same scalars go to TensorBoard (tensorboardX, which Ray brings) under the
    run folder, so `tensorboard --logdir RUN` shows them; each epoch record redraws `curves.png` (`plot_curves`).

    A run folder in object storage (`s3://...`) is written through a local folder: the log there continues the
    one already in the bucket (a restarted run). Uploads run on a thread of their own (see the module's docstring):
    step records reach the bucket within about `sync_every_s`; an epoch record, `flush` and `close` wait for the
    bucket up to `wait_s`. A store that fails is logged and tried again with backoff; it never ends the run.

    Args:
        run_dir: the run folder, a local path or a URI.
        enabled: False on every rank but 0: nothing is written.
        part_bytes, sync_every_s, wait_s: see `log_mirror.PART_BYTES`, `log_mirror.SYNC_EVERY_S`, `WAIT_S`.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        enabled: bool = True,
        *,
        part_bytes: int = PART_BYTES,
        sync_every_s: float = SYNC_EVERY_S,
        wait_s: float = WAIT_S,
    ) -> None:
        self.run_dir = str(run_dir)
        self.enabled = enabled
        self.wait_s = wait_s
        self._writer = None
        self._mirror: FolderMirror | None = None
        self._t0 = time.time()
        self._remote = io.is_uri(self.run_dir)
        self.local_dir = Path(self.run_dir)
        if not enabled:
            return
        if self._remote:
            self.local_dir = Path(tempfile.mkdtemp(prefix="ddetr-logbook-"))
            log_stream = self._continue_remote_log()
            self._mirror = FolderMirror(
                self.local_dir,
                self.run_dir,
                classify=_event_file_parts,
                streams={METRICS_FILE: log_stream},
                part_bytes=part_bytes,
                every_s=sync_every_s,
            )
        self.local_dir.mkdir(parents=True, exist_ok=True)
        try:
            from tensorboardX import SummaryWriter

            # Event files are named by second and host; the suffix keeps a writer restarted within the same second
            # on the same host from replacing its predecessor's file in the bucket.
            suffix = f".{os.getpid()}.{uuid.uuid4().hex[:8]}"
            self._writer = SummaryWriter(str(self.local_dir / TENSORBOARD_DIR), filename_suffix=suffix)
        except ImportError:  # TensorBoard files are a convenience; the JSON lines are the record
            log.info("tensorboardX is not installed: metrics go to %s only", io.join(self.run_dir, METRICS_FILE))

    def _continue_remote_log(self) -> Stream:
        """Copy the bucket's log (a restarted run's) into the local `metrics.jsonl`, which then holds the whole log
        for the curves; the new records go up in parts after the bucket's last one."""

        def download() -> tuple[bytes, int]:
            texts = _log_texts(self.run_dir)
            parts = _part_indices(self.run_dir)
            # Whole lines only: an old single-file log cut short by a crash may end inside a record.
            data = b"".join(text[: text.rfind("\n") + 1].encode() for _, text in texts)
            return data, (parts[-1] + 1 if parts else 0)

        data, next_part = io.retried(f"reading the run log in {self.run_dir}", download)
        (self.local_dir / METRICS_FILE).write_bytes(data)
        return Stream(part_path=metrics_part, record_ends=line_ends, index=next_part, start=len(data))

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
        if self._mirror is not None and kind != "step":  # step records go up with the thread's next look
            number = self._mirror.request()
            if kind == "epoch":  # a checkpoint follows: a run resumed from it must find this record
                self._wait(number, f"the epoch record of step {step}")

    def flush(self) -> None:
        """Bring the run folder in object storage up to date now, waiting up to `wait_s` (before a checkpoint: a
        run resumed from it finds every record up to it)."""
        if self._mirror is not None:
            self._wait(self._mirror.request(), f"the log up to {time.strftime('%H:%M:%S')}")

    def _wait(self, number: int, what: str) -> None:
        if not self._mirror.wait(number, self.wait_s):
            log.warning(
                "%s did not reach %s within %g s; training goes on and the upload is tried again",
                what, self.run_dir, self.wait_s,
            )  # fmt: skip

    def close(self) -> None:
        """Close the TensorBoard writer and, for object storage, upload what is left (waiting up to `wait_s`)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._mirror is None:
            return
        mirror, self._mirror = self._mirror, None
        if mirror.close(self.wait_s):
            shutil.rmtree(self.local_dir, ignore_errors=True)
        else:
            log.warning(
                "the last records of the run log did not reach %s within %g s: the whole log stays in %s",
                self.run_dir, self.wait_s, self.local_dir / METRICS_FILE,
            )  # fmt: skip


def _part_indices(run_dir: str) -> list[int]:
    """The numbers of the log's parts in a run folder, in order."""
    names = io.listdir(io.join(run_dir, METRICS_PARTS))
    return sorted(int(m.group(1)) for m in map(_PART.fullmatch, names) if m)


def _log_texts(run_dir: str) -> list[tuple[str, str]]:
    """(path, text) of each file of a run folder's log, in order: `metrics.jsonl` (a local run, or an object storage
    run written by an earlier version), then the parts."""
    paths = [io.join(run_dir, METRICS_FILE)] if io.exists(io.join(run_dir, METRICS_FILE)) else []
    paths += [io.join(run_dir, metrics_part(i)) for i in _part_indices(run_dir)]
    if len(paths) > 1 and io.is_uri(run_dir):  # one request each: read a long run's parts side by side
        with ThreadPoolExecutor(max_workers=16) as pool:
            return list(zip(paths, pool.map(io.read_text, paths), strict=True))
    return [(path, io.read_text(path)) for path in paths]


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run folder's log (a local path or a URI; one `metrics.jsonl`, its parts, or both), oldest
    first; [] without one.

    A last line without its newline (a writer that died while appending) is left out with a warning.

    Raises:
        ValueError: a line that is not a JSON record, naming the file and the line.
    """
    texts = _log_texts(str(run_dir))
    records: list[dict[str, Any]] = []
    for n, (path, text) in enumerate(texts):
        lines = text.split("\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                if number == len(lines) and n == len(texts) - 1:
                    log.warning("%s: left out its last line, cut short (%d characters)", path, len(line))
                    continue
                raise ValueError(f"{path}, line {number}: not a JSON record ({err.msg}); delete the line") from None
    return records


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
