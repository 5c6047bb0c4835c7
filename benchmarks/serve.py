"""Online detection benchmark: the Ray Serve application against a plain in-process predict loop.

The same tiny-preset checkpoint (freshly initialised: the work per image does not depend on the weights) and the
same JPEG images on both sides, on the CPU:

  * in-process: decode + `Detector.predict` one image at a time (the plain loop), and in batches of
    --max-batch-size (what batching can reach without HTTP and Serve);
  * Serve: `ddetr serve`'s application (one replica on all of Ray's CPUs, so both sides have the same threads),
    loaded from a second process on loopback: a fixed number of requests (--requests) at each concurrency level
    (--concurrency), each client thread sending its next request when the last one is answered (closed loop).

Measured per row: requests/s, latency p50/p95/p99, errors (any answer but 200: there must be none) and, for Serve,
the batches the replica formed (its GET /healthz counters, before and after the level).

    python benchmarks/serve.py                  # 64 requests at concurrency 1, 4 and 8; batch waits 10 and 50 ms
    python benchmarks/serve.py --requests 32 --concurrency 1 8 --batch-wait-s 0.02

Prints a table and writes ``benchmarks/results/serve-cpu.json`` (machine, versions, commit, settings, rows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ddetr.deploy.serve import ServeSettings

RESULTS = Path(__file__).parent / "results" / "serve-cpu.json"


def percentiles(latencies: list[float]) -> dict[str, float]:
    values = np.asarray(latencies) * 1e3
    return {f"p{q}_ms": round(float(np.percentile(values, q)), 1) for q in (50, 95, 99)}


# ---- the load, from its own process ------------------------------------------------------------------------------


def client(url: str, images: list[bytes], requests: int, concurrency: int) -> dict[str, object]:
    """Send `requests` POSTs to `url` from `concurrency` threads; latencies of the good ones, count of the rest."""
    latencies: list[float] = []
    errors: list[str] = []
    next_index = iter(range(requests))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            request = urllib.request.Request(url, data=images[i % len(images)], method="POST")
            request.add_header("Content-Type", "image/jpeg")
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    json.loads(response.read())
                    ok = response.status == 200
            except Exception as err:  # noqa: BLE001 - every failure is counted and named
                ok, why = False, repr(err)
            elapsed = time.perf_counter() - start
            with lock:
                if ok:
                    latencies.append(elapsed)
                else:
                    errors.append(why)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "latencies": latencies, "errors": errors}


def run_client_process(url: str, image_dir: Path, requests: int, concurrency: int) -> dict[str, object]:
    """`client` in a second Python process (its own GIL and its own HTTP stack), its result as JSON on stdout."""
    command = [sys.executable, __file__, "--client", url, "--images-dir", str(image_dir),
               "--requests", str(requests), "--concurrency", str(concurrency)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the two sides -----------------------------------------------------------------------------------------------


def make_inputs(folder: Path, n_images: int, size: tuple[int, int], scale: float) -> Path:
    """A tiny-preset checkpoint at data.scale=`scale` and `n_images` JPEGs of blocks on noise, under `folder`."""
    import torch
    from PIL import Image

    from ddetr.config import apply_overrides, get_preset
    from ddetr.train.checkpoints import save_checkpoint
    from ddetr.train.loop import Training

    torch.manual_seed(0)
    cfg = apply_overrides(get_preset("tiny"), [f"data.scale={scale}"])
    run = Training(cfg, torch.device("cpu"), load_backbone_weights=False)
    checkpoint = folder / "checkpoint_00000000"
    save_checkpoint(checkpoint, run.payload(cfg.to_dict()), {})
    rng = np.random.default_rng(0)
    (folder / "images").mkdir()
    for i in range(n_images):
        im = rng.integers(0, 60, size=(*size, 3), dtype=np.uint8)
        for _ in range(4):
            y, x = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
            im[y : y + size[0] // 4, x : x + size[1] // 4] = rng.integers(80, 255, size=3)
        Image.fromarray(im).save(folder / "images" / f"{i}.jpg", quality=90)
    return checkpoint


def in_process(checkpoint: Path, images: list[bytes], requests: int, batch: int) -> dict[str, object]:
    """Decode and detect `requests` images in this process, `batch` at a time; latency is per predict call."""
    from ddetr.inference import Detector

    detector = Detector.from_checkpoint(checkpoint, device="cpu")
    detector.predict([detector.decode(images[0])[0]] * batch)  # warm-up
    latencies = []
    start = time.perf_counter()
    for i in range(0, requests, batch):
        t0 = time.perf_counter()
        decoded = [detector.decode(images[j % len(images)]) for j in range(i, min(i + batch, requests))]
        detector.predict([pixels for pixels, _ in decoded], [size for _, size in decoded])
        latencies.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - start
    return {"mode": f"in-process, batch {batch}", "concurrency": 1, "requests": requests, "errors": 0,
            "seconds": round(seconds, 2), "requests_per_s": round(requests / seconds, 2),
            **percentiles(latencies)}  # fmt: skip


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/healthz", timeout=60) as response:
        return json.loads(response.read())


def load_levels(settings: ServeSettings, image_dir: Path, requests: int, levels: list[int]) -> list[dict[str, object]]:
    """Warm the deployed application up, then load it at each concurrency level."""
    url, mode = settings.url, f"serve, wait {settings.batch_wait_s * 1e3:g} ms"
    run_client_process(f"{url}/detect", image_dir, 2 * settings.max_batch_size, settings.max_batch_size)
    rows = []
    for concurrency in levels:
        before = health(url)["batches"]
        load = run_client_process(f"{url}/detect", image_dir, requests, concurrency)
        after = health(url)["batches"]
        batches = {n: c - before.get(n, 0) for n, c in after.items() if c - before.get(n, 0)}
        formed, images = sum(batches.values()), sum(int(n) * c for n, c in batches.items())
        rows.append({"mode": mode, "batch_wait_s": settings.batch_wait_s, "concurrency": concurrency,
                     "requests": requests, "errors": len(load["errors"]), "first_errors": load["errors"][:3],
                     "seconds": round(load["seconds"], 2),
                     "requests_per_s": round(len(load["latencies"]) / load["seconds"], 2),
                     **percentiles(load["latencies"] or [float("nan")]),
                     "batches": dict(sorted(batches.items(), key=lambda kv: int(kv[0]))),
                     "mean_batch": round(images / max(formed, 1), 2)})  # fmt: skip
        print_row(rows[-1])
    return rows


def serve_levels(args: argparse.Namespace, checkpoint: Path, image_dir: Path) -> list[dict[str, object]]:
    """On a fresh local Ray, deploy the application with each batch wait and load it; shut it down."""
    import ray
    from ray import serve

    from ddetr.deploy.serve import ServeSettings, deploy

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    try:
        for wait in args.batch_wait_s:  # each a new deployment of the application (its replica replaced)
            settings = ServeSettings(checkpoint=str(checkpoint), port=args.port, max_batch_size=args.max_batch_size,
                                     batch_wait_s=wait, min_replicas=1, max_replicas=1, cpus_per_replica=args.cpus,
                                     use_gpu=False, threshold=0.5)  # fmt: skip
            deploy(settings)
            rows += load_levels(settings, image_dir, args.requests, args.concurrency)
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


# ---- report ------------------------------------------------------------------------------------------------------


def print_row(row: dict[str, object]) -> None:
    mode = f"{row['mode']}{' (after)' if row.get('when') == 'after' else ''}"
    print(f"{mode:<28} {row['concurrency']:>4} {row['requests']:>5} {row['errors']:>6} "
          f"{row['requests_per_s']:>8.2f} {row['p50_ms']:>8.1f} {row['p95_ms']:>8.1f} {row['p99_ms']:>8.1f} "
          f"{row.get('mean_batch', '-')!s:>6}", flush=True)  # fmt: skip


def machine() -> dict[str, object]:
    """The machine as every benchmark records it (benchmarks/msda.py), plus what a Serve run depends on."""
    import ray
    from msda import machine as described  # benchmarks/ is the script's folder, hence on sys.path

    return {**described(), "cpus_total": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-s", type=float, nargs="+", default=[0.01, 0.05], help="a Serve row set each")
    parser.add_argument("--cpus", type=int, default=2, help="Ray's CPUs, all for the one replica; torch threads")
    parser.add_argument("--image-size", type=int, nargs=2, default=[192, 256], metavar=("H", "W"))
    parser.add_argument("--scale", type=float, default=0.2, help="data.scale of the checkpoint: 160 px short side")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--client", help=argparse.SUPPRESS)  # the load process: URL to send requests to
    parser.add_argument("--images-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        images = [p.read_bytes() for p in sorted(args.images_dir.glob("*.jpg"))]
        print(json.dumps(client(args.client, images, args.requests, args.concurrency[0])))
        return

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch

    torch.set_num_threads(args.cpus)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_inputs(Path(tmp), 16, tuple(args.image_size), args.scale)
        images = [p.read_bytes() for p in sorted((Path(tmp) / "images").glob("*.jpg"))]
        print(f"{'mode':<28} {'conc':>4} {'reqs':>5} {'errors':>6} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} "
              f"{'p99 ms':>8} {'batch':>6}")  # fmt: skip
        rows = []
        # In-process loops before and after Serve's: the machine's other work drifts, and the two rows show by how much.
        for when in ("before", "after"):
            for batch in (1, args.max_batch_size):
                rows.append({**in_process(checkpoint, images, args.requests, batch), "when": when})
                print_row(rows[-1])
            if when == "before":
                rows += serve_levels(args, checkpoint, Path(tmp) / "images")
    errors = sum(int(r["errors"]) for r in rows)
    settings = {k: v for k, v in vars(args).items() if k not in ("client", "images_dir", "out")}
    notes = {
        "latency": "serve: per request, as the client process saw it (HTTP on loopback, JSON decoded); "
        "in-process: per predict call (decode included), batch images at once",
        "batches": "batch size -> batches the replica formed during the level (GET /healthz)",
        "order": "in-process loops, Serve (on a Ray started after them and shut down before), the loops again",
    }
    report = {"machine": machine(), "settings": settings, "notes": notes, "errors": errors, "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")  # written whole, then renamed
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out} ({errors} errors)")
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
