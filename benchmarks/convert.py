"""`ddetr data convert` over COCO-like folders of two sizes: images/s, images per CPU-second, peak memory.

    python benchmarks/convert.py                                   # 2,000 and 20,000 images, 1 and all-core workers
    python benchmarks/convert.py --sizes 500 2000 --workers 1 2 --data /tmp/ddetr-convert-bench

Each size's folder is written once by `benchmarks/coco_like.py` under `--data` (kept, and reused when it holds
the same number of images: 20,000 images are ~3 GB and take minutes to write) and converted by the command line,
`python -m ddetr.cli data convert --workers W`, as a child process into a fresh output folder. While it runs, the
process tree (the command and its shard-writing processes) is sampled every 50 ms from /proc: the peak of the summed
RSS (shared pages counted once per process) and of the summed PSS (shared pages split between them). CPU time is the
tree's user + system time (getrusage of the waited children). The images were just written or read, so they come
from the page cache: this measures the converter, not the disk.

Memory flat in the dataset size means the peak at the larger size is about the peak at the smaller one. The
summary gives the difference per 1,000 images and, as an upper bound, its linear extrapolation to COCO train2017
(118,287 images): the difference also holds the shard phase's fluctuation (the allocator keeps what a shard
freed; the peak over 40 shards is the highest of more draws than over 4), which does not grow on.
Runs alternate over worker counts within each repeat. Prints a table and writes benchmarks/results/convert-cpu.json
with the machine, versions, commit, load average and settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from coco_like import write_coco_like  # noqa: E402 - benchmarks/coco_like.py, beside this script

from ddetr import io  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "convert-cpu.json"
COCO_TRAIN_IMAGES = 118_287
PAGE = os.sysconf("SC_PAGE_SIZE")


def ensure_folder(root: Path, n_images: int) -> Path:
    """`root/coco-like-N` holding N COCO-like images and their annotations.json (written unless already there)."""
    folder = root / f"coco-like-{n_images}"
    annotations = folder / "annotations.json"
    if annotations.exists() and len(json.loads(annotations.read_text())["images"]) == n_images:
        return folder
    start = time.perf_counter()
    write_coco_like(folder, n_images)
    print(f"wrote {n_images} COCO-like images to {folder} in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, from /proc/*/stat."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # ended meanwhile
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of one process in MB; (0, 0) once it has ended."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["Rss"].split()[0]) / 1024, int(fields["Pss"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return 0.0, 0.0


class TreeMemory:
    """Peak summed RSS and PSS of a process tree, sampled every `interval_s` in a thread until `stop`."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.peak_rss_mb = self.peak_pss_mb = self.peak_root_rss_mb = 0.0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            tree = descendants(self.pid)
            sizes = [memory_mb(p) for p in tree]
            self.peak_rss_mb = max(self.peak_rss_mb, sum(r for r, _ in sizes))
            self.peak_pss_mb = max(self.peak_pss_mb, sum(p for _, p in sizes))
            self.peak_root_rss_mb = max(self.peak_root_rss_mb, sizes[0][0])
            self.peak_processes = max(self.peak_processes, sum(1 for r, _ in sizes if r > 0))
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def convert_once(folder: Path, out: Path, workers: int, shard_size: int) -> dict:
    """One `ddetr data convert` of `folder` into a fresh `out`, as a child process: its time, CPU and memory."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "ddetr.cli", "data", "convert", "--images", str(folder / "images"),
        "--annotations", str(folder / "annotations.json"), "--out", str(out), "--workers", str(workers),
        "--shard-size", str(shard_size),
    ]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    memory = TreeMemory(child.pid)
    output, _ = child.communicate()
    wall = time.perf_counter() - start
    memory.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({child.returncode}):\n{output}")
    meta = json.loads((out / "dataset.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    n = meta["num_images"]
    return {
        "images": n,
        "workers": workers,
        "wall_s": wall,
        "cpu_s": cpu,
        "images_per_s": n / wall,
        "images_per_cpu_s": n / cpu,
        "peak_tree_rss_mb": memory.peak_rss_mb,
        "peak_tree_pss_mb": memory.peak_pss_mb,
        "peak_main_rss_mb": memory.peak_root_rss_mb,
        "processes": memory.peak_processes,
        "shards": len(meta["shards"]),
        "output_mb": sum(f.stat().st_size for f in out.iterdir()) / 2**20,
    }


def summarise(runs: list[dict], sizes: list[int], workers: list[int]) -> dict:
    """Per (size, workers): the median run; memory growth between the sizes; COCO train's time extrapolated."""
    cells = {}
    for n in sizes:
        for w in workers:
            mine = [r for r in runs if r["images"] == n and r["workers"] == w]
            if mine:
                cells[f"{n}x{w}"] = {
                    k: statistics.median(r[k] for r in mine)
                    for k in ("images_per_s", "images_per_cpu_s", "peak_tree_rss_mb", "peak_tree_pss_mb", "wall_s")
                }
    growth = {}
    small, large = min(sizes), max(sizes)
    for w in workers:
        a, b = cells.get(f"{small}x{w}"), cells.get(f"{large}x{w}")
        if a and b and large > small:
            per_image = (b["peak_tree_pss_mb"] - a["peak_tree_pss_mb"]) / (large - small)
            growth[str(w)] = {
                "pss_mb_per_1000_images": 1000 * per_image,
                "coco_train_peak_pss_mb_linear_upper_bound": b["peak_tree_pss_mb"]
                + per_image * (COCO_TRAIN_IMAGES - large),
                "coco_train_minutes_at_this_rate": COCO_TRAIN_IMAGES / b["images_per_s"] / 60,
            }
    return {"median": cells, "memory_growth": growth}


def print_table(report: dict) -> None:
    print(f"\n{'images':>7} {'workers':>7} {'wall s':>8} {'img/s':>7} {'img/cpu-s':>9} {'RSS MB':>8} {'PSS MB':>8}")
    for r in report["runs"]:
        print(
            f"{r['images']:>7} {r['workers']:>7} {r['wall_s']:>8.1f} {r['images_per_s']:>7.0f} "
            f"{r['images_per_cpu_s']:>9.0f} {r['peak_tree_rss_mb']:>8.0f} {r['peak_tree_pss_mb']:>8.0f}"
        )
    for w, g in report["summary"]["memory_growth"].items():
        print(
            f"workers {w}: peak PSS {g['pss_mb_per_1000_images']:+.1f} MB per 1,000 images more; COCO train "
            f"(118,287 images) ~{g['coco_train_minutes_at_this_rate']:.0f} min at this rate, "
            f"at most ~{g['coco_train_peak_pss_mb_linear_upper_bound']:.0f} MB peak"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000], help="images per folder")
    p.add_argument("--workers", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--data", type=Path, default=Path("/tmp/ddetr-convert-bench"), help="where the folders go")
    p.add_argument("--keep-output", action="store_true", help="keep the converted shards (else removed)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()

    # Now: the code measured, whatever is committed while it runs.
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    folders = {n: ensure_folder(args.data, n) for n in args.sizes}
    load_before = os.getloadavg()
    runs = []
    for repeat in range(args.repeats):
        for n in args.sizes:
            for w in args.workers:
                result = convert_once(folders[n], args.data / f"shards-{n}", w, args.shard_size)
                runs.append({**result, "repeat": repeat})
                print(f"{n} images, {w} workers: {result['images_per_s']:.0f} img/s", flush=True)
    if not args.keep_output:
        for n in args.sizes:
            shutil.rmtree(args.data / f"shards-{n}", ignore_errors=True)
    load_after = os.getloadavg()
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "versions": {"python": platform.python_version(), "pyarrow": pyarrow.__version__, "pillow": Image.__version__},
        "commit": commit,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"}
        | {"image_source": "benchmarks/coco_like.py (seed 0, quality 90)", "page_cache": "warm"},
        "runs": runs,
        "summary": summarise(runs, args.sizes, args.workers),
    }
    print_table(report)
    io.atomic_write(args.out, json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
