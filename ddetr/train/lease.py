"""A run folder's lease: while a run lives in `<storage>/<name>/`, no second run trains, checkpoints or prunes there.

The run's writing process holds `RUN/lease.json` (local or object storage, through `ddetr.io`) and refreshes its
heartbeat every `HEARTBEAT_S` from a daemon thread:

    {"owner": "3f9c0a1b2d4e", "token": "<this acquisition>", "run": "RUN", "host": "node-1", "pid": 4242,
     "pid_ns": "pid:[4026531836]", "boot": "<boot id>", "acquired": 1767225600.0, "heartbeat": 1767225630.0,
     "period_s": 30.0}

Who may take a lease (`judge`), in this order:
  1. nobody holds it (no file, or a file that is not a lease);
  2. the same owner holds it: `owner` names one launch of a run, not a process. The local engine makes a new one
     per `LocalRuntime`; on Ray the driver makes one per `TorchTrainer` (`ray_worker.WorkerLoop`) and every Train
     attempt carries it in its pickled train function, so a restarted attempt (a worker lost, a node preempted)
     takes its own lease back, wherever its rank 0 now runs;
  3. its heartbeat is older than `STALE_AFTER` periods (the holder's own period, at most `HEARTBEAT_S`): taken
     over with a warning;
  4. its holder ran on this machine (same host name, boot id and PID namespace) and that process is gone: taken
     over with a warning, without waiting for the heartbeat to age;
  else the run is refused with one line naming the holder and its heartbeat's age (`RunInUseError`).

Where it is taken: `train()` checks the folder on the driver before anything is written there (`check_free`: a
live lease is refused at once, before Ray Train's controller touches the folder); then the local engine's process
takes it in `LocalRuntime`, or rank 0 of a Ray run in `WorkerLoop`, which waits up to 3 heartbeats for another
launch's lease to go stale (a sweep's trial restarted while its last rank 0, on another node, was just lost)
before it raises (not reported: the refusal must not write its error into another run's folder).

So a second live run is refused; a killed run's folder is free at once on the same machine and after 3 x 30 s from
elsewhere. Heartbeats compare the holder's clock with the reader's: clocks must agree to well within a minute. The
lease is advisory: there is no compare-and-swap on object storage (nor through pyarrow), so two runs started in the
same moment can both pass the check; the later acquisition keeps the lease and the other's heartbeat thread logs an
error when it finds another token (that run goes on: the training loop does not watch its lease). A holder frozen
past 3 heartbeats (SIGSTOP, a paused VM, a store unreachable that long) loses its lease the same way.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ddetr import io
from ddetr.config import ConfigError

LEASE_FILE = "lease.json"
HEARTBEAT_S = 30.0  # refresh period: one small write to the run folder's storage
STALE_AFTER = 3  # missed heartbeats after which a lease is taken over
POLL_S = 1.0  # how often a run waiting for a lease reads it (a holder that dies is seen within this)

log = logging.getLogger(__name__)


class RunInUseError(ConfigError):
    """Another live run holds the run folder's lease; the message names it and its heartbeat's age."""


def new_owner() -> str:
    """An owner id for one launch of a run (see the module docstring, rule 2)."""
    return uuid.uuid4().hex[:12]


def lease_path(run: str) -> str:
    return io.join(run, LEASE_FILE)


def _read_text(path: str) -> str | None:
    try:
        return io.read_text(path) if io.exists(path) else None
    except FileNotFoundError:  # released between the two calls
        return None


def read_lease(run: str) -> dict[str, Any] | None:
    """The lease of the run folder `run`, None when there is none (a file that is not a lease: a warning, None)."""
    path = lease_path(run)
    text = _read_text(path)
    if text is None:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("token"), str):
        log.warning("%s is not a lease; it is replaced", path)
        return None
    return record


def _this_machine() -> dict[str, Any]:
    def first_line(path: str) -> str | None:
        try:
            return Path(path).read_text().strip()
        except OSError:  # not Linux
            return None

    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    return {"host": socket.gethostname(), "pid_ns": pid_ns, "boot": first_line("/proc/sys/kernel/random/boot_id")}


def _holder_gone(record: dict[str, Any]) -> bool:
    """Whether the lease's holder ran on this machine and is no longer running (rule 4)."""
    here = _this_machine()
    # The boot id tells machines apart that share a host name (and, after a reboot, only the heartbeat tells).
    if record.get("host") != here["host"] or record.get("boot") != here["boot"]:
        return False  # another machine: only its heartbeat tells
    pid = record.get("pid")
    if record.get("pid_ns") != here["pid_ns"] or not isinstance(pid, int) or pid <= 0:
        return False  # another container on the same host: its PIDs are not ours to ask about
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def stale_after_s(record: dict[str, Any]) -> float:
    """How old the heartbeat of `record` may grow before the lease is taken over."""
    period = record.get("period_s")
    period = float(period) if isinstance(period, (int, float)) and period > 0 else HEARTBEAT_S
    return STALE_AFTER * min(period, HEARTBEAT_S)  # a lease cannot make itself last longer than the house period


def judge(record: dict[str, Any] | None, owner: str | None, now: float | None = None) -> tuple[str, str]:
    """(verdict, description of the holder) for a lease read as `record`, asked by `owner` (None: nobody).

    Verdicts: "free", "ours", "stale", "gone" (may be taken) and "live" (refused); see the module docstring.
    """
    if record is None:
        return "free", ""
    now = time.time() if now is None else now
    heartbeat = record.get("heartbeat")
    age = now - heartbeat if isinstance(heartbeat, (int, float)) else float("inf")
    holder = f"pid {record.get('pid')} on {record.get('host')}, heartbeat {age:.0f} s ago"
    if owner is not None and record.get("owner") == owner:
        return "ours", holder
    if age > stale_after_s(record):
        return "stale", holder
    if _holder_gone(record):
        return "gone", f"pid {record.get('pid')} on {record.get('host')}, no longer running"
    return "live", holder


def _refusal(run: str, holder: str, record: dict[str, Any]) -> RunInUseError:
    return RunInUseError(
        f"run folder {run} is in use by another live run ({holder}; {lease_path(run)}): give this run another "
        f"train.name, or wait for that one to end (a lease is taken over once its heartbeat is "
        f"{stale_after_s(record):g} s old)"
    )


def check_free(run: str, owner: str | None = None) -> None:
    """Refuse now when another live run holds the lease of `run` (the driver's check, before anything starts).

    Raises:
        RunInUseError: naming the holder and how long ago its heartbeat was.
    """
    record = read_lease(run)
    verdict, holder = judge(record, owner)
    if verdict == "live":
        raise _refusal(run, holder, record)


class RunLease:
    """The lease of the run folder `run` held by this process; `acquire` takes it, `release` gives it back.

    Use it as a context manager, or call `release()` in the runtime's `close()`.
    """

    def __init__(self, run: str, record: dict[str, Any], period_s: float) -> None:
        self.run, self.path, self.record, self.period_s = run, lease_path(run), record, period_s
        self.lost = False  # set when another run's token is found in the file
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"ddetr-lease-{Path(run).name}", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(
        cls, run: str, owner: str | None = None, period_s: float = HEARTBEAT_S, wait_s: float = 0.0
    ) -> RunLease:
        """Take the lease of `run` for `owner` (a new owner when None), or wait up to `wait_s` for it to be free.

        Raises:
            RunInUseError: another live run held it throughout.
        """
        owner = owner or new_owner()
        deadline = time.monotonic() + wait_s
        while True:
            record = read_lease(run)
            verdict, holder = judge(record, owner)
            if verdict != "live":
                break
            if time.monotonic() >= deadline:
                raise _refusal(run, holder, record)
            log.info("waiting for the lease of %s, held by %s", run, holder)
            time.sleep(max(0.05, min(POLL_S, deadline - time.monotonic())))
        if verdict in ("stale", "gone"):
            log.warning("taking over the lease of %s from a run that is not alive (%s)", run, holder)
        now = time.time()
        mine = {
            "owner": owner,
            "token": uuid.uuid4().hex,
            "run": run,
            "pid": os.getpid(),
            **_this_machine(),
            "acquired": now,
            "heartbeat": now,
            "period_s": period_s,
        }
        io.atomic_write(lease_path(run), json.dumps(mine, indent=1))
        found = read_lease(run)  # a run that wrote after us, in the same moment, holds it: ours is refused
        if found is not None and found["token"] != mine["token"]:
            raise _refusal(run, judge(found, owner)[1], found)
        return cls(run, mine, period_s)

    def _beat(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                if not self._refresh():
                    return
            except OSError as e:  # a store's hiccup: the next beat tries again, the run goes on
                log.warning("could not refresh the lease %s (%s); trying again in %.0f s", self.path, e, self.period_s)

    def _refresh(self) -> bool:
        """One heartbeat: read the lease, and rewrite it with a new heartbeat while it is still ours. False once a
        later run holds it.

        Without compare-and-swap, a holder frozen (SIGSTOP, a paused VM) between its read and its write would write
        over the run that took its stale lease over. Hence: a write is skipped when this process stalled since its
        read, and a lease found overwritten by an *earlier* acquisition (that frozen holder) is written again; the
        later acquisition keeps the lease, the earlier one finds that on its next beat.
        """
        found = read_lease(self.run)
        read_at = time.monotonic()
        if found is not None and found.get("token") != self.record["token"]:
            theirs = found.get("acquired")
            if not (isinstance(theirs, (int, float)) and theirs < self.record["acquired"]):
                self.lost = True
                log.error(
                    "the lease of %s was taken over by pid %s on %s: another run now writes in this run's folder",
                    self.run, found.get("pid"), found.get("host"),
                )  # fmt: skip
                return False
            log.warning(
                "the lease of %s was written over by the run it was taken over from (pid %s on %s): written again",
                self.run, found.get("pid"), found.get("host"),
            )  # fmt: skip
        if time.monotonic() - read_at > self.period_s:
            return True  # stalled since the read, which may be out of date: read again at the next beat
        self.record["heartbeat"] = time.time()
        io.atomic_write(self.path, json.dumps(self.record, indent=1))
        return True

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this one's (never another run's)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=30)
        try:
            found = read_lease(self.run)
            if found is not None and found.get("token") == self.record["token"]:
                io.remove(self.path)
        except OSError as e:  # left behind, it goes stale: the next run takes it over
            log.warning("could not remove the lease %s (%s)", self.path, e)

    def __enter__(self) -> RunLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
