"""What a run folder holds from its first second: `config.yaml` and `log.txt`.

`config.yaml` is the run's resolved config, every key (the text `ddetr config` prints; `ddetr train --config
RUN/config.yaml` reads it back). `log.txt` gathers the console's log lines of every start of the run (the driver's
and, on the Ray engine, rank 0's), each start under a line that says so, and the traceback of a run that failed (the
console shows it in one line).

    with run_files(cfg, engine="ray") as folder:   # in `train()`, after its checks, before Ray starts
        ...

The lines are those that pass the console's levels, from two processes: the driver's `logging` records (a handler
beside the console's on the root logger), and, on the Ray engine, rank 0's (its progress lines, epoch summaries and
validation results: `rank_zero_log`, a handler on the worker's root logger, whose levels are the worker console's).
The Ray workers' lines reach the driver's console through Ray's log forwarding, which the driver's logging does not
see, and which is off in sweeps: so rank 0 writes them itself, wherever it runs (a run folder on several nodes is a
shared file system or a bucket, as for the checkpoints). A local log.txt grows line by line, every writer appending
whole lines. Object storage has no append: each writer keeps its lines in a local file and appends what is new to
log.txt by reading it and writing it back whole (the driver when the run starts and when it ends or fails, rank 0
every UPLOAD_EVERY_S and when it ends), so writers take turns: the driver's lines logged while the workers trained
come after the workers' in a bucket. A driver or rank 0 killed outright leaves what it had uploaded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from ddetr import io
from ddetr.config import Config
from ddetr.config_text import config_yaml
from ddetr.train.checkpoints import run_dir

CONFIG_YAML = "config.yaml"
LOG_TXT = "log.txt"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# How often rank 0 appends its new lines to a log.txt in object storage (each time: the whole object read and
# written back, so a run's traffic grows with the square of its log; a few MB after 100k steps, every 30 s, is
# cheap next to its checkpoints).
UPLOAD_EVERY_S = 30.0

log = logging.getLogger(__name__)


class RunLog:
    """A logging handler appending to `path` (a local file or a URI), with notes that bypass the loggers' levels.

    Args:
        path: log.txt of the run folder.
        upload_every_s: object storage only: also append the new lines every this many seconds, from a thread of
            its own (None: only when `upload` or `close` is called).
    """

    def __init__(self, path: str, upload_every_s: float | None = None) -> None:
        self.path = path
        self.remote = io.is_uri(path)
        self._sent = 0  # object storage: bytes of the local file already appended to the object
        self._lock = threading.Lock()  # one upload at a time (the thread's and close's)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.remote:
            fd, self.local = tempfile.mkstemp(prefix="ddetr-log-", suffix=".txt")
            os.close(fd)
        else:
            self.local = path
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.local, mode="a", encoding="utf-8")
        self.handler.setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%d %H:%M:%S"))
        if self.remote and upload_every_s:
            self._thread = threading.Thread(target=self._upload_often, args=(upload_every_s,), daemon=True,
                                            name="ddetr-run-log")  # fmt: skip
            self._thread.start()

    def note(self, level: int, message: str, exc_info: bool = False) -> None:
        """One line in log.txt only (not on the console), whatever the loggers' levels."""
        record = logging.LogRecord(__name__, level, __file__, 0, message, None, sys.exc_info() if exc_info else None)
        self.handler.handle(record)

    def upload(self) -> None:
        """Object storage: append the lines logged since the last upload to log.txt (nothing to do for a local
        file, which grows line by line)."""
        if not self.remote:
            return
        with self._lock:
            self.handler.flush()
            with open(self.local, "rb") as f:
                f.seek(self._sent)
                new = f.read()
            if not new:
                return
            try:
                # Read back, not remembered: the other writer (the driver, rank 0, an earlier attempt) appended too.
                before = io.read_text(self.path) if io.exists(self.path) else ""
                io.atomic_write(self.path, before + new.decode("utf-8", errors="replace"))
            except OSError as err:  # the run's own outcome matters more than its log's copy; tried again later
                log.warning("could not upload the run's log to %s: %s", self.path, err)
                return
            self._sent += len(new)

    def _upload_often(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.upload()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self.handler.close()
        self.upload()
        if self.remote:
            Path(self.local).unlink(missing_ok=True)


@contextlib.contextmanager
def rank_zero_log(folder: str) -> Iterator[RunLog]:
    """On rank 0 of a Ray training: what the worker's console shows (its root logger's handlers) also goes to
    `folder`/log.txt until the block ends. Call it after the worker's logging is set up (`quiet_worker_logs`
    replaces the root's handlers)."""
    run_log = RunLog(io.join(folder, LOG_TXT), upload_every_s=UPLOAD_EVERY_S)
    root = logging.getLogger()
    root.addHandler(run_log.handler)
    try:
        yield run_log
    finally:
        root.removeHandler(run_log.handler)
        run_log.close()


@contextlib.contextmanager
def run_files(cfg: Config, engine: str) -> Iterator[str]:
    """Write `config.yaml` into the run folder of `cfg` (`train.storage_path/train.name`) and copy the driver's log
    lines into its `log.txt` until the block ends; a failure's traceback is added to log.txt. Yields the folder."""
    folder = run_dir(cfg.train.storage_path, cfg.train.name)
    io.atomic_write(io.join(folder, CONFIG_YAML), config_yaml(cfg))
    run_log = RunLog(io.join(folder, LOG_TXT))
    run_log.note(logging.INFO, f"run {cfg.train.name} starts ({engine} engine); its config is {CONFIG_YAML} here")
    run_log.upload()
    root = logging.getLogger()
    root.addHandler(run_log.handler)
    try:
        yield folder
    except BaseException as err:
        run_log.note(logging.ERROR, f"the run failed: {type(err).__name__}: {err}", exc_info=True)
        raise
    finally:
        root.removeHandler(run_log.handler)
        run_log.close()
