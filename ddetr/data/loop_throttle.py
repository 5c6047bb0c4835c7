"""The Ray Data scheduling loop's throttle, in a module of its own: the dataset's context names this class and travels
with every decode task, so a decode worker imports this module; ``pipeline`` imports torch (through ``collate``), and
from there every decode worker loaded torch it never used (~300 MB and a second or more of start-up each).
"""

from __future__ import annotations

import time
from typing import Any

from ray.data._internal.execution.execution_callback import ExecutionCallback


class IdleLoopThrottle(ExecutionCallback):
    """Makes each turn of the scheduling loop last at least `min_turn_s`, sleeping out the rest.

    A turn with a task running waits on it (`ray.wait`, up to 0.1 s, without the GIL); one without returns at
    once, and the loop then spins on the GIL that the trainer needs for every op it launches (on a 2-CPU
    machine, a tiny model's steps took 3-4x longer while the decoded epoch sat buffered). The cap delays the
    loop's reaction to a consumed batch by at most `min_turn_s`; each turn still dispatches all it can.
    """

    min_turn_s = 0.025

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def on_execution_step(self, executor: Any) -> None:
        rest = self.min_turn_s - (time.perf_counter() - self._last)
        if rest > 0:
            time.sleep(rest)
        self._last = time.perf_counter()
