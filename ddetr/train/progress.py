"""What a person sees while a run trains: one progress bar per epoch on a terminal, a few plain lines elsewhere.

On rank 0 only. On a terminal (stderr is a TTY) a tqdm bar shows steps/s, the ETA and the running loss; in a
log file or a Ray worker (not a terminal) the same numbers come as one line every `every` steps.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("ddetr.train")


class EpochProgress:
    """Progress of one epoch: `update(loss)` after each optimizer step, `close()` at its end.

    Args:
        epoch: the epoch (0-based) and `epochs` the run's total, for the label.
        total: optimizer steps expected in the epoch (for the percentage and ETA); `done`: already trained.
        enabled: False on every rank but 0.
        every: steps between plain lines when the output is not a terminal.
    """

    def __init__(self, epoch: int, epochs: int, total: int, done: int, enabled: bool, every: int) -> None:
        self.label = f"epoch {epoch + 1}/{epochs}"
        self.total, self.done, self.every = total, done, max(1, every)
        self.enabled = enabled
        self.loss: float | None = None
        self._start, self._start_done = time.perf_counter(), done
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, desc=self.label, unit="step", dynamic_ncols=True, leave=True)

    def update(self, loss: float) -> None:
        self.done += 1
        # An exponential mean: the per-step loss of a detector jumps with every batch's boxes.
        self.loss = loss if self.loss is None else 0.9 * self.loss + 0.1 * loss
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss {self.loss:.3f}", refresh=False)
            self._bar.update(1)
        elif self.done % self.every == 0:
            log.info("%s", self.line())

    def line(self) -> str:
        elapsed = time.perf_counter() - self._start
        rate = (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0
        left = max(0, self.total - self.done)
        eta = time.strftime("%M:%S", time.gmtime(left / rate)) if rate > 0 else "?"
        percent = 100 * self.done / self.total if self.total else 0.0
        return (
            f"{self.label} step {self.done}/{self.total} ({percent:.0f}%), {rate:.2f} steps/s, ETA {eta}, "
            f"loss {self.loss:.3f}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
