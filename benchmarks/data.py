"""Data pipeline benchmark: Ray Data against a plain torch DataLoader over the same shards.

Both decode and augment the same synthetic COCO (JPEGs larger than the training scale, so the
reduced-size decoding path is exercised) with the same transforms and collate. Measured:

  * throughput, images/s, per pipeline, end to end (cold: includes worker start-up) and warm
    (from the second batch on), for a cold and a warm epoch;
  * the consumer's wait per step: a simulated training step (``time.sleep(step)``, standing for a
    GPU step that leaves the CPUs to the pipeline) after each batch, and the time spent blocked in
    ``next(batch)``, as a fraction of the step time, over the warm part of an epoch;
  * bytes read from the store per epoch, summed over ranks, against the shards' size, for 1, 2 and 4
    workers (each rank a fresh process: its own footer reads): before (every rank read every shard
    whole, the previous pipeline), and now with ``deal_size`` 1 and the per-worker batch.

  * images/s of the DataLoader over the same shards in an S3 server on loopback (moto's server mode, reached
    through `AWS_ENDPOINT_URL` as any S3-compatible store) against local disk, in the same run.

    python benchmarks/data.py --images 1200 --cpus 2
    python benchmarks/data.py --bytes-only      # just the bytes table, merged into the JSON
    python benchmarks/data.py --s3-only         # just S3 against local disk, merged into the JSON
    python benchmarks/data.py --stall-only      # just the checkpoint stall (`checkpoint_upload.py`), merged

  * the step stall at a checkpoint of ddetr's Ray Train loop, uploaded synchronously or asynchronously to the S3
    server, and to a local folder (`checkpoint_upload.py`).

Prints a table and writes ``benchmarks/results/data-cpu.json`` (machine, versions, commit, settings).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pyarrow as pa  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from checkpoint_upload import checkpoint_stall, print_stall_table  # noqa: E402
from ray.data import DataContext  # noqa: E402

from ddetr import io  # noqa: E402
from ddetr.data import decode, shards  # noqa: E402
from ddetr.data.loader import ShardDataset, build_dataloader  # noqa: E402
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


class _CountingFile:
    def __init__(self, f, counts: dict[str, int]) -> None:
        self.f, self.counts = f, counts

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.counts["bytes"] += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.f.close()

    @property
    def closed(self) -> bool:
        return self.f.closed

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


class CountingStore(pafs.FileSystemHandler):
    """The local filesystem, counting the bytes read from ``.parquet`` files (read-only)."""

    def __init__(self) -> None:
        self.local, self.counts = pafs.LocalFileSystem(), {"bytes": 0}

    def _open(self, path: str):
        f = open(path, "rb")
        return pa.PythonFile(_CountingFile(f, self.counts) if path.endswith(".parquet") else f, mode="r")

    def open_input_file(self, path):
        return self._open(path)

    def open_input_stream(self, path):
        return self._open(path)

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def get_type_name(self):
        return "counting"

    def equals(self, other):
        return self is other

    def normalize_path(self, path):
        return path

    def _read_only(self, *args, **kwargs):
        raise OSError("read-only benchmark store")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = _read_only
    move = copy_file = open_output_stream = open_append_stream = _read_only


def bytes_read(split: str, cfg: TransformConfig, batch: int, workers: list[int]) -> dict[str, dict]:
    """Bytes read from the store for one training epoch, summed over ranks, / the shards' size."""
    total = sum(f.size for f in shards.open_split(split).footers if f is not None)
    out = {}
    for w in workers:
        row = {}
        for name, deal in (("before", None), ("deal_size=1", 1), (f"deal_size={batch}", batch)):
            store = CountingStore()
            fs = pafs.PyFileSystem(store)
            images = 0
            for rank in range(w):
                shards._splits.clear()  # each rank in its own process: its own footer reads
                decode._footers.clear()
                decode._parsed.clear()
                if deal is None:  # the previous pipeline: each rank read every shard whole, kept 1/W of its rows
                    for uri in shards.open_split(split, filesystem=fs).uris:
                        images += shards.read_shard(uri, list(decode.ROW_COLUMNS), filesystem=fs).num_rows // w
                    continue
                ds = ShardDataset(
                    split, cfg, train=True, rank=rank, world_size=w, chunk=batch, deal_size=deal, filesystem=fs
                )
                images += sum(1 for _ in ds)
            row[name] = {"ratio": store.counts["bytes"] / total, "bytes": store.counts["bytes"], "images": images}
        out[f"workers={w}"] = row
    return {"shard_bytes": total, "batch": batch, "row_group_size": shards.ROW_GROUP_SIZE, "results": out}


def start_s3_server() -> subprocess.Popen:
    """moto's S3 server on a free loopback port, with a bucket "bench" and the AWS variables pointing at it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            time.sleep(0.2)
    try:
        pafs.FileSystem.from_uri("s3://bench?allow_bucket_creation=true")[0].create_dir("bench")
    except BaseException:
        server.terminate()
        raise
    return server


def s3_against_local(split: str, cfg: TransformConfig, batch: int, cpus: int) -> dict:
    """DataLoader images/s over the shards on local disk and in the S3 server, two epochs each."""
    server = start_s3_server()
    try:
        remote = "s3://bench/shards/train"
        tick = time.perf_counter()
        io.copy(split, remote)
        upload_s = time.perf_counter() - tick
        out: dict = {"upload_s": upload_s, "shard_bytes": sum(f.size for f in shards.open_split(split).footers if f)}
        for where, uri in (("local", split), ("s3", remote)):
            for epoch in (0, 1):
                shards._splits.clear()  # the footers are read again from this store
                decode._footers.clear()
                decode._parsed.clear()
                loader = build_dataloader(uri, cfg, train=True, batch_size=batch, seed=0, epoch=epoch, num_workers=cpus)
                out[f"{where}/epoch={epoch}"] = timed_epoch(loader, 0.0)
        return out
    finally:
        server.terminate()
        server.wait()


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    root = args.data or tempfile.mkdtemp(prefix="ddetr-bench-")
    if not os.path.exists(os.path.join(root, "shards", "train", "dataset.json")):
        make_synthetic_coco(root, args.images, 8, seed=0, image_size=tuple(args.image_size), shard_size=args.shard_size)
    split = os.path.join(root, "shards", "train")
    cfg = TransformConfig().scaled(args.scale)
    if args.stall_only:
        server = start_s3_server()
        try:
            stall = checkpoint_stall(root, steps=16, every=4, workers=2, scale=args.scale)
        finally:
            server.terminate()
            server.wait()
        return {"stall_commit": _commit(), "checkpoint_stall": stall, "stall_load_avg_at_end": os.getloadavg()}
    if args.s3_only:
        return {"s3_commit": _commit(), "s3_vs_local": s3_against_local(split, cfg, args.batch, args.cpus),
                "s3_settings": _settings(args, cfg), "s3_load_avg_at_end": os.getloadavg()}  # fmt: skip
    reads = bytes_read(split, cfg, args.batch, [1, 2, 4])
    if args.bytes_only:
        return {"commit": _commit(), "bytes_read": reads, "bytes_read_settings": _settings(args, cfg)}
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
        "settings": _settings(args, cfg),
        "results": results,
        "bytes_read": reads,
    }


def _settings(args: argparse.Namespace, cfg: TransformConfig) -> dict:
    return {
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
    }


def print_bytes_table(reads: dict) -> None:
    print(f"bytes read per epoch / shards' size ({reads['shard_bytes'] / 1e6:.1f} MB), summed over ranks")
    names = list(next(iter(reads["results"].values())))
    print(f"{'workers':10s}" + "".join(f"{n:>16s}" for n in names))
    for w, row in reads["results"].items():
        print(f"{w:10s}" + "".join(f"{row[n]['ratio']:15.3f}x" for n in names))


def print_s3_table(s3: dict) -> None:
    print(f"DataLoader over the same shards ({s3['shard_bytes'] / 1e6:.1f} MB; upload to S3 {s3['upload_s']:.1f} s)")
    print(f"{'store / epoch':20s} {'img/s':>8s} {'1st batch s':>11s}")
    for name, r in s3.items():
        if isinstance(r, dict):
            print(f"{name:20s} {r['img_per_s']:8.1f} {r['first_batch_s']:11.2f}")


def print_table(report: dict) -> None:
    if "checkpoint_stall" in report and "bytes_read" not in report:
        print_stall_table(report["checkpoint_stall"])
        return
    if "s3_vs_local" in report and "bytes_read" not in report:
        print_s3_table(report["s3_vs_local"])
        return
    if "results" not in report:
        print_bytes_table(report["bytes_read"])
        return
    print_bytes_table(report["bytes_read"])
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
    p.add_argument("--bytes-only", action="store_true", help="only the bytes-read table, merged into --out")
    p.add_argument("--s3-only", action="store_true", help="only S3 server against local disk, merged into --out")
    p.add_argument("--stall-only", action="store_true", help="only the checkpoint stall, merged into --out")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    report = run(args)
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if (args.bytes_only or args.s3_only or args.stall_only) and args.out.exists():
        report = {**json.loads(args.out.read_text()), **report}
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
