"""What Ray Train adds to a training step: `--engine ray` (1 and 2 workers) against `--engine local`, part by part.

    python benchmarks/ray_overhead.py                      # tiny preset, batch 4, 3 warm-up + 12 measured steps
    python benchmarks/ray_overhead.py --steps 30 --repeats 3

Every variant runs `ddetr.train.loop.fit` end to end on the same synthetic dataset with the same global batch:

    local-Nt     LocalRuntime (a torch DataLoader with --loader-workers processes), N torch threads
    ray-1w-Nt    a TorchTrainer with 1 worker of N CPUs (`set_torch_threads`: N threads), Ray Data decode tasks
    ray-2w-1t    2 workers of 1 CPU each (1 thread each), half the batch each: gloo all-reduces the gradients

Ray is started once with `--ray-cpus` logical CPUs (default: the cores plus one), so that a worker can hold as
many CPUs as the local engine has threads and still leave `data.map_cpus` for the decode tasks; the cores are
what they are, the logical count only lets Ray schedule.

Each step's parts come from rank 0: `data_wait_s` and `step_s` from the run's step log (`loop.py`), the optimizer's
own time from torch's global optimizer-step hooks and the step period (one optimizer step to the next) from a
step callback (`StepParts`, pickled to the workers as any step callback is). So per step:

    period_s       wall time from one optimizer step's end to the next's: what a user's throughput is made of
    data_wait_s    waiting for the batch (DataLoader / Ray Data iterator)
    fwd_bwd_s      moving the batch, forward, criterion, backward (the gradient all-reduce with 2 workers),
                   clipping, EMA: step_s - data_wait_s - optimizer_s
    optimizer_s    AdamW's step
    outside_s      the rest of the loop: the step log, the progress line, callbacks and the runtime's per-step
                   preemption question (with Ray a barrier across the workers): period_s - step_s

The first `--warmup` steps are left out. Variants alternate within each repeat. Prints a table (medians of the
steady steps, best repeat) and writes benchmarks/results/ray-overhead-cpu.json with the machine, versions, commit,
load average and settings, every step's parts, and Ray's overhead against the local engine at equal threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ddetr import io
from ddetr.config import Config
from ddetr.data.synthetic import make_synthetic_coco
from ddetr.train.callbacks import StepInfo
from ddetr.train.local import LocalRuntime
from ddetr.train.logbook import read_metrics
from ddetr.train.loop import fit

sys.path.insert(0, str(Path(__file__).parent))
import train as train_bench  # noqa: E402 - benchmarks/train.py: the same configs, data and commit lookup

RESULTS = Path(__file__).parent / "results" / "ray-overhead-cpu.json"
PARTS = ("period_s", "data_wait_s", "fwd_bwd_s", "optimizer_s", "outside_s")


class StepParts:
    """A step callback recording, on rank 0, each step's end time and optimizer time to a JSON-lines file.

    The optimizer is timed by torch's global optimizer-step hooks, installed in the worker's process on the first
    call (so the first step has no optimizer time: it is a warm-up step anyway).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._installed = False

    def _install(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._opt_s, self._opt_start = 0.0, 0.0

        def pre(*_: object) -> None:
            self._opt_start = time.perf_counter()

        def post(*_: object) -> None:
            self._opt_s += time.perf_counter() - self._opt_start

        self._handles = (register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post))
        self._installed = True

    def remove(self) -> None:
        """Take the hooks out of this process (the local engine's variants run in the benchmark's own)."""
        for handle in getattr(self, "_handles", ()):
            handle.remove()

    def __getstate__(self) -> dict:
        return {"path": self.path, "_installed": False}  # hooks are per process: installed again where it runs

    def after_step(self, info: StepInfo) -> None:
        if info.rank != 0:
            return
        first = not self._installed
        if first:
            self._install()
        record = {
            "step": info.step,
            "end": time.perf_counter(),
            "optimizer_s": None if first else self._opt_s,
            "torch_threads": torch.get_num_threads(),
            "pid": os.getpid(),
        }
        self._opt_s = 0.0
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def step_parts(run_dir: Path, parts_file: Path, warmup: int) -> tuple[list[dict], int]:
    """Every steady step's parts (see the module docstring), and the torch threads rank 0 trained with."""
    logged = {r["step"]: r for r in read_metrics(run_dir) if r["kind"] == "step" and "step_s" in r}
    marks = [json.loads(line) for line in parts_file.read_text().splitlines()]
    # A worker that failed and was restarted (Ray Train's max_failures) began again: only the last attempt counts.
    marks = [m for m in marks if m["pid"] == marks[-1]["pid"]]
    rows = []
    for before, mark in zip(marks, marks[1:], strict=False):
        if mark["step"] <= warmup:
            continue
        r = logged[mark["step"]]
        period = mark["end"] - before["end"]
        compute = r["step_s"] - r["data_wait_s"]
        rows.append(
            {
                "step": mark["step"],
                "period_s": period,
                "data_wait_s": r["data_wait_s"],
                "fwd_bwd_s": compute - mark["optimizer_s"],
                "optimizer_s": mark["optimizer_s"],
                "outside_s": period - r["step_s"],
            }
        )
    return rows, marks[-1]["torch_threads"]


def run_local(args: argparse.Namespace, data: str, tmp: str, name: str, threads: int) -> dict:
    cfg = train_bench.base_config(
        args, data, tmp, name, f"train.batch_size={args.batch}", f"data.loader_workers={args.loader_workers}"
    )
    parts = Path(tmp) / f"{name}.parts.jsonl"
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    start = time.time()
    runtime = LocalRuntime(cfg, device="cpu")
    timer = StepParts(str(parts))
    try:
        fit(cfg, runtime, callbacks=[timer])
    finally:
        runtime.close()
        torch.set_num_threads(default_threads)
        timer.remove()
    return summarise(f"local-{threads}t", Path(tmp) / name, parts, args, time.time() - start)


def run_ray(args: argparse.Namespace, data: str, tmp: str, name: str, workers: int, cpus: float) -> dict:
    from ddetr.train.ray_train import build_trainer

    cfg: Config = train_bench.base_config(
        args,
        data,
        tmp,
        name,
        f"train.batch_size={args.batch // workers}",
        f"train.num_workers={workers}",
        f"train.cpus_per_worker={cpus}",
        f"data.map_cpus={args.map_cpus}",
        "train.controller_failure_limit=0",
    )
    parts = Path(tmp) / f"{name}.parts.jsonl"
    start = time.time()
    result = build_trainer(cfg, step_callbacks=[StepParts(str(parts))]).fit()
    if result.error is not None:
        raise result.error
    threads = max(1, int(cpus))
    return summarise(f"ray-{workers}w-{threads}t", Path(tmp) / name, parts, args, time.time() - start)


def summarise(variant: str, run_dir: Path, parts_file: Path, args: argparse.Namespace, total: float) -> dict:
    rows, threads = step_parts(run_dir, parts_file, args.warmup)
    medians = {k: statistics.median(r[k] for r in rows) for k in PARTS}
    return {
        "variant": variant,
        "torch_threads_rank0": threads,
        "steps_measured": len(rows),
        "median": medians,
        "mean": {k: statistics.fmean(r[k] for r in rows) for k in PARTS},
        "images_per_s": args.batch / medians["period_s"],
        "fit_total_s": total,
        "steps": rows,
    }


def best_runs(runs: list[dict]) -> dict[str, dict]:
    """Per variant, the repeat with the lowest median step period (the least disturbed on a shared machine)."""
    best: dict[str, dict] = {}
    for r in runs:
        if r["variant"] not in best or r["median"]["period_s"] < best[r["variant"]]["median"]["period_s"]:
            best[r["variant"]] = r
    return best


def overheads(best: dict[str, dict]) -> dict[str, dict]:
    """Ray against the local engine at equal threads, and 2 workers against 1, as ratios of the median period, with
    each part's difference in seconds (what the overhead is made of)."""
    pairs = {}
    for variant in best:
        if variant.startswith("ray-1w-"):
            local = "local-" + variant.removeprefix("ray-1w-")
            if local in best:
                pairs[f"{variant} vs {local}"] = (variant, local)
    if "ray-2w-1t" in best:
        for one in ("ray-1w-1t", f"ray-1w-{os.cpu_count()}t"):
            if one in best:
                pairs[f"ray-2w-1t vs {one}"] = ("ray-2w-1t", one)
    out = {}
    for label, (a, b) in pairs.items():
        ma, mb = best[a]["median"], best[b]["median"]
        out[label] = {
            "overhead_pct": 100 * (ma["period_s"] / mb["period_s"] - 1),
            "part_diff_s": {k: ma[k] - mb[k] for k in PARTS},
        }
    return out


def print_table(report: dict) -> None:
    heads = " ".join(f"{k.removesuffix('_s'):>10}" for k in PARTS)
    print(f"\n{'variant':<11} {'rep':>3} {'thr':>3} {heads}  img/s")
    for r in report["runs"]:
        m = r["median"]
        cells = " ".join(f"{m[k]:>10.4f}" for k in PARTS)
        print(f"{r['variant']:<11} {r['repeat']:>3} {r['torch_threads_rank0']:>3} {cells} {r['images_per_s']:>6.2f}")
    print("\nmedian seconds per steady step; overhead = median period against the other variant's (best repeat each):")
    for label, o in report["summary"]["overhead"].items():
        diffs = ", ".join(f"{k.removesuffix('_s')} {v:+.4f}" for k, v in o["part_diff_s"].items())
        print(f"  {label:<26} {o['overhead_pct']:+6.1f}%   ({diffs})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=160)
    p.add_argument("--image-size", type=int, nargs=2, default=[128, 192], help="min max side of the JPEGs")
    p.add_argument("--scale", type=float, default=0.2, help="data.scale")
    p.add_argument("--batch", type=int, default=4, help="images per optimizer step, every variant")
    p.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    p.add_argument("--two-workers", action=argparse.BooleanOptionalAction, default=True, help="ray-2w-1t too")
    p.add_argument("--map-cpus", type=float, default=0.5, help="CPUs per Ray Data decode task")
    p.add_argument("--ray-cpus", type=int, default=(os.cpu_count() or 1) + 1, help="logical CPUs of the local Ray")
    p.add_argument("--loader-workers", type=int, default=1, help="DataLoader processes of the local engine")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=12, help="measured steps per run")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    variants = [(f"local-{t}t", run_local, (t,)) for t in args.threads]
    variants += [(f"ray-1w-{t}t", run_ray, (1, float(t))) for t in args.threads]
    if args.two_workers:
        variants.append(("ray-2w-1t", run_ray, (2, 1.0)))
    commit = train_bench.git_commit()  # now: the code measured, whatever is committed while it runs
    with tempfile.TemporaryDirectory(prefix="ddetr-bench-") as tmp:
        data = make_synthetic_coco(tmp, args.images, 0, seed=0, image_size=tuple(args.image_size)).train_shards
        load_before = os.getloadavg()
        quiet = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        ray.init(address="local", num_cpus=args.ray_cpus, **quiet)
        runs = []
        try:
            for repeat in range(args.repeats):
                for i, (label, run, extra) in enumerate(variants):
                    result = run(args, data, tmp, f"v{i}-{repeat}", *extra)
                    runs.append({**result, "repeat": repeat})
                    print(f"{label} #{repeat}: median period {result['median']['period_s']:.3f} s", flush=True)
        finally:
            ray.shutdown()
        load_after = os.getloadavg()

    best = best_runs(runs)
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "versions": {"torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version()},
        "commit": commit,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "out"}
        | {"preset": "tiny"},
        "runs": runs,
        "summary": {
            "best_median": {v: r["median"] for v, r in best.items()},
            "overhead": overheads(best),
        },
    }
    print_table(report)
    io.atomic_write(args.out, json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
