"""What a person sees while a run trains: one progress bar per epoch on a terminal, a few plain lines elsewhere.

On rank 0 only. On a terminal (stderr is a TTY) a tqdm bar shows steps/s and the epoch's ETA, with the loss, lr,
data wait, peak memory and the whole run's ETA beside it; in a log file or a Ray worker (not a terminal) the same
numbers come as one line every `every` steps:

    epoch 2/12 step 40/200 (20%), loss 13.617, lr 2.0e-04, 0.52 steps/s, data wait 12%, peak mem 1.3 GiB (RSS),
    ETA 1:05:10 (epoch 05:08)

"data wait" is the share of the time since the last line (on a bar: since the epoch began) spent waiting for
batches (a high share: the input pipeline, not the model, sets the pace); "peak mem" is CUDA's peak allocated
memory when the process uses CUDA, else the process's peak resident set; the ETA is that of the run's remaining
training steps (this epoch's and those of the epochs after it) at this epoch's rate, validation not included.
"""

from __future__ import annotations

import logging
import resource
import sys
import time

import torch

log = logging.getLogger("ddetr.train")


class EpochProgress:
    """Progress of one epoch: `update(loss, ...)` after each optimizer step, `close()` at its end.

    Args:
        epoch: the epoch (0-based) and `epochs` the run's total, for the label and the run's ETA.
        total: optimizer steps expected in the epoch (for the percentage and ETA); `done`: already trained.
        enabled: False on every rank but 0.
        every: steps between plain lines when the output is not a terminal.
    """

    def __init__(self, epoch: int, epochs: int, total: int, done: int, enabled: bool, every: int) -> None:
        self.label = f"epoch {epoch + 1}/{epochs}"
        self.epochs_after = max(0, epochs - epoch - 1)
        self.total, self.done, self.every = total, done, max(1, every)
        self.enabled = enabled
        self.loss: float | None = None
        self.lr: float | None = None
        self._start, self._start_done = time.perf_counter(), done
        self._wait_s = self._step_s = 0.0  # since the last line: time waiting for data, and in steps with it
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, desc=self.label, unit="step", dynamic_ncols=True, leave=True)

    def update(
        self, loss: float, *, lr: float | None = None, data_wait_s: float | None = None, step_s: float | None = None
    ) -> None:
        """Count one optimizer step: its loss, and when known the learning rate, the seconds it waited for its
        batches (`data_wait_s`) and the seconds it took with that wait (`step_s`)."""
        self.done += 1
        # An exponential mean: the per-step loss of a detector jumps with every batch's boxes.
        self.loss = loss if self.loss is None else 0.9 * self.loss + 0.1 * loss
        self.lr = lr if lr is not None else self.lr
        if data_wait_s is not None and step_s is not None:
            self._wait_s += data_wait_s
            self._step_s += step_s
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(self.details(), refresh=False)
            self._bar.update(1)
        elif self.done % self.every == 0:
            log.info("%s", self.line())
            self._wait_s = self._step_s = 0.0

    def rate(self) -> float:
        """Steps per second in this epoch so far (0 before the first step)."""
        elapsed = time.perf_counter() - self._start
        return (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0

    def details(self) -> str:
        """What the bar shows beside its own steps/s and epoch ETA: loss, lr, data wait, peak memory, run ETA."""
        return ", ".join(self._fields(bar=True))

    def line(self) -> str:
        """The plain line: epoch, step, percentage, loss, lr, steps/s, data wait, peak memory, run and epoch ETA."""
        percent = 100 * self.done / self.total if self.total else 0.0
        return ", ".join([f"{self.label} step {self.done}/{self.total} ({percent:.0f}%)", *self._fields(bar=False)])

    def _fields(self, bar: bool) -> list[str]:
        rate = self.rate()
        fields = [f"loss {self.loss:.3f}" if self.loss is not None else "loss ?"]
        if self.lr is not None:
            fields.append(f"lr {self.lr:.1e}")
        if not bar:
            fields.append(f"{rate:.2f} steps/s")
        if self._step_s > 0:
            fields.append(f"data wait {100 * min(1.0, self._wait_s / self._step_s):.0f}%")
        fields.append(f"peak mem {peak_memory()}")
        epoch_left = max(0, self.total - self.done)
        run_left = epoch_left + self.epochs_after * self.total
        if rate <= 0:
            fields.append("ETA ?")
        elif bar:
            fields.append(f"run ETA {duration(run_left / rate)}")
        else:
            fields.append(f"ETA {duration(run_left / rate)} (epoch {duration(epoch_left / rate)})")
        return fields

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def peak_memory() -> str:
    """The peak memory of this process: CUDA's peak allocated bytes once it uses CUDA, else its peak resident set."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB (GPU)"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024
    return f"{peak_bytes / 2**30:.1f} GiB (RSS)"


def duration(seconds: float) -> str:
    """`MM:SS` under an hour, `H:MM:SS` under a day, `Nd HH:MM:SS` beyond."""
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
