"""Callbacks on the Ray Data scheduling loop, in a module of their own: the dataset's context names these classes and
travels with every decode task, so a decode worker imports this module; ``pipeline`` imports torch (through
``collate``), and from there every decode worker loaded torch it never used (~300 MB and a second or more of start-up
each).
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


class EarlyLimits(ExecutionCallback):
    """Has the executor read its resource limits again on the next turn for as long as they are still zero.

    Why: a new execution asks Ray Data's autoscaling coordinator for the resources reserved to it; the first answer
    is an empty cache while the request is on its way (a few ms), and the resource manager keeps what it read for
    1 s (`ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S`). For that second every epoch's dataset had no CPU in its
    budget and ran one decode task, the one allowed when none runs: on 2 CPUs the first second of every epoch
    decoded at half speed (3.5 s at the first epoch, while the coordinator actor starts). Reading again while the
    limits are zero brings the budget within a turn or two of the answer. Where Ray's internals differ (other
    versions), this does nothing.
    """

    def on_execution_step(self, executor: Any) -> None:
        manager = getattr(executor, "_resource_manager", None)
        limits = getattr(manager, "_global_limits", None)
        if limits is not None and not limits.cpu and hasattr(manager, "_global_limits_last_update_time"):
            manager._global_limits_last_update_time = 0
