"""Throughput of Ray Train (2 workers, gloo, Ray Data) against the plain single-process engine at the same batch.

    python benchmarks/train.py                      # tiny preset, local batch 4 vs 2 Ray workers x batch 2
    python benchmarks/train.py --steps 20 --repeats 2

Both variants run `ddetr.train` end to end on the same synthetic dataset: the plain engine (`LocalRuntime`,
a torch DataLoader) with batch B, and a `TorchTrainer` with W workers of batch B / W each, so an optimizer step
sees the same images. Per-step times come from the run's own step log (rank 0's `step_s`: data wait + forward +
backward + gradient all-reduce + optimizer step); the first `--warmup` steps are left out of the steady state.
Start-up is reported apart: for Ray, `ray.init`, then `fit()` to the end of the first step (worker group, gloo,
the first Ray Data batch, the first step), split at rank 0's training loop asking for data and at its first batch
(from its first step record: its end, its time and its data wait); for the plain engine, the call to the end of its
first step.
Variants alternate run by run. Prints a table and writes benchmarks/results/train-cpu.json with the machine,
versions, commit, load and settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from ddetr import io
from ddetr.config import Config, apply_overrides, get_preset
from ddetr.data.synthetic import make_synthetic_coco
from ddetr.train.local import LocalRuntime
from ddetr.train.logbook import read_metrics
from ddetr.train.loop import fit

RESULTS = Path(__file__).parent / "results" / "train-cpu.json"


def base_config(args: argparse.Namespace, data: str, storage: str, name: str, *overrides: str) -> Config:
    return apply_overrides(
        get_preset("tiny"),
        [
            f"data.train={data}",
            f"data.scale={args.scale}",
            "train.epochs=1",
            f"train.max_steps_per_epoch={args.warmup + args.steps}",
            "train.log_every=1000",
            f"train.storage_path={storage}",
            f"train.name={name}",
            *overrides,
        ],
    )


def step_times(run_dir: Path) -> tuple[list[float], list[float], float]:
    """(step_s per step, data_wait_s per step, unix time at the end of the first step) from rank 0's log."""
    steps = [r for r in read_metrics(run_dir) if r["kind"] == "step" and "step_s" in r]
    return [r["step_s"] for r in steps], [r["data_wait_s"] for r in steps], steps[0]["unix_time"]


def run_local(args: argparse.Namespace, data: str, storage: str, name: str, threads: int) -> dict:
    cfg = base_config(
        args, data, storage, name, f"train.batch_size={args.batch}", f"data.loader_workers={args.loader_workers}"
    )
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    start = time.time()
    runtime = LocalRuntime(cfg, device="cpu")
    try:
        fit(cfg, runtime)
    finally:
        runtime.close()
        torch.set_num_threads(default_threads)
    total = time.time() - start
    steps, waits, first = step_times(Path(storage) / name)
    startup = {"to_first_step_s": first - start}
    return summarise(f"plain-{threads}t", steps, waits, args, startup=startup, total=total)


def run_ray(args: argparse.Namespace, data: str, storage: str, name: str, threads: int) -> dict:
    """`threads` is set by the workers themselves, one per CPU they hold (`ray_train.set_torch_threads`)."""
    from ddetr.train.ray_train import build_trainer

    per_worker = args.batch // args.workers
    cfg = base_config(
        args,
        data,
        storage,
        name,
        f"train.batch_size={per_worker}",
        f"train.num_workers={args.workers}",
        f"train.cpus_per_worker={args.cpus_per_worker}",
        f"data.map_cpus={args.map_cpus}",
    )
    start = time.time()
    result = build_trainer(apply_overrides(cfg, ["train.controller_failure_limit=0"])).fit()
    total = time.time() - start
    if result.error is not None:
        raise result.error
    steps, waits, first = step_times(Path(storage) / name)
    # Rank 0's first step record: its end, the step's time and the part of it spent waiting for the first batch.
    first_batch = first - (steps[0] - waits[0])
    startup = {
        "fit_to_first_step_s": first - start,
        "fit_to_first_batch_s": first_batch - start,
        "fit_to_loop_s": first_batch - waits[0] - start,  # controller, worker group, gloo, model, restore
        "loop_to_first_batch_s": waits[0],  # the epoch's dataset built, its first decode task, the first batch
    }
    return summarise("ray", steps, waits, args, startup=startup, total=total)


def summarise(engine: str, steps: list[float], waits: list[float], args, startup: dict, total: float) -> dict:
    steady, steady_wait = steps[args.warmup :], waits[args.warmup :]
    mean = statistics.fmean(steady)
    return {
        "engine": engine,
        "steps_measured": len(steady),
        "step_s_mean": mean,
        "step_s_median": statistics.median(steady),
        "data_wait_s_mean": statistics.fmean(steady_wait),
        "steps_per_s": 1 / mean,
        "images_per_s": args.batch / mean,
        "first_step_s": steps[0],
        "startup": startup,
        "fit_total_s": total,
        "step_s_all": steps,
    }


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def print_table(report: dict) -> None:
    print(f"\n{'run':<12} {'step s':>8} {'median':>8} {'wait s':>8} {'steps/s':>8} {'img/s':>7} {'startup s':>10}")
    for r in report["runs"]:
        startup = next(iter(r["startup"].values()))
        print(
            f"{r['engine'] + ' #' + str(r['repeat']):<12} {r['step_s_mean']:>8.3f} {r['step_s_median']:>8.3f} "
            f"{r['data_wait_s_mean']:>8.3f} {r['steps_per_s']:>8.2f} {r['images_per_s']:>7.2f} {startup:>10.1f}"
        )
    s = report["summary"]
    print(f"ray.init: {report['ray_init_s']:.1f} s; steady-state Ray overhead (median step time, best run of each)")
    for engine, pct in s["ray_overhead_pct"].items():
        print(f"  against {engine}: {pct:+.1f}%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=160)
    p.add_argument("--image-size", type=int, nargs=2, default=[128, 192], help="min max side of the JPEGs")
    p.add_argument("--scale", type=float, default=0.2, help="data.scale")
    p.add_argument("--batch", type=int, default=4, help="images per optimizer step, both engines")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--map-cpus", type=float, default=0.5, help="CPUs per Ray Data decode task")
    p.add_argument("--loader-workers", type=int, default=1, help="DataLoader processes of the plain engine")
    p.add_argument(
        "--plain-threads",
        type=int,
        nargs="+",
        default=[torch.get_num_threads(), 1],
        help="torch intra-op threads of the plain engine, one variant each",
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=12, help="measured steps per run")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    with tempfile.TemporaryDirectory(prefix="ddetr-bench-") as tmp:
        data = make_synthetic_coco(tmp, args.images, 0, seed=0, image_size=tuple(args.image_size)).train_shards
        load_before = os.getloadavg()
        t = time.time()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray_init_s = time.time() - t
        runs = []
        variants = [(run_local, t) for t in dict.fromkeys(args.plain_threads)] + [(run_ray, 1)]
        for repeat in range(args.repeats):
            for i, (run, threads) in enumerate(variants):
                result = run(args, data, tmp, f"v{i}-{repeat}", threads)
                runs.append({**result, "repeat": repeat})
        ray.shutdown()
        load_after = os.getloadavg()

    best = {
        e: min(r["step_s_median"] for r in runs if r["engine"] == e) for e in dict.fromkeys(r["engine"] for r in runs)
    }
    ray_best = best.pop("ray")
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "versions": {"torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version()},
        "commit": git_commit(),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "out"}
        | {"preset": "tiny", "torch_threads_driver": torch.get_num_threads()},
        "ray_init_s": ray_init_s,
        "runs": runs,
        "summary": {
            "best_median_step_s": best | {"ray": ray_best},
            "ray_overhead_pct": {e: 100 * (ray_best / s - 1) for e, s in best.items()},
        },
    }
    print_table(report)
    io.atomic_write(args.out, json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
