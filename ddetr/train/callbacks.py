"""Step callbacks: code that `fit` calls after every optimizer step, on every worker.

A callback is any object with `after_step(info: StepInfo)`. Pass them to `fit(cfg, runtime, callbacks=[...])`,
or to `build_trainer(cfg, callbacks=...)` for a Ray Train run (they are pickled to every worker). Two ship with
ddetr, for checking what a run does under faults (the fault-tolerance tests use them, and so can a drill on a
real cluster):

    ImageTrace("trace.jsonl")                  every rank appends one JSON line per optimizer step:
                                               {"pid", "rank", "world_size", "epoch", "step", "start_step",
                                                "image_ids"} (`start_step`: where this process started, 0 fresh)
    KillAfterStep(rank=1, step=5, marker=M)    rank 1 kills its own process (SIGKILL) right after step 5, once:
                                               the marker file M keeps the resumed attempt from dying again
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class StepInfo:
    """Where a run is, right after an optimizer step: `image_ids` are the images this worker trained in it."""

    rank: int
    world_size: int
    epoch: int
    step: int
    start_step: int
    image_ids: tuple[int, ...]


class StepCallback(Protocol):
    def after_step(self, info: StepInfo) -> None: ...


class ImageTrace:
    """Append one line per optimizer step and rank to `path` (a local file all workers can reach)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)

    def after_step(self, info: StepInfo) -> None:
        line = {
            "pid": os.getpid(),
            "rank": info.rank,
            "world_size": info.world_size,
            "epoch": info.epoch,
            "step": info.step,
            "start_step": info.start_step,
            "image_ids": list(info.image_ids),
        }
        # One write of one line with O_APPEND: ranks append to the same file without interleaving.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())
        finally:
            os.close(fd)


class KillAfterStep:
    """Kill rank `rank`'s process with SIGKILL right after optimizer step `step`, once per `marker` file."""

    def __init__(self, rank: int, step: int, marker: str | os.PathLike) -> None:
        self.rank, self.step, self.marker = rank, step, Path(marker)

    def after_step(self, info: StepInfo) -> None:
        if (info.rank, info.step) != (self.rank, self.step) or self.marker.exists():
            return
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(f"rank {info.rank} killed after step {info.step}\n")
        os.kill(os.getpid(), signal.SIGKILL)
