"""The GPU checks of ddetr in one run on a bare GPU machine (torch, nvcc, ninja; no Ray, no network), inside a deadline.

Through the device tool (the commit substituted by the caller; `.official` and `.whl` are ignored folders, carried):

    GIT_COMMIT=<sha> DEADLINE_S=420 bash benchmarks/gpu_check.sh          # timeout_s 480, carry [".official", ".whl"]
    GIT_COMMIT=<sha> DEADLINE_S=240 STEPS="build sanitizer ncu extras" bash benchmarks/gpu_check.sh   # second call

The second call's build is a no-op on the same warm machine (build/msda-gpu is kept) and a rebuild on a fresh one.

Locally, `bash benchmarks/gpu_check.sh` dry-runs: without a CUDA device every CUDA step is recorded as skipped.

One deadline (DEADLINE_S, default 420 s from the start) bounds the run: each step runs for at most min(its cap, time
left), and a step with under 20 s left is skipped ("no time"); so is one whose needs are missing (a CUDA device, a
tool, the op when its build failed in this run), with the reason. Steps, in order of value (each also a STEPS name;
"train", "sanitizer" and "extras" name groups; env always runs):
  env          nvidia-smi -L, python/torch/CUDA versions, the tools found; CUDA_HOME and PATH exported for the build
  wheels       .whl/*.whl (pycocotools) installed with pip --no-index into /tmp/site, put on PYTHONPATH
  build        the op for sm_90 into build/msda-gpu (and the official op in the background from .official/)
  registers    registers and local memory per kernel of the build (tests/nvcc.py --res-usage)
  tests        pytest -m gpu -v (-n 4 with xdist), a timeout per test: test_ops, test_ops_cuda, test_data_store
  official     .official/bench.py time: the official kernel against ours
  train-bf16, train-fp32   benchmarks/train_step.py --device cuda, bf16 autocast and fp32
  memcheck, synccheck      compute-sanitizer on benchmarks/op_subset.py, our kernels only (--kernel-name kns=ddetr)
  ncu          Nsight Compute on forward + backward at encoder-800, named metrics
  sync, msda, local-train, compile   op calls under sync debug mode; benchmarks/msda.py; 20 steps of the tiny
               preset on the local engine; the model's training step under torch.compile
Results under OUT (default build/gpu-check-out, ignored by git), 8 files at most: summary.json (rewritten after every
step; see gpu_check_runner.py), gpu_check.log, tests.xml, msda-vs-official.json, train_step-cuda-bf16.json,
train_step-cuda-fp32.json, ncu.csv, msda-cuda.json. Exit status 0 when no step failed, timed out or was killed.
Test hook: GPU_CHECK_STEP_DELAY_S=s runs a child that sleeps that long at the start of every step.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check_numbers import json_numbers, ncu_numbers, test_counts  # noqa: E402
from gpu_check_runner import (  # noqa: E402
    MIN_STEP_S,
    Interrupted,
    Run,
    StepFailed,
    StepSkipped,
    StepTimedOut,
    child_env,
    find_cuda_home,
    find_tool,
    on_signals,
)

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {"train": ["train-bf16", "train-fp32"], "sanitizer": ["memcheck", "synccheck"]}
GROUPS["extras"] = ["sync", "msda", "local-train", "compile"]
GPU_TESTS = ["tests/test_ops.py", "tests/test_ops_cuda.py", "tests/test_data_store.py"]
NCU_METRICS = [  # achieved vs theoretical occupancy, the register limit, time, and the reductions' traffic
    "launch__registers_per_thread",
    "launch__occupancy_limit_registers",
    "launch__grid_size",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "sm__maximum_warps_per_active_cycle_pct",
    "gpu__time_duration.sum",
    "dram__bytes.sum",
    "lts__t_sectors_op_red.sum",
    "l1tex__t_requests_pipe_lsu_mem_global_op_red.sum",
    "l1tex__t_sectors_pipe_lsu_mem_global_op_red.sum",
]
ENV_PROBE = """import json, sys, torch
info = {"python": sys.version.split()[0], "executable": sys.executable, "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if info["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    info.update(card=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
print("GPU_CHECK_ENV " + json.dumps(info))
"""
BUILD = """import sys
from ddetr.ops import build
path = build.build_extension(verbose=True)
print(path)
if path.name != "ddetr_msda_cuda.so":
    import os, torch
    sys.exit(f"built {path.name}, without the CUDA kernel: ddetr/ops/build.py's with_cuda() is False (torch CUDA "
             f"{torch.version.cuda}, nvcc {build.nvcc_path()}, GPU {torch.cuda.is_available()}, "
             f"TORCH_CUDA_ARCH_LIST {os.environ.get('TORCH_CUDA_ARCH_LIST')!r})")
"""


@dataclass
class Ctx:
    """What the steps share: the run, the children's environment, the tools found, what the steps learnt."""

    run: Run
    env: dict[str, str]
    tools: dict[str, str | None]
    scratch: Path  # a temporary folder of this run: what must not become a 9th file under OUT
    py: str  # the interpreter of every Python step (the runner's own)
    wanted: set[str]
    cuda: bool = False  # from the env step
    op_failed: str | None = None  # why the op did not build, when the build step failed in this run
    official: subprocess.Popen | None = None  # the official build in the background

    def call(self, *argv: str, extra_env: dict[str, str] | None = None, **kw) -> tuple[int, str]:
        return self.run.call(argv, {**self.env, **(extra_env or {})}, **kw)


@dataclass(frozen=True)
class Step:
    name: str
    cap_s: float  # seconds; the run's deadline may give it less
    body: Callable[[Ctx], dict | None]
    needs: tuple[str, ...] = ("cuda", "op")  # "cuda", "op" (built, or not built in this run), or a tool's name


# -- steps -----------------------------------------------------------------------------------------------------------
def step_env(ctx: Ctx) -> dict:
    for name, path in ctx.tools.items():
        ctx.run.say(f"{name}: {path or 'not found'}")
    ctx.run.say(f"CUDA_HOME={ctx.env.get('CUDA_HOME', '(no toolkit found)')}")
    _, out = ctx.call(ctx.py, "-c", ENV_PROBE)
    info = json.loads(out.split("GPU_CHECK_ENV ", 1)[1].splitlines()[0])
    ctx.cuda = bool(info["cuda_available"])  # first: a hanging nvidia-smi below must not hide the GPU from the rest
    ctx.run.summary["card"] = info.get("card")
    if ctx.tools["nvidia-smi"]:
        ctx.call(ctx.tools["nvidia-smi"], "-L", check=False)
    return {**info, "cuda_home": ctx.env.get("CUDA_HOME"), "tools": ctx.tools}


def step_wheels(ctx: Ctx) -> dict:
    wheels = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
    if not wheels:
        raise StepSkipped("no .whl/*.whl to install")
    site = os.environ.get("GPU_CHECK_SITE", "/tmp/site")
    pip = [ctx.py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
    ctx.call(*pip, "--upgrade", "--target", site, *wheels)
    ctx.env["PYTHONPATH"] = os.pathsep.join([site, ctx.env["PYTHONPATH"]])
    return {"wheels": [Path(w).name for w in wheels], "site": site}


def official_bench() -> Path | None:
    bench = ROOT / ".official" / "bench.py"
    return bench if bench.is_file() else None


def step_build(ctx: Ctx) -> dict:
    if official_bench() and "official" in ctx.wanted:
        log = ctx.scratch / "official-build.log"
        argv = [ctx.py, str(official_bench()), "build", "--build-dir", OFFICIAL_BUILD]
        ctx.run.say(f"$ {' '.join(argv)} > {log} &   (in the background, until the official step)")
        with open(log, "w", encoding="utf-8") as sink:
            ctx.official = subprocess.Popen(
                argv, cwd=ROOT, env=ctx.env, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                process_group=0,
            )  # fmt: skip
    try:
        ctx.call(ctx.py, "-c", BUILD)
    except StepFailed as err:
        ctx.op_failed = f"the op did not build ({err})"
        raise
    return {"library": str(library(ctx))}


def library(ctx: Ctx) -> Path:
    return Path(ctx.env["DDETR_MSDA_BUILD_DIR"]) / "ddetr_msda_cuda.so"


def step_registers(ctx: Ctx) -> dict:
    if not library(ctx).is_file():
        raise StepSkipped(f"no {library(ctx)}")
    tool = {"CUOBJDUMP": ctx.tools["cuobjdump"] or ""}
    rc, out = ctx.call(ctx.py, "tests/nvcc.py", "--res-usage", str(library(ctx)), extra_env=tool, check=False)
    registers: dict[str, int] = {}
    for words in (line.split() for line in out.splitlines()):  # kernel, dtype, variant..., regs, spills x 2, stack
        if len(words) >= 6 and words[0] == "backward_kernel" and all(w.isdigit() for w in words[-4:]):
            registers[words[1]] = max(registers.get(words[1], 0), int(words[-4]))
    numbers = {"backward_max_registers": registers}
    if rc:
        raise StepFailed(f"tests/nvcc.py exited with {rc} (over the register budget, or no report)", numbers)
    return numbers


def step_tests(ctx: Ctx) -> dict:
    xml = ctx.run.out / "tests.xml"
    argv = [ctx.py, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    if importlib.util.find_spec("xdist"):
        argv += ["-n", "4"]
    if importlib.util.find_spec("pytest_timeout"):
        argv += ["--timeout", "120"]  # one hung test fails alone, not the run
    try:
        rc, out = ctx.call(*argv, *GPU_TESTS, check=False)
    except StepTimedOut as err:  # no XML then: count what -v printed
        err.numbers = test_counts(None, err.output)
        raise
    numbers = test_counts(xml, out)
    if rc:
        raise StepFailed(f"pytest exited with {rc}: {numbers['failed']} failed, {numbers['errors']} errors", numbers)
    return numbers


def step_official(ctx: Ctx) -> dict:
    bench = official_bench()
    if bench is None:
        raise StepSkipped("no official sources (.official/bench.py)")
    if ctx.official is None:  # not started beside our build (a rerun without the build step): build it now
        ctx.call(ctx.py, str(bench), "build", "--build-dir", OFFICIAL_BUILD)
    else:
        wait_official_build(ctx)
    out = ctx.run.out / "msda-vs-official.json"
    _, said = ctx.call(ctx.py, str(bench), "time", "--out", str(out), "--build-dir", OFFICIAL_BUILD)
    if not out.is_file():  # bench.py says "skip: ..." and exits 0 where it cannot time (no CUDA torch)
        last = said.strip().splitlines()[-1] if said.strip() else "no output"
        raise StepFailed(f"bench.py time wrote no {out.name}: {last[:300]}")
    return json_numbers(out, ("official_over_ours", "max_abs_err", "outliers"), limit=80)


def wait_official_build(ctx: Ctx) -> None:
    """Wait for the background build inside this step's limit; its output goes into the log then."""
    proc = ctx.official
    try:
        rc = proc.wait(timeout=max(ctx.run.step_left(), 0.1))
    except subprocess.TimeoutExpired:
        Run.kill_group(proc)
        raise StepTimedOut("the official build ran past this step's limit") from None
    finally:
        if proc.returncode is not None:  # else main() kills it (an Interrupted on its way)
            ctx.official = None
        ctx.run.say((ctx.scratch / "official-build.log").read_text(errors="replace").rstrip())
    if rc:
        raise StepFailed(f"the official build exited with {rc}")


def train(amp: str, label: str) -> Callable[[Ctx], dict]:
    def body(ctx: Ctx) -> dict:
        out = ctx.run.out / f"train_step-cuda-{label}.json"
        ctx.call(ctx.py, "benchmarks/train_step.py", "--device", "cuda", "--amp", amp, "--out", str(out))
        return json_numbers(out, ("speedup", "images_per_s", "peak_step_mib", "min_s.step"))

    return body


def sanitizer(tool: str) -> Callable[[Ctx], dict]:
    def body(ctx: Ctx) -> dict:
        argv = [ctx.tools["compute-sanitizer"], "--tool", tool, "--kernel-name", "kns=ddetr", "--error-exitcode", "1"]
        # No caching allocator: every tensor its own allocation, so memcheck sees an access past a tensor's end.
        nocache = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
        rc, out = ctx.call(*argv, ctx.py, "benchmarks/op_subset.py", extra_env=nocache, check=False)
        m = re.search(r"ERROR SUMMARY: (\d+) error", out)
        numbers = {"errors": int(m[1]) if m else None}
        if rc:
            raise StepFailed(f"compute-sanitizer {tool} exited with {rc}", numbers)
        return numbers

    return body


def step_ncu(ctx: Ctx) -> dict:
    report = ctx.scratch / "ncu-800"
    target = [ctx.py, "benchmarks/op_subset.py", "--encoder-800"]
    base = [ctx.tools["ncu"], "--clock-control", "none", "--kernel-name", "regex:(forward|backward)_kernel"]
    base += ["--launch-count", "8", "-f", "-o", str(report)]
    rc, out = ctx.call(*base, "--metrics", ",".join(NCU_METRICS), *target, check=False)
    if rc and "metric" in out.lower():  # one name this ncu does not know refuses them all: fall back to sections
        ctx.run.say("== ncu refused a metric name: again with the LaunchStats, Occupancy and SpeedOfLight sections")
        sections = ["--section", "LaunchStats", "--section", "Occupancy", "--section", "SpeedOfLight"]
        rc, out = ctx.call(*base, *sections, *target, check=False)
    if rc:
        raise StepFailed(f"ncu exited with {rc}")
    csv_path = ctx.run.out / "ncu.csv"
    ctx.call(ctx.tools["ncu"], "--import", f"{report}.ncu-rep", "--csv", "--page", "raw", stdout_path=csv_path)
    return ncu_numbers(csv_path)


def step_sync(ctx: Ctx) -> dict:
    ctx.call(ctx.py, "benchmarks/op_subset.py", "--sync")
    return {}


def step_msda(ctx: Ctx) -> dict:
    out = ctx.run.out / "msda-cuda.json"
    ctx.call(ctx.py, "benchmarks/msda.py", "--device", "cuda", "--repeat", "10", "--out", str(out))
    return {}


def step_local_train(ctx: Ctx) -> dict:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('pycocotools') is None)"
    if ctx.call(ctx.py, "-c", probe, check=False)[0]:
        raise StepSkipped("no pycocotools (the local engine imports it): carry its wheel in .whl/")
    data, runs = ctx.scratch / "synth", ctx.scratch / "runs"
    ctx.call(ctx.py, "-m", "ddetr.cli", "data", "synth", "--out", str(data), "--images", "64")
    overrides = ["train.epochs=1", "train.max_steps_per_epoch=20", f"train.storage_path={runs}"]
    cli = [ctx.py, "-m", "ddetr.cli", "train", "--preset", "tiny", "--data", str(data), "--engine", "local"]
    ctx.call(*cli, *overrides)
    return {}


def step_compile(ctx: Ctx) -> dict:
    out = ctx.scratch / "train_step-cuda-compile.json"
    flags = ["--amp", "bf16", "--backends", "cpp", "--compile", "--steps", "2", "--warmup", "1", "--out", str(out)]
    ctx.call(ctx.py, "benchmarks/train_step.py", "--device", "cuda", *flags)
    numbers = json_numbers(out, ("min_s.step", "median_s.step"))
    eager = ctx.run.out / "train_step-cuda-bf16.json"
    if eager.is_file() and "results.cpp.min_s.step" in numbers:
        eager_s = json.loads(eager.read_text())["results"]["cpp"]["min_s"]["step"]
        numbers["speedup_vs_eager_bf16"] = eager_s / numbers["results.cpp.min_s.step"]
    return numbers


OFFICIAL_BUILD = "build/official"  # ignored by git, so a warm machine's rerun finds it built
STEPS = [
    Step("env", 30, step_env, needs=()),
    Step("wheels", 60, step_wheels, needs=("cuda",)),  # cp312 wheels for the GPU steps: no use elsewhere
    Step("build", 300, step_build, needs=("cuda", "nvcc")),  # a killed build is lost: let it finish
    Step("registers", 30, step_registers, needs=("cuda", "op", "cuobjdump")),
    Step("tests", 180, step_tests),
    Step("official", 90, step_official),
    Step("train-bf16", 75, train("bf16", "bf16")),
    Step("train-fp32", 75, train("off", "fp32")),
    Step("memcheck", 90, sanitizer("memcheck"), needs=("cuda", "op", "compute-sanitizer")),
    Step("synccheck", 60, sanitizer("synccheck"), needs=("cuda", "op", "compute-sanitizer")),
    Step("ncu", 75, step_ncu, needs=("cuda", "op", "ncu")),
    Step("sync", 45, step_sync),
    Step("msda", 60, step_msda),
    Step("local-train", 120, step_local_train),
    Step("compile", 180, step_compile),  # inductor compiles the whole model, forward and backward, first
]


# -- the run ---------------------------------------------------------------------------------------------------------
def wanted_steps(text: str) -> set[str]:
    """The step names of STEPS (space or comma separated, groups expanded; empty: all); env always runs.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    names = {s.name for s in STEPS}
    wanted = {"env"}
    for word in re.split(r"[\s,]+", text.strip()):
        if word and word not in names and word not in GROUPS:
            raise ValueError(
                f"STEPS names an unknown step {word!r}; steps: {' '.join(names)}; groups: {' '.join(GROUPS)}"
            )
        wanted.update(GROUPS.get(word, [word] if word else []))
    return wanted if text.strip() else names


def unmet(step: Step, ctx: Ctx) -> str | None:
    """Why `step` cannot run here, or None."""
    for need in step.needs:
        if need == "cuda" and not ctx.cuda:
            return "no CUDA device"
        if need == "op" and ctx.op_failed:
            return ctx.op_failed
        if need not in ("cuda", "op") and not ctx.tools.get(need):
            return f"no {need} found"
    return None


def do_step(ctx: Ctx, step: Step) -> None:
    run = ctx.run
    if step.name not in ctx.wanted:
        return run.skip(step.name, "not in STEPS")
    if run.left() < MIN_STEP_S:
        return run.skip(step.name, f"no time ({max(run.left(), 0):.0f} s left of {run.deadline_s:g})")
    run.begin(step.name)
    try:
        delay = os.environ.get("GPU_CHECK_STEP_DELAY_S")
        if delay:  # test hook: the kill test needs a step in flight at any moment
            ctx.call(ctx.py, "-c", f"import time; time.sleep({float(delay)})")
        reason = unmet(step, ctx)
        if reason:
            raise StepSkipped(reason)
        run.end("passed", numbers=step.body(ctx))
    except StepSkipped as why:
        run.end("skipped", str(why))
    except StepTimedOut as err:
        run.end("timed out", str(err), err.numbers)
    except StepFailed as err:
        run.end("failed", str(err), err.numbers)
    except Exception as err:  # a step's own bug (a parse, a missing file) fails that step, not the run
        run.end("failed", f"{type(err).__name__}: {err}")


def main() -> int:
    start = time.monotonic()
    try:
        wanted = wanted_steps(os.environ.get("STEPS", ""))
        deadline = float(os.environ.get("DEADLINE_S", "420"))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(os.environ.get("OUT") or ROOT / "build" / "gpu-check-out").resolve()
    commit = os.environ.get("GIT_COMMIT") or "unknown (pass GIT_COMMIT)"
    run = Run(out, deadline, commit, [(s.name, s.cap_s) for s in STEPS], start, ROOT)
    run.summary["steps_requested"] = sorted(wanted)
    on_signals(run)
    cuda_home = find_cuda_home()
    tools = {
        t: find_tool(t, cuda_home) for t in ("nvidia-smi", "nvcc", "ninja", "cuobjdump", "compute-sanitizer", "ncu")
    }
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    ctx = Ctx(run, child_env(ROOT, cuda_home, sys.executable), tools, scratch, sys.executable, wanted)
    try:
        for step in STEPS:
            do_step(ctx, step)
        stop_official_build(ctx)
        run.finish()
        return 1 if run.failed() else 0
    except Interrupted as sig:
        stop_official_build(ctx)
        run.interrupted(sig.args[0])
        return 128 + sig.args[0]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def stop_official_build(ctx: Ctx) -> None:
    """The official step never came (skipped, or the run was stopped): end its build, keep what it printed."""
    if ctx.official is not None:
        Run.kill_group(ctx.official)
        ctx.run.say(f"== the official build in the background (exit {ctx.official.returncode}):")
        ctx.run.say((ctx.scratch / "official-build.log").read_text(errors="replace").rstrip())
        ctx.official = None


if __name__ == "__main__":
    sys.exit(main())
