"""What of Ray's own output reaches the console of a Ray training, at the default verbosity (`ddetr -v` shows all).

Three kinds of lines alarm without cause there, each silenced where it is made, by the narrowest filter found:

- Ray Data's "Cluster resources are not enough to run any task ... may hang forever unless the cluster scales up",
  logged by each worker's dataset when the training workers hold the CPUs its first operator would reserve, while
  its tasks still run (several times per epoch on 2 CPUs): marked hidden for Ray Data's console handler, kept in
  its log file (`data/pipeline.py: hide_starvation_notice`). The training loop's data watchdog (`data.watchdog_s`)
  still turns a real stall into an error; with the watchdog off the notice stays.
- Ray Core's `core_worker.cc ... Actor with class name: 'PreemptionWatcher' ... max_restarts > 0 ...` error line,
  printed once by Ray Train's controller at every run start: its preemption watcher is an actor that may restart
  and whose arguments hold the workers' handles, which Ray Core warns it could not restore; Ray Train makes a new
  watcher with every worker group, so no run depends on that restart. It is a C++ log line with no switch of its
  own (only RAY_BACKEND_LOG_LEVEL, which would hide every error of the process), so the driver drops it from the
  worker output it prints (`quiet_forwarded_lines`), and only it.
- Warnings that every rank makes alike (the backbone's "starts from random weights"), marked `SAME_ON_EVERY_RANK`
  where they are logged: kept to rank 0 (`same_on_every_rank_once`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from ddetr.models.build import SAME_ON_EVERY_RANK

log = logging.getLogger(__name__)

# Lines of Ray's processes that the driver does not print (matched anywhere in the line).
HARMLESS_RAY_LINES = (
    re.compile(r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' .*max_restarts > 0"),
)
PRINTER = "ray_print_logs"  # the name under which Ray's driver registers its printer of worker output


class _DropHarmless:
    """Ray's printer of worker output, less the lines of HARMLESS_RAY_LINES."""

    def __init__(self, printer: Callable[[dict[str, Any]], None]) -> None:
        self.printer = printer

    def __call__(self, data: dict[str, Any]) -> None:
        lines = data.get("lines") or []
        kept = [line for line in lines if not any(p.search(line) for p in HARMLESS_RAY_LINES)]
        if len(kept) == len(lines):
            self.printer(data)
        elif kept:
            self.printer({**data, "lines": kept})


def quiet_forwarded_lines() -> bool:
    """On the driver, once Ray is connected: keep HARMLESS_RAY_LINES out of the worker output Ray prints.

    Ray offers no filter for that output; its printer is a handler of `ray._private.ray_logging`'s dispatcher,
    wrapped here (idempotent; `ray.shutdown` removes it with Ray's printer). Returns False when this Ray keeps
    its printer elsewhere (the lines are then printed, as before).
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        log.debug("this Ray version prints worker output elsewhere: its harmless notices stay on the console")
        return False
    handlers = getattr(dispatcher, "handlers", None)
    if not isinstance(handlers, list):
        return False
    # One assignment: `emit` iterates whichever list is in place, under the dispatcher's lock.
    dispatcher.handlers = [
        (name, _DropHarmless(h) if name == PRINTER and not isinstance(h, _DropHarmless) else h) for name, h in handlers
    ]
    return True


class _SameOnEveryRank(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, SAME_ON_EVERY_RANK, False)


def same_on_every_rank_once(rank: int) -> None:
    """On ranks other than 0, drop the records marked SAME_ON_EVERY_RANK from the root logger's handlers (the
    console of a Ray worker), so that the run says them once."""
    if rank == 0:
        return
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _SameOnEveryRank) for f in handler.filters):
            handler.addFilter(_SameOnEveryRank())
