"""Hostile input against `ddetr serve`: how a replica answers requests built to exhaust it, and its memory meanwhile.

One CPU replica on loopback (the tiny preset at data.scale=0.2, freshly initialised; Serve settings at their
defaults but for the port and CPUs), then these requests in turn:

  1. a JSON list of 32 one-colour 4900x4900 PNGs: ~3.5 MB of body, 768 M pixels (~2.3 GB as RGB arrays);
  2. one such PNG alone;
  3. a 1x3000 PNG;
  4. an ordinary 192x256 JPEG.

Per request: HTTP status, seconds to the answer, the start of its error; the replica's resident memory (psutil on its
process, sampled every 20 ms from this process) before it, at its peak while it ran, and after.

    python benchmarks/serve_hostile.py
    # the same requests against another checkout (its ddetr first on the path; the replica inherits it):
    PYTHONPATH=/tmp/old-checkout python benchmarks/serve_hostile.py --label before

Prints a table and writes ``benchmarks/results/serve-hostile-cpu.json``: per label (default "after"), the machine,
versions, commit, the ddetr measured and the rows; the other labels' runs in the file are kept.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "serve-hostile-cpu.json"
REPLICA = "ServeReplica:ddetr:DetectorServer"  # the replica's process title


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def one_colour_png(width: int, height: int) -> bytes:
    """A large image in a small file (~80 KB for 4900x4900)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 160, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def requests_to_send() -> list[tuple[str, bytes, str]]:
    huge = one_colour_png(4900, 4900)
    ordinary = np.random.default_rng(0).integers(0, 255, size=(192, 256, 3), dtype=np.uint8)
    return [
        ("32 x 4900x4900 PNG, JSON", json.dumps([base64.b64encode(huge).decode()] * 32).encode(), "application/json"),
        ("1 x 4900x4900 PNG", huge, "image/png"),
        ("1x3000 PNG", encode(np.full((1, 3000, 3), 90, np.uint8), "PNG"), "image/png"),
        ("192x256 JPEG", encode(ordinary, "JPEG"), "image/jpeg"),
    ]


def replica_process():  # -> psutil.Process
    import psutil

    for _ in range(100):
        for proc in psutil.process_iter(["cmdline"]):
            if any(REPLICA in part for part in proc.info["cmdline"] or []):
                return proc
        time.sleep(0.1)
    raise RuntimeError(f"no process titled {REPLICA}")


class Sampler:
    """The peak resident memory of a process while a block runs, sampled every 20 ms in a thread."""

    def __init__(self, proc) -> None:
        self.proc, self.peak, self.running = proc, 0, False

    def __enter__(self) -> Sampler:
        self.peak, self.running = self.proc.memory_info().rss, True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()


def post(url: str, body: bytes, content_type: str) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, ""
    except urllib.error.HTTPError as err:
        text = err.read().decode(errors="replace")
        try:
            text = json.loads(text).get("error", "")
        except ValueError:  # Serve's own answers (500, 408) are plain text
            pass
        return err.code, " ".join(text.split())[:120]


def make_checkpoint(folder: Path) -> Path:
    import torch

    from ddetr.config import apply_overrides, get_preset
    from ddetr.train.checkpoints import save_checkpoint
    from ddetr.train.loop import Training

    torch.manual_seed(0)
    cfg = apply_overrides(get_preset("tiny"), ["data.scale=0.2"])
    run = Training(cfg, torch.device("cpu"), load_backbone_weights=False)
    save_checkpoint(folder / "checkpoint_00000000", run.payload(cfg.to_dict()), {})
    return folder / "checkpoint_00000000"


def measure(args: argparse.Namespace, checkpoint: Path) -> list[dict[str, object]]:
    import ray
    from ray import serve

    from ddetr.deploy.serve import ServeSettings, deploy

    mib = 1024 * 1024
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    try:
        settings = ServeSettings(checkpoint=str(checkpoint), port=args.port, min_replicas=1, max_replicas=1,
                                 cpus_per_replica=args.cpus, use_gpu=False)  # fmt: skip
        deploy(settings)
        proc = replica_process()
        for name, body, content_type in requests_to_send():
            before = proc.memory_info().rss
            start = time.perf_counter()
            with Sampler(proc) as sampler:
                status, error = post(f"{settings.url}/detect", body, content_type)
            seconds = time.perf_counter() - start
            after = proc.memory_info().rss
            rows.append({"request": name, "body_bytes": len(body), "status": status, "seconds": round(seconds, 2),
                         "rss_before_mib": round(before / mib), "rss_peak_mib": round(sampler.peak / mib),
                         "rss_after_mib": round(after / mib), "error": error})  # fmt: skip
            print_row(rows[-1])
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def print_row(row: dict[str, object]) -> None:
    print(f"{row['request']:<26} {row['body_bytes']:>9} {row['status']:>6} {row['seconds']:>8.2f} "
          f"{row['rss_before_mib']:>8} {row['rss_peak_mib']:>8} {row['rss_after_mib']:>8}  {row['error']}",
          flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpus", type=int, default=2, help="Ray's CPUs, all for the one replica")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--label", default="after", help="names this checkout's rows in the JSON")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    import ddetr  # before msda, which puts this checkout first on the path: PYTHONPATH may name another

    print(f"{'request':<26} {'bytes':>9} {'status':>6} {'seconds':>8} {'rss MiB':>8} {'peak':>8} {'after':>8}  error")
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args, make_checkpoint(Path(tmp)))
    from msda import machine  # benchmarks/ is the script's folder, hence on sys.path

    run = {"machine": {**machine(), "python": platform.python_version(), "ray": ray.__version__},
           "ddetr": str(Path(ddetr.__file__).parent), "results": rows}  # fmt: skip
    # Runs of other labels already in the file stay: "before" (an older checkout) beside "after" (this one).
    runs = json.loads(args.out.read_text()).get("runs", {}) if args.out.exists() else {}
    notes = {"rss": "the replica process's resident memory (psutil), MiB: before the request, the peak sampled every "
             "20 ms while it ran, after its answer", "runs": "label -> the checkout measured (--label)"}  # fmt: skip
    report = {"notes": notes, "runs": {**runs, args.label: run}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")  # written whole, then renamed
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
