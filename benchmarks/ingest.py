"""Ingest benchmark: images/s per CPU core at the paper's training augmentation, three pipelines, same JPEGs.

  (a) ``ray_data``: ddetr's Ray Data path as a training worker consumes it (``pipeline.build_ray_dataset`` with the
      run's ``data.map_cpus``, ``iter_torch_batches`` with ``DetrCollateFn``, as ``train/ray_worker.py``), in a
      Ray started with ``num_cpus=N``;
  (b) ``dataloader``: ddetr's torch DataLoader path (``loader.build_dataloader``) with N workers;
  (c) ``official``: fundamentalvision/Deformable-DETR's own ``datasets/coco.py`` + ``datasets/transforms.py``
      (``make_coco_transforms("train")``, ``util.misc.collate_fn``) over the JPEG folder, with a torch DataLoader of
      N workers as its ``main.py`` builds it. Imported from a copy outside this repository named by
      ``DDETR_OFFICIAL_REPO`` (never vendored); skipped with a note when unset.

All three read the same COCO-like folder (``coco_like.py``: COCO's sizes, ~160 KB JPEGs; (a) and (b) through its
Parquet shards, converted once into the cache) with the paper's augmentation (``deformable_detr`` preset: flip,
shorter side 480..800 step 32, longer <= 1333, random resize + crop), two epochs each, batch size 4 (the paper's
per GPU). Each run is a fresh process pinned to the same N cores (``os.sched_setaffinity``; Ray's processes and
DataLoader workers inherit it); the consumer only takes batches (no training step), so the rate is what N cores
can feed. Measured per run:

  * ``images_per_s``: the images of a second, whole epoch over its time, its own start included (a trainer pays it
    every epoch: Ray Data plans and launches a new dataset, the DataLoader forks its workers again);
    ``images_per_s_per_core`` is that over N. The first epoch is no measure of the rate: it holds the start-up, and
    the time after its first batch flatters Ray Data, which decodes ahead while the first batch is on its way;
  * ``time_to_first_batch_s``: from the call that builds the first epoch's dataset/loader to its first batch in hand
    (Ray: ``ray.init`` is outside it and reported as ``ray_init_s``, as a Ray Train worker starts with Ray up);
  * ``peak_rss_mb``: the peak of the summed RSS of the run's process tree (Ray's raylet, GCS and workers, or the
    DataLoader's workers), sampled every 0.25 s; ``peak_pss_mb`` the same in PSS (shared pages counted once, the
    fairer figure for forked workers and Ray's shared-memory object store), sampled every 2 s.

With ``--repeats R`` each path runs R times (interleaved); min/median/max are kept. The official pipeline needs
torchvision (not a ddetr dependency): importable from the venv, or from ``DDETR_TORCHVISION_DIR`` (a folder from
``pip install --no-deps --target DIR torchvision==<the one matching torch>``). A CUDA build of torchvision on a
CPU-only torch cannot load its compiled ops; its pure-Python transforms (all the data path uses) are then imported
without the package's ``__init__`` (``ingest_paths.import_official``).

    DDETR_OFFICIAL_REPO=/tmp/official-ddetr DDETR_TORCHVISION_DIR=/tmp/tv \\
        python benchmarks/ingest.py --images 2000 --cpus 2 --repeats 3

Prints a table and writes ``benchmarks/results/ingest-cpu.json`` (machine, versions, commit, load average,
settings, per path and repeat, ratios ``ray_data_vs_official`` and ``dataloader_vs_official`` of the medians).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from coco_like import write_coco_like  # noqa: E402
from ingest_paths import children  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ingest-cpu.json"
PATHS = ("ray_data", "dataloader", "official")


def prepare(cache: Path, images: int, seed: int) -> tuple[Path, Path]:
    """The COCO-like folder and its converted split in ``cache`` (made once, reused while complete)."""
    folder = cache / f"coco-like-{images}-seed{seed}"
    if not (folder / "annotations.json").exists():
        t = time.perf_counter()
        write_coco_like(folder, images, seed=seed)
        print(f"wrote {images} COCO-like images to {folder} in {time.perf_counter() - t:.0f} s", flush=True)
    split = folder / "shards"
    if not (split / "dataset.json").exists():
        from ddetr.data.convert import convert_coco

        t = time.perf_counter()
        convert_coco(str(folder / "images"), str(folder / "annotations.json"), str(split), progress=False)
        print(f"converted to {split} in {time.perf_counter() - t:.0f} s", flush=True)
    return folder, split


def _kb(path: str, field: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory:
    """Samples the summed RSS (every 0.25 s) and PSS (every 2 s) of a process and all its descendants (Linux
    ``/proc``: ``children``, ``status`` VmRSS, ``smaps_rollup`` Pss)."""

    def __init__(self, pid: int) -> None:
        self.root = pid
        self.peak_rss_kb = self.peak_pss_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        tree, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += children(pid)
        return tree

    def _run(self) -> None:
        turn = 0
        while not self._stop.wait(0.25):
            tree = self._tree()
            self.peak_rss_kb = max(self.peak_rss_kb, sum(_kb(f"/proc/{p}/status", "VmRSS:") for p in tree))
            if turn % 8 == 0:
                self.peak_pss_kb = max(self.peak_pss_kb, sum(_kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in tree))
            turn += 1

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {"peak_rss_mb": round(self.peak_rss_kb / 1024, 1), "peak_pss_mb": round(self.peak_pss_kb / 1024, 1)}


def run_child(path: str, args: argparse.Namespace, folder: Path, split: Path, cores: list[int]) -> dict[str, Any]:
    """One path in a fresh process pinned to ``cores``; its result dict plus the tree's peak memory."""
    cmd = [sys.executable, str(Path(__file__).parent / "ingest_paths.py"), path, str(folder), str(split)]
    cmd += ["--cpus", str(args.cpus), "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    cmd += ["--map-cpus", str(args.map_cpus), "--decode-batch-size", str(args.decode_batch_size)]
    cmd += ["--read-size", str(args.read_size), "--prefetch", str(args.prefetch)]
    cmd += ["--object-store-mb", str(args.object_store_mb), "--max-tasks", str(args.max_tasks)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, preexec_fn=lambda: os.sched_setaffinity(0, cores))
    memory = TreeMemory(proc.pid)
    out, _ = proc.communicate(timeout=args.timeout)
    mem = memory.stop()
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"ingest: the {path} run failed (exit {proc.returncode}); its output:\n{out[-3000:]}")
    return {**json.loads(lines[-1][len("RESULT ") :]), **mem}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per path: the median run's figures, and min/median/max of the rate per core over the repeats."""
    rates = sorted(r["images_per_s_per_core"] for r in runs)
    median = statistics.median(rates)
    keys = ("time_to_first_batch_s", "peak_rss_mb", "peak_pss_mb", "images_per_s", "epoch1_first_batch_s", "ray_init_s",
            "images_per_cpu_s")  # fmt: skip
    out: dict[str, Any] = {"images_per_s_per_core": round(median, 2)}
    for key in keys:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = round(statistics.median(values), 2)
    out["images_per_s_per_core_min_median_max"] = [round(rates[0], 2), round(median, 2), round(rates[-1], 2)]
    out["images"] = runs[0]["images"]
    return out


def machine() -> dict[str, Any]:
    import numpy
    import PIL
    import pyarrow
    import ray
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {
            "torch": torch.__version__,
            "ray": ray.__version__,
            "pillow": PIL.__version__,
            "numpy": numpy.__version__,
            "pyarrow": pyarrow.__version__,
        },
        "commit": commit,
    }


def print_table(summary: dict[str, dict[str, Any]], cpus: int) -> None:
    head = f"{'path':<12}{'img/s/core':>12}{'min..max':>14}{'img/s':>8}{'img/CPU-s':>11}{'1st batch s':>13}"
    print(f"\n{head}{'RSS MB':>9}{'PSS MB':>9}")
    for path, s in summary.items():
        lo, _, hi = s["images_per_s_per_core_min_median_max"]
        print(
            f"{path:<12}{s['images_per_s_per_core']:>12.1f}{f'{lo:.1f}..{hi:.1f}':>14}{s['images_per_s']:>8.1f}"
            f"{s.get('images_per_cpu_s', float('nan')):>11.1f}{s['time_to_first_batch_s']:>13.1f}"
            f"{s['peak_rss_mb']:>9.0f}{s['peak_pss_mb']:>9.0f}"
        )
    print(f"(second epoch, {cpus} cores; medians over repeats; img/CPU-s: images per CPU-second of the process tree)")


def ratios_of(summary: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``A_vs_B``: A's images/s per core over B's (medians); ``A_vs_B_cpu``: the same in images per CPU-second, the
    figure that holds up on a machine other work also uses."""
    out = {}
    for a, b in (("ray_data", "official"), ("dataloader", "official"), ("ray_data", "dataloader")):
        if a in summary and b in summary:
            out[f"{a}_vs_{b}"] = round(summary[a]["images_per_s_per_core"] / summary[b]["images_per_s_per_core"], 3)
            if summary[a].get("images_per_cpu_s") and summary[b].get("images_per_cpu_s"):
                out[f"{a}_vs_{b}_cpu"] = round(summary[a]["images_per_cpu_s"] / summary[b]["images_per_cpu_s"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000, help="COCO-like images in the epoch")
    p.add_argument("--cpus", type=int, default=2, help="cores each path gets (pinned; Ray's num_cpus; workers)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ",".join(PATHS))
    p.add_argument("--cache", type=Path, default=Path("/tmp/ddetr-ingest"), help="where the images and shards go")
    p.add_argument("--map-cpus", type=float, default=None, help="Ray decode task CPUs (default: the config's)")
    p.add_argument("--decode-batch-size", type=int, default=16, help="Ray: images per decoded block")
    p.add_argument("--read-size", type=int, default=128, help="Ray: images one decode task reads (the default)")
    p.add_argument("--prefetch", type=int, default=1, help="Ray: iter_torch_batches prefetch_batches")
    p.add_argument("--object-store-mb", type=int, default=0, help="Ray: Data's object store limit (0: Ray's own)")
    p.add_argument("--max-tasks", type=int, default=0, help="Ray: decode tasks at once (0: the pipeline's cap)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.map_cpus is None:
        from ddetr.config import get_preset

        args.map_cpus = get_preset("deformable_detr").data.map_cpus
    paths = [x for x in args.paths.split(",") if x]
    unknown = set(paths) - set(PATHS)
    if unknown:
        p.error(f"--paths: unknown {sorted(unknown)}; choose from {', '.join(PATHS)}")
    if "official" in paths and not os.environ.get("DDETR_OFFICIAL_REPO"):
        print("note: DDETR_OFFICIAL_REPO is unset: the official pipeline is skipped (see the docstring)")
        paths.remove("official")
    cores = sorted(os.sched_getaffinity(0))[: args.cpus]
    if len(cores) < args.cpus:
        p.error(f"--cpus {args.cpus}: this process may run on {len(cores)} cores only")
    folder, split = prepare(args.cache, args.images, args.seed)
    measured = machine()  # the commit measured is the one checked out at the start
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {path: [] for path in paths}
    for repeat in range(args.repeats):
        for path in paths:
            result = run_child(path, args, folder, split, cores)
            print(
                f"repeat {repeat + 1}/{args.repeats} {path}: {result['images_per_s_per_core']:.1f} img/s/core, "
                f"first batch {result['time_to_first_batch_s']:.1f} s, RSS {result['peak_rss_mb']:.0f} MB",
                flush=True,
            )
            runs[path].append(result)
    summary = {path: summarize(r) for path, r in runs.items()}
    print_table(summary, args.cpus)
    ratios = ratios_of(summary)
    print(" ".join(f"{k}={v}" for k, v in ratios.items()))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
    result = {
        "benchmark": "ingest",
        "machine": measured,
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "settings": {**settings, "cores": cores, "augmentation": "deformable_detr preset (paper)"},
        "paths": summary,
        **ratios,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
