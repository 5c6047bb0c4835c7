"""What a run folder holds from its first second: `config.yaml` and `log.txt`.

`config.yaml` is the run's resolved config, every key (the text `ddetr config` prints; `ddetr train --config
RUN/config.yaml` reads it back). `log.txt` gathers the driver's console log lines of every start of the run, each
start under a line that says so, and the traceback of a run that failed (the console shows it in one line).

    with run_files(cfg, engine="ray") as folder:   # in `train()`, after its checks, before Ray starts
        ...

The lines are the driver process's `logging` records that pass the console's levels (a handler beside the
console's on the root logger). A Ray worker's own lines reach the console through Ray's log forwarding, not through
the driver's logging, so they are not in log.txt (Ray keeps them in its session logs). A local log.txt grows line by
line. Object storage has no append: the lines go to a local file, and log.txt is uploaded when the run starts (with
the starting line) and again, whole, when it ends or fails; a driver killed outright leaves what the start uploaded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ddetr import io
from ddetr.config import Config
from ddetr.config_text import config_yaml
from ddetr.train.checkpoints import run_dir

CONFIG_YAML = "config.yaml"
LOG_TXT = "log.txt"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger(__name__)


class RunLog:
    """A logging handler writing to `path` (a local file or a URI), with notes that bypass the loggers' levels."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.remote = io.is_uri(path)
        if self.remote:  # earlier starts of the run are kept: the object is rewritten with them first
            self.before = io.read_text(path) if io.exists(path) else ""
            fd, self.local = tempfile.mkstemp(prefix="ddetr-log-", suffix=".txt")
            os.close(fd)
        else:
            self.local = path
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.local, mode="a", encoding="utf-8")
        self.handler.setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%d %H:%M:%S"))

    def note(self, level: int, message: str, exc_info: bool = False) -> None:
        """One line in log.txt only (not on the console), whatever the loggers' levels."""
        record = logging.LogRecord(__name__, level, __file__, 0, message, None, sys.exc_info() if exc_info else None)
        self.handler.handle(record)

    def upload(self) -> None:
        """Object storage: log.txt rewritten with every line so far (nothing to do for a local file)."""
        if not self.remote:
            return
        self.handler.flush()
        try:
            io.atomic_write(self.path, self.before + Path(self.local).read_text(encoding="utf-8"))
        except OSError as err:  # the run's own outcome matters more than its log's copy
            log.warning("could not upload the run's log to %s: %s", self.path, err)

    def close(self) -> None:
        self.handler.close()
        self.upload()
        if self.remote:
            Path(self.local).unlink(missing_ok=True)


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
