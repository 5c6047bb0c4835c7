"""The mechanics of benchmarks/gpu_check.py: one deadline for the run, steps as process groups, a summary that survives.

A `Run` owns the run's deadline, its log (`gpu_check.log`: each step's output under a header with a timestamp) and
its summary (`summary.json`, rewritten to a temporary name and renamed after every change of a step's status, so a
run killed at any moment leaves a whole file). A step's commands run through `Run.call`, each in a process group of
its own (a new group, not a new session: whoever kills the whole command still reaches it), under the step's
limit; past it the group gets SIGTERM, then SIGKILL. `find_cuda_home`, `find_tool` and `child_env` find the CUDA
toolkit and its tools and make the steps' environment (so the op's build finds nvcc). Nothing here imports torch:
the runner starts on any Python 3.11+, and everything CUDA happens in the steps' child processes.

summary.json keys: commit, card, deadline_s, started (UTC, ISO 8601), elapsed_s, finished, out, steps_requested,
steps (a list, in order, of {name, status, reason, seconds, cap_s, numbers}); status is one of pending, running,
passed, failed, "timed out", skipped, killed. A step running when the run was killed with SIGKILL stays "running".
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

MIN_STEP_S = 20.0  # a step with less time left than this is skipped ("no time"): it could not finish anything useful
KILL_GRACE_S = 5.0  # SIGTERM, then this long before SIGKILL
OUTPUT_KEPT = 400_000  # characters of a step's output kept in memory for its numbers (the log has all of it)


class StepSkipped(Exception):
    """The step does not apply here; the message is the reason."""


class StepFailed(Exception):
    """A command of the step failed; the message says which and how. `numbers` go into the summary all the same."""

    def __init__(self, message: str, numbers: dict | None = None, output: str = ""):
        super().__init__(message)
        self.numbers, self.output = numbers or {}, output


class StepTimedOut(StepFailed):
    """A command of the step ran past the step's limit and was killed; `output` is what it printed until then."""


class Interrupted(BaseException):
    """The runner got SIGTERM or SIGINT (the device tool's limit, or ^C)."""


class Run:
    """One run of the GPU checks: deadline, log, summary and the process group of the command in flight.

    Args:
        out: the results folder (created).
        deadline_s: seconds from `start` that the whole run may take.
        commit: what the summary calls the commit.
        steps: the step names and caps (seconds), in order; every one is listed in the summary from the start.
        start: time.monotonic() at the script's start.
        root: the folder the commands run in (the checkout).
    """

    def __init__(
        self, out: Path, deadline_s: float, commit: str, steps: Sequence[tuple[str, float]], start: float, root: Path
    ):
        self.out, self.root = out, root
        self.out.mkdir(parents=True, exist_ok=True)
        self.deadline_s = deadline_s
        self.start = start
        self.log: IO[str] = open(out / "gpu_check.log", "w", encoding="utf-8")  # noqa: SIM115 (open for the run)
        self.summary: dict = {
            "commit": commit,
            "card": None,
            "deadline_s": deadline_s,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "elapsed_s": 0.0,
            "finished": False,
            "out": str(out),
            "steps": [
                {"name": name, "status": "pending", "reason": None, "seconds": None, "cap_s": cap, "numbers": {}}
                for name, cap in steps
            ],
        }
        self._step: dict | None = None
        self._step_end = 0.0
        self._proc: subprocess.Popen | None = None
        self.write_summary()

    # -- time ----------------------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        """Seconds left before the run's deadline."""
        return self.deadline_s - self.elapsed()

    def step_left(self) -> float:
        """Seconds left of the step in flight: min(its cap, the run's deadline) minus what it used."""
        return self._step_end - time.monotonic()

    # -- output --------------------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        """A line (or lines) on stdout and in the log."""
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        if not self.log.closed:
            self.log.write(text + "\n")
            self.log.flush()

    def header(self, text: str) -> None:
        stamp = datetime.now().strftime("%H:%M:%S")
        self.say(f"\n== [{stamp} +{self.elapsed():6.1f} s] {text}")

    def write_summary(self) -> None:
        """summary.json, atomically: a temporary file in the same folder, then a rename."""
        self.summary["elapsed_s"] = round(self.elapsed(), 1)
        tmp = self.out / ".summary.json.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.summary, f, indent=2)
            f.write("\n")
        os.replace(tmp, self.out / "summary.json")

    def entry(self, name: str) -> dict:
        return next(s for s in self.summary["steps"] if s["name"] == name)

    # -- steps ---------------------------------------------------------------------------------------------------
    def begin(self, name: str) -> None:
        """Mark step `name` running, with a limit of min(its cap, time left); announce it."""
        entry = self.entry(name)
        limit = min(entry["cap_s"], self.left())
        self._step, self._step_end = entry, time.monotonic() + limit
        entry["status"], entry["started_s"] = "running", round(self.elapsed(), 1)
        self.header(f"{name}: cap {entry['cap_s']:g} s, limit {limit:.0f} s")
        self.write_summary()

    def end(self, status: str, reason: str | None = None, numbers: dict | None = None) -> None:
        """Record the step in flight as finished (`status`), with its seconds and numbers."""
        entry = self._step
        assert entry is not None, "end() without begin()"
        entry["status"], entry["reason"] = status, reason
        entry["seconds"] = max(0.0, round(self.elapsed() - entry.pop("started_s"), 1))
        if numbers:
            entry["numbers"].update(numbers)
        self.write_summary()
        self.say(f"== {entry['name']}: {status}{f' ({reason})' if reason else ''} in {entry['seconds']} s")
        self._step = None

    def skip(self, name: str, reason: str) -> None:
        """Record a step that never started."""
        entry = self.entry(name)
        entry["status"], entry["reason"], entry["seconds"] = "skipped", reason, 0.0
        self.write_summary()
        self.say(f"== {name}: skipped ({reason})")

    def call(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        stdout_path: Path | None = None,
        check: bool = True,
    ) -> tuple[int, str]:
        """Run one command of the step in flight, inside the step's limit, in its own process group.

        Its output goes to stdout and the log, or with `stdout_path` its stdout to that file (stderr still to the log).

        Returns:
            (exit status, the output's last OUTPUT_KEPT characters).

        Raises:
            StepTimedOut: past the step's limit (the group was killed). StepFailed: a non-zero exit with `check`.
        """
        limit = self.step_left()
        if limit <= 1:
            raise StepTimedOut(f"no time left for {Path(argv[0]).name}")
        shown = " ".join(a if "\n" not in a else repr(a.split("\n", 1)[0] + " ...") for a in argv)
        self.say(f"$ {shown}" + (f" > {stdout_path}" if stdout_path else ""))
        sink = open(stdout_path, "w", encoding="utf-8") if stdout_path else None  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                list(argv),
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=sink or subprocess.PIPE,
                stderr=subprocess.PIPE if sink else subprocess.STDOUT,
                text=True,
                errors="replace",
                process_group=0,  # killable as a whole at the limit (pytest workers, ncu's target, ninja's nvcc)
            )
        except OSError as err:
            if sink:
                sink.close()
            raise StepFailed(f"cannot start {argv[0]}: {err.strerror}") from None
        self._proc = proc
        kept: list[str] = []
        reader = threading.Thread(target=self._copy, args=(proc.stderr if sink else proc.stdout, kept), daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            self.kill_group(proc)
            reader.join(timeout=KILL_GRACE_S)
            message = f"{Path(argv[0]).name} ran past the step's limit of {limit:.0f} s"
            raise StepTimedOut(message, output="".join(kept)[-OUTPUT_KEPT:]) from None
        except Interrupted:
            self.kill_group(proc)
            raise
        finally:
            self._proc = None
            if sink:
                sink.close()
        reader.join(timeout=KILL_GRACE_S)  # a grandchild outside the group may hold the pipe: do not wait for it
        output = "".join(kept)[-OUTPUT_KEPT:]
        if check and rc != 0:
            last = next((line.strip() for line in reversed(output.splitlines()) if line.strip()), "")
            raise StepFailed(f"{Path(argv[0]).name} exited with {rc}" + (f": {last[:300]}" if last else ""))
        return rc, output

    def _copy(self, stream: IO[str], kept: list[str]) -> None:
        size = 0
        for line in stream:
            if not self.log.closed:  # a grandchild outside the group may write on after the run ended
                self.log.write(line)
                self.log.flush()
            sys.stdout.write(line)
            sys.stdout.flush()
            kept.append(line)
            size += len(line)
            while size > 2 * OUTPUT_KEPT and len(kept) > 1:
                size -= len(kept.pop(0))

    @staticmethod
    def kill_group(proc: subprocess.Popen) -> None:
        """SIGTERM to the process's group, SIGKILL after KILL_GRACE_S if it is still there."""
        for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def interrupted(self, signum: int) -> None:
        """After SIGTERM/SIGINT: kill the command in flight, record the step as killed and the rest as skipped."""
        if self._proc is not None:
            self.kill_group(self._proc)
        if self._step is not None:
            self.end("killed", f"the run got signal {signum}")
        for entry in self.summary["steps"]:
            if entry["status"] == "pending":
                entry["status"], entry["reason"], entry["seconds"] = "skipped", "the run was killed", 0.0
        self.finish()

    def finish(self) -> None:
        self.summary["finished"] = True
        self.write_summary()
        width = max(len(s["name"]) for s in self.summary["steps"])
        self.header("summary")
        for s in self.summary["steps"]:
            reason = f"  ({s['reason']})" if s["reason"] else ""
            self.say(f"{s['name']:<{width}}  {s['status']:<9} {s['seconds'] or 0:>6.1f} s{reason}")
        self.say(f"results in {self.out}")
        self.log.close()

    def failed(self) -> bool:
        return any(s["status"] in ("failed", "timed out", "killed") for s in self.summary["steps"])


# -- the machine: the CUDA toolkit, its tools, the steps' environment --------------------------------------------------
def find_cuda_home() -> Path | None:
    """The CUDA toolkit: $CUDA_HOME, nvcc's on PATH (through links), /usr/local/cuda, /usr/local/cuda-*.

    A home counts when it has bin/nvcc and include/cuda_runtime.h: a wrapper script on PATH (/usr/local/bin/nvcc)
    does not make /usr/local a toolkit, and torch's build takes its headers from CUDA_HOME/include.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    homes = [Path(c) for c in candidates if c and (Path(c) / "bin" / "nvcc").is_file()]
    return next((h for h in homes if (h / "include" / "cuda_runtime.h").is_file()), homes[0] if homes else None)


def find_tool(name: str, cuda_home: Path | None) -> str | None:
    """A tool on PATH, else in the toolkit (bin/, compute-sanitizer/) or the newest Nsight Compute folder."""
    places = [shutil.which(name)]
    if cuda_home:
        places += [f"{cuda_home}/bin/{name}", f"{cuda_home}/{name}/{name}"]
    places += [f"/usr/local/cuda/bin/{name}", *sorted(glob.glob(f"/opt/nvidia/nsight-compute/*/{name}"), reverse=True)]
    return next((p for p in places if p and Path(p).is_file() and os.access(p, os.X_OK)), None)


def child_env(root: Path, cuda_home: Path | None, py: str) -> dict[str, str]:
    """The steps' environment: ddetr from the checkout, unbuffered output, sm_90, the build folder, CUDA on PATH."""
    env = dict(os.environ)
    path = [str(Path(py).parent)]  # the Python environment's bin: pip's ninja lives there
    if cuda_home:
        env["CUDA_HOME"] = str(cuda_home)  # bug B1: ddetr/ops/build.py's with_cuda() looks at CUDA_HOME and PATH only
        path.insert(0, str(cuda_home / "bin"))
    env["PATH"] = os.pathsep.join([*path, env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    env.setdefault("DDETR_MSDA_BUILD_DIR", str(root / "build" / "msda-gpu"))
    env.setdefault("MAX_JOBS", "8")  # ours and the official build share 16 cores
    return env


def on_signals(run: Run) -> None:
    """Turn SIGTERM and SIGINT into `Interrupted` in the main thread (the runner then records and exits)."""

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the recording short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
