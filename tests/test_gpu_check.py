"""benchmarks/gpu_check.sh on a machine without a GPU: the dry run, a run killed mid-step, a deadline too short.

Each test runs the real script in a subprocess with CUDA hidden (CUDA_VISIBLE_DEVICES=""), so it dry-runs even on a
GPU machine, and reads the summary.json and gpu_check.log it leaves under a temporary OUT.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
FILES_BACK = {
    "summary.json",
    "gpu_check.log",
    "tests.xml",
    "msda-vs-official.json",
    "train_step-cuda-bf16.json",
    "train_step-cuda-fp32.json",
    "ncu.csv",
    "msda-cuda.json",
}
FINISHED = ("passed", "failed", "timed out", "skipped")


def load(name: str):
    """A module of benchmarks/ (gpu_check and its runner import the standard library only)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def step_names() -> list[str]:
    return [step.name for step in load("gpu_check").STEPS]


def gone(pid: int) -> bool:
    """The process has exited (a zombie that nobody has reaped yet counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def script_env(out: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("STEPS", "DEADLINE_S", "GPU_CHECK_STEP_DELAY_S")}
    env.update(OUT=str(out), GIT_COMMIT="0123abc", PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


def read_summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow  # each run imports torch in its env step: 5-8 s here
def test_dry_run_records_every_step_and_exits_0(tmp_path):
    out = tmp_path / "out"
    start = time.monotonic()
    result = subprocess.run(["bash", str(SCRIPT)], env=script_env(out), capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert took < 60, f"the dry run took {took:.0f} s"
    summary = read_summary(out)
    assert summary["commit"] == "0123abc" and summary["finished"] is True and summary["card"] is None
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == step_names()
    assert steps["env"]["status"] == "passed", steps["env"]
    assert steps["env"]["numbers"]["cuda_available"] is False
    for name, step in steps.items():
        if name != "env":
            assert (step["status"], step["reason"]) == ("skipped", "no CUDA device"), step
    log = (out / "gpu_check.log").read_text()
    for name in steps:
        assert f"] {name}: cap " in log and f"== {name}: " in log, f"no header or end line for {name} in the log"
    assert {p.name for p in out.iterdir()} <= FILES_BACK


@pytest.mark.slow
def test_a_run_killed_mid_step_leaves_the_steps_it_finished(tmp_path):
    """SIGKILL at a random moment while a step's command runs: summary.json parses and holds what finished."""
    out = tmp_path / "out"
    env = script_env(out, GPU_CHECK_STEP_DELAY_S="0.3")  # every step runs a 0.3 s child: 14 steps after env
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the env step imports torch: wait for it, then kill among the rest
            try:
                if read_summary(out)["steps"][0]["status"] in FINISHED:
                    break
            except (FileNotFoundError, json.JSONDecodeError, IndexError):
                pass  # not written yet (a reader never sees half a file: the script renames it into place)
            assert proc.poll() is None, "the script ended before its env step finished"
            time.sleep(0.05)
        else:
            pytest.fail("the env step did not finish within 60 s")
        delay = random.uniform(0.5, 3.0)
        time.sleep(delay)
        assert proc.poll() is None, f"the script ended before the kill at +{delay:.2f} s"
        proc.send_signal(signal.SIGKILL)  # bash exec'd the runner: this is the runner itself
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = read_summary(out)
    statuses = [s["status"] for s in summary["steps"]]
    done = [s for s in summary["steps"] if s["status"] in FINISHED]
    assert summary["finished"] is False, f"killed at +{delay:.2f} s: {statuses}"
    assert len(done) >= 2, f"killed {delay:.2f} s after env: {statuses}"
    # Finished steps first, then at most the one in flight, then those never begun.
    order = {"running": 1, "pending": 2}
    assert statuses == sorted(statuses, key=lambda s: order.get(s, 0)) and statuses.count("running") <= 1, statuses
    for step in done:
        assert step["seconds"] is not None and (step["name"] == "env" or step["reason"] == "no CUDA device"), step
    # Every step the log calls finished is finished in the summary, with the same status (the summary is first).
    log = (out / "gpu_check.log").read_text()
    by_name = {s["name"]: s["status"] for s in summary["steps"]}
    for name, status in by_name.items():
        for finished in FINISHED:
            if f"\n== {name}: {finished}" in log:
                assert status == finished, (name, status, finished)


@pytest.mark.slow
def test_a_deadline_too_short_skips_the_later_steps_with_no_time(tmp_path):
    out = tmp_path / "out"
    env = script_env(out, DEADLINE_S="21", GPU_CHECK_STEP_DELAY_S="1.1")  # env uses > 1 s: under 20 s left after
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = read_summary(out)
    assert summary["finished"] is True and summary["deadline_s"] == 21
    assert summary["elapsed_s"] < 21
    env_step, *later = summary["steps"]
    assert env_step["status"] == "passed", env_step
    for step in later:
        assert step["status"] == "skipped" and step["reason"].startswith("no time ("), step


def test_an_unknown_step_name_is_one_line_and_exit_2(tmp_path):
    env = script_env(tmp_path / "out", STEPS="build testz")
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: STEPS names an unknown step 'testz'") and result.stderr.count("\n") == 1


def test_a_command_past_its_step_limit_is_killed_with_its_children(tmp_path):
    runner = load("gpu_check_runner")
    run = runner.Run(tmp_path / "out", 60, "c", [("slow", 1.5)], time.monotonic(), tmp_path)
    run.begin("slow")
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)"
    )
    start = time.monotonic()
    with pytest.raises(runner.StepTimedOut) as timed_out:
        run.call([sys.executable, "-c", code], dict(os.environ))
    assert 1.4 < time.monotonic() - start < 10
    assert "started" in timed_out.value.output
    run.end("timed out", str(timed_out.value))
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while not gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(grandchild), "the step's grandchild outlived the step's limit"
    step = read_summary(tmp_path / "out")["steps"][0]
    assert step["status"] == "timed out" and "past the step's limit" in step["reason"] and step["seconds"] >= 1.4
    run.finish()
    assert "started" in (tmp_path / "out" / "gpu_check.log").read_text()


def test_sigterm_kills_the_step_in_flight_and_records_the_rest(tmp_path):
    """The device tool's limit, or ^C: the step in flight is recorded killed, the rest skipped, the summary finished."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        ["bash", str(SCRIPT)], env=script_env(out, GPU_CHECK_STEP_DELAY_S="30"), stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # env's first command (the 30 s sleep of the hook) is in flight
            if (out / "gpu_check.log").is_file() and "time.sleep(30.0)" in (out / "gpu_check.log").read_text():
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = read_summary(out)
    env_step, *rest = summary["steps"]
    assert summary["finished"] is True
    assert env_step["status"] == "killed" and env_step["seconds"] < 15, env_step
    assert all((s["status"], s["reason"]) == ("skipped", "the run was killed") for s in rest), rest
