"""The console of a training: a per-step line that informs (loss, lr, steps/s, data wait, peak memory, the run's
ETA), and none of Ray's lines that alarm without cause at the default verbosity (`ddetr/train/console.py`)."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ddetr.train import progress
from ddetr.train.console import HARMLESS_RAY_LINES, _DropHarmless
from ddetr.train.progress import EpochProgress, duration

# As Ray 2.60's TrainController printed it at the start of every run (core_worker.cc's RAY_LOG_ONCE_PER_PROCESS).
PREEMPTION_WATCHER_LINE = (
    "[2026-12-06 12:33:04,149 E 18007 18104] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
    "'89b9f286d24fdeeee64859ee01000000' has constructor arguments in the object store and max_restarts > 0. If the "
    "arguments in the object store go out of scope or are lost, the actor restart will fail. See "
    "https://github.com/ray-project/ray/issues/53727 for more details."
)
STARVATION = "may hang forever unless the cluster scales up"
BACKBONE_WARNING = "starts from random weights"


class Clock:
    """perf_counter for EpochProgress: `tick(s)` moves it on."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


def test_the_step_line_tells_loss_lr_rate_data_wait_memory_and_the_runs_eta(caplog, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal: plain lines
    with caplog.at_level(logging.INFO, logger="ddetr.train"):
        bar = EpochProgress(epoch=0, epochs=3, total=10, done=0, enabled=True, every=4)
        for _ in range(4):
            clock.tick(0.5)  # 2 steps/s, a fifth of each step waiting for data
            bar.update(2.0, lr=2e-4, data_wait_s=0.1, step_s=0.5)
        bar.update(1.0)  # the call of a loop that passes the loss alone still works
    (line,) = [r.getMessage() for r in caplog.records]
    head, fields = line.split(", ", 1)
    assert head == "epoch 1/3 step 4/10 (40%)"
    # 6 steps left in this epoch and 2 epochs of 10 after it, at 2 steps/s: 26 steps, 13 s; the epoch's 6, 3 s.
    expected = r"loss 2\.000, lr 2\.0e-04, 2\.00 steps/s, data wait 20%, peak mem \d+\.\d GiB \(RSS\), "
    assert re.fullmatch(expected + r"ETA 00:13 \(epoch 00:03\)", fields), fields
    assert duration(59) == "00:59" and duration(3 * 3600 + 61) == "3:01:01" and duration(2 * 86400 + 5) == "2d 00:00:05"


def test_a_terminal_bar_carries_the_same_fields(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    bar = EpochProgress(epoch=0, epochs=2, total=4, done=0, enabled=True, every=1)
    for _ in range(4):
        bar.update(3.0, lr=1e-3, data_wait_s=0.25, step_s=0.5)
    bar.close()
    drawn = terminal.getvalue()
    for field in ("epoch 1/2", "4/4", "loss 3.000", "lr 1.0e-03", "data wait 50%", "peak mem", "run ETA"):
        assert field in drawn, (field, drawn)


def test_the_driver_drops_the_preemption_watcher_line_and_nothing_else():
    printed: list[dict] = []
    printer = _DropHarmless(printed.append)
    ordinary = "epoch 1/1 step 10/10 (100%), loss 13.617"
    printer({"pid": 1, "is_err": True, "lines": [PREEMPTION_WATCHER_LINE, ordinary]})
    printer({"pid": 1, "is_err": True, "lines": [PREEMPTION_WATCHER_LINE]})  # nothing left: nothing printed
    printer({"pid": 2, "is_err": False, "lines": [ordinary]})
    assert [batch["lines"] for batch in printed] == [[ordinary], [ordinary]]
    assert printed[0]["pid"] == 1 and printed[1]["pid"] == 2
    other_actor = PREEMPTION_WATCHER_LINE.replace("PreemptionWatcher", "MapWorker(MapBatches(decode))")
    assert not any(p.search(other_actor) for p in HARMLESS_RAY_LINES)  # the same warning of another actor stays


def test_ray_datas_starvation_notice_is_hidden_from_its_console_only():
    import ray.data  # noqa: F401 - configures the "ray.data" loggers: a console handler and a log file's
    from ray.data._internal.logging import HiddenRecordFilter

    from ddetr.data.pipeline import STARVATION_LOGGER, hide_starvation_notice

    data_logger = logging.getLogger("ray.data")
    consoles = [h for h in data_logger.handlers if any(isinstance(f, HiddenRecordFilter) for f in h.filters)]
    assert consoles, data_logger.handlers
    kept: list[logging.LogRecord] = []
    file_like = logging.Handler()
    file_like.emit = kept.append  # beside Ray Data's log file handler: what reaches "ray.data"'s handlers
    data_logger.addHandler(file_like)
    try:
        hide_starvation_notice()
        hide_starvation_notice()  # idempotent
        logger = logging.getLogger(STARVATION_LOGGER)
        logger.warning(f"Cluster resources are not enough to run any task from Op[x]. The job {STARVATION}.")
        logger.warning("Some other resource warning")
    finally:
        data_logger.removeHandler(file_like)
    assert [STARVATION in r.getMessage() for r in kept] == [True, False]  # both reach the log file...
    for console in consoles:  # ...Ray Data's console handler lets the other one pass
        assert [bool(console.filter(r)) for r in kept] == [False, True]
    assert len(logging.getLogger(STARVATION_LOGGER).filters) == 1


@pytest.mark.ray
@pytest.mark.slow
def test_a_two_worker_ray_training_console_informs_and_does_not_alarm(tmp_path, hard_timeout):
    """`ddetr train` on 2 Ray workers in a fresh process: its console has the per-step fields, and none of the
    lines that alarm without cause, which Ray did make (found in the session's log files)."""
    from ddetr.data.synthetic import make_synthetic_coco

    make_synthetic_coco(str(tmp_path / "data"), 40, 8, seed=0, image_size=(64, 96))
    ray_tmp = Path(os.path.realpath(os.environ.get("TMPDIR", "/tmp"))) / f"rc{os.getpid()}"  # socket paths: short
    cmd = [sys.executable, "-m", "ddetr.cli", "train", "--preset", "tiny", "--data", str(tmp_path / "data"),
           "train.epochs=1", "train.max_steps_per_epoch=10", "train.log_every=5", "train.num_workers=2",
           "data.scale=0.2", f"train.storage_path={tmp_path / 'runs'}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("DDETR_VERBOSE", "RAY_ADDRESS")}
    # Ray Data's notice after 0 s of starvation instead of 60: made in every epoch of this short run.
    env.update(RAY_ADDRESS="", RAY_TMPDIR=str(ray_tmp), RAY_DATA_STARVATION_WARNING_DELAY_S="0")
    try:
        with hard_timeout(600):
            done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=590)
        console = done.stdout + done.stderr
        assert done.returncode == 0, console[-3000:]
        logs = "\n".join(p.read_text(errors="replace") for p in ray_tmp.glob("ray/session_*/logs/**/*") if p.is_file())
    finally:
        subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)
    steps = [line for line in console.splitlines() if re.search(r"epoch 1/1 step \d+/10 \(\d+%\)", line)]
    assert len(steps) == 2, console[-3000:]
    for field in ("loss ", "lr ", "steps/s", "data wait ", "peak mem ", "GiB (RSS)", "ETA "):
        assert all(field in line for line in steps), (field, steps)
    assert STARVATION in logs and "'PreemptionWatcher'" in logs  # Ray made both notices...
    assert STARVATION not in console and "PreemptionWatcher" not in console  # ...and the console has neither
    assert console.count(BACKBONE_WARNING) == 1, console[-3000:]  # rank 0 only
