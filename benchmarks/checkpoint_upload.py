"""The step stall at a checkpoint: ddetr's Ray Train loop with its run folder in an S3 server (moto's server mode on
loopback), checkpoints uploaded synchronously (every rank waits while rank 0 uploads) or asynchronously (the
upload runs beside the next steps), and a local run folder for reference, in the same run.

Measured from the run's own step log (metrics.jsonl, one record per optimizer step, written by rank 0): the
interval from a checkpointed step to the next one, against the median interval between other steps. Run through
`benchmarks/data.py --stall-only`, which merges the result into `benchmarks/results/data-cpu.json`.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time

import pyarrow.fs as pafs

from ddetr import io
from ddetr.config import build_config
from ddetr.train.checkpoints import checkpoint_name, run_dir
from ddetr.train.logbook import read_metrics

BUCKET_RUNS = "s3://bench/runs"


def folder_bytes(uri: str) -> int:
    fs, inner = io.resolve(uri)
    return sum(f.size or 0 for f in fs.get_file_info(pafs.FileSelector(inner, recursive=True)) if f.is_file)


def step_intervals(run: str) -> dict[int, float]:
    """step -> seconds since the previous step's record, from the run's step log."""
    times = {r["step"]: r["unix_time"] for r in read_metrics(run) if r["kind"] == "step"}
    return {s: times[s] - times[s - 1] for s in sorted(times) if s - 1 in times}


def checkpoint_stall(data: str, *, steps: int, every: int, workers: int, scale: float) -> dict:
    """One short run per (store, upload mode); the stall each checkpoint adds to the step after it."""
    from ddetr.train.ray_train import build_trainer, init_local_ray

    init_local_ray()  # after the S3 server's variables are set: every worker of this Ray inherits them
    local = tempfile.mkdtemp(prefix="ddetr-stall-")
    results: dict[str, dict] = {}
    for store, storage, mode in (("s3", BUCKET_RUNS, "sync"), ("s3", BUCKET_RUNS, "async"), ("local", local, "sync")):
        name = f"stall-{store}-{mode}-{int(time.time())}"
        cfg = build_config(
            "tiny",
            data,
            [
                "data.val=",  # no validation: the epoch's end is the last step
                f"data.scale={scale}",
                f"train.storage_path={storage}",
                f"train.name={name}",
                f"train.checkpoint_upload={mode}",
                f"train.checkpoint_every_steps={every}",
                f"train.max_steps_per_epoch={steps}",
                "train.epochs=1",
                f"train.num_workers={workers}",
                "train.cpus_per_worker=0.5",
                f"train.keep_checkpoints={steps // every + 1}",
            ],
        )
        tick = time.perf_counter()
        result = build_trainer(cfg).fit()
        seconds = time.perf_counter() - tick
        if result.error is not None:
            raise RuntimeError(f"the {store}/{mode} run failed: {result.error}")
        run = run_dir(storage, name)
        intervals = step_intervals(run)
        after = [t for s, t in intervals.items() if (s - 1) % every == 0]
        others = [t for s, t in intervals.items() if (s - 1) % every != 0]
        step_s = statistics.median(others)
        results[f"{store}/{mode}"] = {
            "checkpoint_mb": folder_bytes(io.join(run, checkpoint_name(every))) / 1e6,
            "checkpoints_mid_run": len(after),
            "step_s_median": step_s,
            "step_after_checkpoint_s": statistics.mean(after),
            "stall_s": statistics.mean(after) - step_s,
            "run_s": seconds,
        }
    shutil.rmtree(local, ignore_errors=True)
    return {"settings": {"steps": steps, "checkpoint_every_steps": every, "workers": workers, "scale": scale,
                         "preset": "tiny"}, "results": results}  # fmt: skip


def print_stall_table(stall: dict) -> None:
    s = stall["settings"]
    print(f"step stall at a checkpoint: {s['workers']} Ray workers, {s['steps']} steps, a checkpoint every "
          f"{s['checkpoint_every_steps']} (preset {s['preset']})")  # fmt: skip
    print(f"{'store/upload':14s} {'ckpt MB':>8s} {'step s':>7s} {'after ckpt s':>12s} {'stall s':>8s} {'run s':>6s}")
    for name, r in stall["results"].items():
        print(f"{name:14s} {r['checkpoint_mb']:8.1f} {r['step_s_median']:7.2f} {r['step_after_checkpoint_s']:12.2f} "
              f"{r['stall_s']:8.2f} {r['run_s']:6.1f}")  # fmt: skip
