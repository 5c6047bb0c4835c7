"""Test probes of the training loop, off unless their environment variable is set.

Two questions about a run cannot be answered from its checkpoints alone: which images each optimizer step
trained, and what happens when a worker dies in the middle of an epoch. The fault-tolerance test sets:

    DDETR_TRACE_IMAGES=/path/trace.jsonl   every rank appends one line per optimizer step:
                                           {"pid", "rank", "world_size", "epoch", "step", "start_step",
                                            "image_ids"}
                                           (`start_step`: the step this process resumed from, 0 when fresh)
    DDETR_FAULT_AT_STEP=RANK:STEP          rank RANK kills its own process (SIGKILL) right after optimizer
                                           step STEP, once per run: a marker file in the run folder
                                           (`FAULT_MARKER`) keeps the resumed attempt from failing again

The Ray adapter forwards both from the driver's environment to its workers (`PROBE_VARS`).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

TRACE_VAR = "DDETR_TRACE_IMAGES"
FAULT_VAR = "DDETR_FAULT_AT_STEP"
PROBE_VARS = (TRACE_VAR, FAULT_VAR)
FAULT_MARKER = "fault-injected"


class StepProbe:
    """Watches the batches `fit` trains on and acts after each optimizer step (see the module docstring).

    Args:
        rank: this worker's rank.
        world_size: the number of workers of this attempt.
        run_dir: the run folder, where the fault marker goes (None: the fault probe is off).
        start_step: the global step this process starts from.
    """

    def __init__(self, rank: int, world_size: int, run_dir: Path | None, start_step: int) -> None:
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self.trace = os.environ.get(TRACE_VAR) or None
        fault = os.environ.get(FAULT_VAR)
        self.fault: tuple[int, int] | None = None
        if fault and run_dir is not None:
            fault_rank, _, fault_step = fault.partition(":")
            self.fault = (int(fault_rank), int(fault_step))
            self.marker = run_dir / FAULT_MARKER
        self._image_ids: list[int] = []

    @property
    def enabled(self) -> bool:
        return self.trace is not None or self.fault is not None

    def watch(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """`batches`, unchanged, remembering the image ids handed to the engine since the last step."""
        for batch in batches:
            self._image_ids.extend(int(t["image_id"]) for t in batch["targets"])
            yield batch

    def after_step(self, epoch: int, step: int) -> None:
        # The engine pulls the whole accumulation group before the step: every id seen so far belongs to it.
        ids, self._image_ids = self._image_ids, []
        if self.trace is not None:
            line = {
                "pid": os.getpid(),
                "rank": self.rank,
                "world_size": self.world_size,
                "epoch": epoch,
                "step": step,
                "start_step": self.start_step,
                "image_ids": ids,
            }
            # One write of one line with O_APPEND: ranks append to the same file without interleaving.
            fd = os.open(self.trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps(line) + "\n").encode())
            finally:
                os.close(fd)
        if self.fault == (self.rank, step) and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(f"rank {self.rank} killed after step {step}\n")
            os.kill(os.getpid(), signal.SIGKILL)
