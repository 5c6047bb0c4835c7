"""Data pipeline benchmark: Ray Data against a plain torch DataLoader over the same shards.

Both decode and augment the same synthetic COCO (JPEGs larger than the training scale, so the
reduced-size decoding path is exercised) with the same transforms and collate. Measured:

  * throughput, images/s, per pipeline, end to end (cold: includes worker start-up) and warm
    (from the second batch on), for a cold and a warm epoch;
  * the consumer's wait per step: a simulated training step (``time.sleep(step)``, standing for a
    GPU step that leaves the CPUs to the pipeline) after each batch, and the time spent blocked in
    ``next(batch)``, as a fraction of the step time, over the warm part of an epoch.

    python benchmarks/data.py --images 1200 --cpus 2

Prints a table and writes ``benchmarks/results/data-cpu.json`` (machine, versions, commit, settings).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
import torch  # noqa: E402
from ray.data import DataContext  # noqa: E402

from ddetr.data.loader import build_dataloader  # noqa: E402
from ddetr.data.pipeline import DetrCollateFn, build_ray_dataset  # noqa: E402
from ddetr.data.synthetic import make_synthetic_coco  # noqa: E402
from ddetr.data.transforms import TransformConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "data-cpu.json"


def timed_epoch(batches: Iterable[dict], step_s: float) -> dict[str, float]:
    """Consume one epoch; per batch, the wait in next() and then a simulated step of ``step_s``."""
    start = time.perf_counter()
    waits, sizes, first = [], [], None
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        waits.append(time.perf_counter() - t0)
        sizes.append(len(batch["targets"]))
        if first is None:
            first = time.perf_counter() - start
            warm_start = time.perf_counter()
        if step_s:
            time.sleep(step_s)
    total = time.perf_counter() - start
    warm_images = sum(sizes[1:])
    warm_time = time.perf_counter() - warm_start
    # "Warm" leaves out the first quarter of the batches for the wait statistic (pipelines fill up).
    tail = waits[len(waits) // 4 :]
    return {
        "images": sum(sizes),
        "seconds": total,
        "first_batch_s": first or 0.0,
        "img_per_s": sum(sizes) / total,
        "warm_img_per_s": warm_images / warm_time if warm_time > 0 else 0.0,
        "wait_mean_s": sum(tail) / max(len(tail), 1),
        "wait_frac_of_step": (sum(tail) / max(len(tail), 1)) / step_s if step_s else float("nan"),
    }


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    root = args.data or tempfile.mkdtemp(prefix="ddetr-bench-")
    if not os.path.exists(os.path.join(root, "shards", "train", "dataset.json")):
        make_synthetic_coco(root, args.images, 8, seed=0, image_size=tuple(args.image_size), shard_size=args.shard_size)
    split = os.path.join(root, "shards", "train")
    cfg = TransformConfig().scaled(args.scale)
    results: dict[str, dict] = {}

    for step in (0.0, args.step):
        for epoch in (0, 1):
            loader = build_dataloader(
                split, cfg, train=True, batch_size=args.batch, seed=0, epoch=epoch, num_workers=args.cpus
            )
            results[f"dataloader/step={step}/epoch={epoch}"] = timed_epoch(loader, step)

    ray.init(
        num_cpus=args.cpus,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        object_store_memory=512 * 1024 * 1024,
    )
    DataContext.get_current().enable_progress_bars = False
    for map_cpus in args.map_cpus:
        for step in (0.0, args.step):
            for epoch in (0, 1):
                ds = build_ray_dataset(
                    split, cfg, train=True, seed=0, epoch=epoch, num_cpus=map_cpus, decode_batch_size=args.decode_batch
                )
                batches = ds.iter_torch_batches(
                    batch_size=args.batch, collate_fn=DetrCollateFn(), drop_last=True, prefetch_batches=args.prefetch
                )
                results[f"ray(map_cpus={map_cpus})/step={step}/epoch={epoch}"] = timed_epoch(batches, step)
    ray.shutdown()
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": _cpu_model(),
            "cpus_total": os.cpu_count(),
            "load_avg_at_end": os.getloadavg(),
        },
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "ray": ray.__version__},
        "commit": _commit(),
        "settings": {
            "images": args.images,
            "image_size": args.image_size,
            "scale": args.scale,
            "batch": args.batch,
            "cpus": args.cpus,
            "map_cpus": args.map_cpus,
            "decode_batch": args.decode_batch,
            "shard_size": args.shard_size,
            "step_s": args.step,
            "prefetch": args.prefetch,
            "transform": {"scales": list(cfg.scales), "max_size": cfg.max_size},
        },
        "results": results,
    }


def print_table(report: dict) -> None:
    print(
        f"{'pipeline / step / epoch':40s} {'img/s':>8s} {'warm img/s':>10s} {'1st batch s':>11s} "
        f"{'wait ms':>8s} {'wait/step':>9s}"
    )
    for name, r in report["results"].items():
        frac = r["wait_frac_of_step"]
        print(
            f"{name:40s} {r['img_per_s']:8.1f} {r['warm_img_per_s']:10.1f} {r['first_batch_s']:11.2f} "
            f"{1000 * r['wait_mean_s']:8.1f} {'' if frac != frac else f'{100 * frac:8.1f}%':>9s}"
        )


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown (no commit)"


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1200)
    p.add_argument("--image-size", type=int, nargs=2, default=[320, 480], help="min max side of the JPEGs")
    p.add_argument("--scale", type=float, default=0.2, help="TransformConfig().scaled(scale)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--map-cpus", type=float, nargs="+", default=[0.5, 1.0], help="num_cpus of a Ray decode task")
    p.add_argument("--decode-batch", type=int, default=16, help="images per decoded block in Ray Data")
    p.add_argument("--shard-size", type=int, default=100)
    p.add_argument("--step", type=float, default=0.25, help="simulated training step, seconds")
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--data", help="reuse a synthetic dataset directory")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    report = run(args)
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
