"""A preemption notice (a spot reclaim, a drain) during a run: checkpoint at once, then wait for the restart.

`fit` asks `PreemptionWatch.notice` after every optimizer step on every rank (the runtime's question is a barrier:
every rank gets the same answer). The first notice gets a just-in-time checkpoint; after it the workers train no
further (`await_restart`): Ray Train ends the attempt at the deadline and restarts it from that checkpoint, so a
step trained meanwhile would be trained again.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

log = logging.getLogger("ddetr.train")


class Announces(Protocol):
    def preemption_deadline(self) -> float | None:
        """The Unix time at which a node of the run is taken away once that is announced, else None."""


class PreemptionWatch:
    """The run's preemption state: whether a notice came, and the deadline still to wait for."""

    def __init__(self, runtime: Announces) -> None:
        self.runtime = runtime
        self.seen = False
        self.restart_due: float | None = None  # a notice's deadline, until its checkpoint is written and waited on

    def notice(self, step: int) -> bool:
        """Ask the runtime (every step, every rank); True the first time a preemption is announced: checkpoint now."""
        deadline = self.runtime.preemption_deadline()
        if deadline is None or self.seen:
            return False
        self.seen, self.restart_due = True, deadline
        log.warning("a node of this run is being preempted: checkpoint at step %d", step)
        return True

    def await_restart(self, step: int) -> None:
        """After the notice's checkpoint: wait for the restart, if a notice is pending (else return at once)."""
        if self.restart_due is not None:
            await_restart(self.restart_due, step)
        self.restart_due = None


def await_restart(deadline: float, step: int, margin_s: float = 60.0) -> None:
    """Train no further once a preemption's checkpoint is written: Ray Train ends this attempt at the deadline and
    restarts it from that checkpoint, so a step trained now would be trained again (its images twice).

    Returns, to train on, only if this attempt is still alive `margin_s` after the deadline (no restart came).
    """
    log.warning(
        "waiting for the restart at the preemption deadline (in %.0f s), from step %d", deadline - time.time(), step
    )
    while time.time() < deadline + margin_s:
        time.sleep(min(1.0, max(0.0, deadline + margin_s - time.time())))
    log.warning("no restart %.0f s after the preemption deadline: training on from step %d", margin_s, step)
