"""Bytes the logbook uploads to a run folder in object storage over 100 / 200 / 300 steps, before and after the log
went up in parts.

Before: the logbook as of commit e91d9cb (read from git history and run as it was), which uploaded every file of
the run folder whole at each sync: `metrics.jsonl` grows ~1 KB per step, so its traffic grows with the square of the
run's length. After: `ddetr.train.logbook` now (only what is new: the log and TensorBoard event files in parts,
other files when they changed; see `ddetr/train/log_mirror.py`).

Against moto's S3 server on loopback, reached through a TCP proxy that counts the bytes every request sends (headers
and bodies: what crosses the network); the server's request log gives the number of requests. Step records of the
full model's size (~1 KB of JSON, 32 scalars), an epoch record (with its curve PNG) every 100 steps, and a sync
every K steps (a sync happens at most every 5 s: K=5 is a run at ~1 s per step, K=1 the worst case of a step that
takes 5 s or more). Prints a table; writes `benchmarks/results/logbook-upload-cpu.json`.

    python benchmarks/logbook_upload.py [--steps 100 200 300] [--every 1 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddetr import io  # noqa: E402
from ddetr.train import logbook as logbook_after  # noqa: E402

BEFORE_COMMIT = "e91d9cb10af9bb40b6d58b6185fc41736f52b429"  # the last logbook that uploaded whole files
EPOCH_EVERY = 100
OUT = ROOT / "benchmarks" / "results" / "logbook-upload-cpu.json"
# The scalars of a step record of the full model (two-stage, 6 decoder layers): the losses of each layer and the
# encoder's proposals, the matcher's errors, and the step's own numbers.
LOSSES = ("loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error")
STEP_KEYS = [f"{k}{s}" for s in ("", "_0", "_1", "_2", "_3", "_enc") for k in LOSSES if not (s and k == "class_error")]
STEP_KEYS += ["loss", "lr", "grad_norm", "skipped_step", "data_wait_s", "step_s"]


class CountingProxy:
    """A TCP proxy on loopback in front of `upstream_port` that counts the bytes clients send through it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.sent = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def take(self) -> int:
        """Bytes sent since the last call."""
        with self._lock:
            sent, self.sent = self.sent, 0
        return sent

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
                if count:
                    with self._lock:
                        self.sent += len(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:  # the other side went away: the connection is over
            pass


def start_server(log: Path) -> tuple[subprocess.Popen, CountingProxy]:
    """moto's S3 server with a bucket "bench", behind a counting proxy that the AWS variables point at."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "w") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=sink, stderr=sink
        )
    proxy = CountingProxy(port)
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}", timeout=2).close()
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            time.sleep(0.2)
    pafs.FileSystem.from_uri("s3://bench?allow_bucket_creation=true")[0].create_dir("bench")
    return server, proxy


def logbook_before() -> types.ModuleType:
    """`ddetr/train/logbook.py` as of BEFORE_COMMIT, as a module, syncing only when asked (`flush`, epoch records)."""
    source = subprocess.run(
        ["git", "show", f"{BEFORE_COMMIT}:ddetr/train/logbook.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    module = types.ModuleType("logbook_before")
    exec(compile(source, f"{BEFORE_COMMIT[:7]}:ddetr/train/logbook.py", "exec"), module.__dict__)
    module.SYNC_EVERY_S = float("inf")  # the benchmark decides when a sync happens, for both
    return module


def one_run(variant: str, module: types.ModuleType, steps: int, every: int, run: str) -> dict:
    """A run of `steps` steps logged to `run`; what the logbook sent, with the time it took."""
    if variant == "after":
        book = module.Logbook(run, sync_every_s=float("inf"), wait_s=600)
    else:
        book = module.Logbook(run)
    rng = random.Random(0)
    tick = time.perf_counter()
    for step in range(1, steps + 1):
        book.write("step", step, {k: rng.random() * 10 for k in STEP_KEYS} | {"epoch": (step - 1) // EPOCH_EVERY})
        if step % EPOCH_EVERY == 0:
            book.write("epoch", step, {"epoch": step // EPOCH_EVERY - 1, "val/AP": rng.random(), "val/AP50": 0.5})
        elif step % every == 0:
            book.flush()
    book.close()
    seconds = time.perf_counter() - tick
    fs, inner = io.resolve(run)
    stored = sum(f.size or 0 for f in fs.get_file_info(pafs.FileSelector(inner, recursive=True)) if f.is_file)
    records = len(logbook_after.read_metrics(run))
    assert records == steps + steps // EPOCH_EVERY, f"{variant}: {records} records read back"
    return {"stored_bytes": stored, "records": records, "seconds": seconds}


def requests_in(log: Path, since: int) -> tuple[int, int]:
    """(requests, of which uploads: PUT or POST) in the server's log after line `since`; and the log's length."""
    lines = log.read_text(errors="replace").splitlines()
    new = [line for line in lines[since:] if '" 2' in line or '" 4' in line or '" 5' in line]
    return len(new), sum('"PUT ' in line or '"POST ' in line for line in new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 200, 300])
    parser.add_argument("--every", type=int, nargs="+", default=[1, 5], help="steps per sync")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="ddetr-logbook-bench-"))
    server, proxy = start_server(work / "server.log")
    modules = {"before": logbook_before(), "after": logbook_after}
    results = []
    try:
        for every in args.every:
            for steps in args.steps:
                for variant, module in modules.items():
                    lines = len((work / "server.log").read_text(errors="replace").splitlines())
                    proxy.take()
                    out = one_run(variant, module, steps, every, f"s3://bench/{variant}-{steps}-{every}")
                    out["sent_bytes"] = proxy.take()  # includes the read-back and listing: small, both alike
                    out["requests"], out["uploads"] = requests_in(work / "server.log", lines)
                    results.append({"variant": variant, "steps": steps, "every": every, **out})
                    print(
                        f"{variant:6s} K={every} {steps:4d} steps: {out['sent_bytes'] / 1e6:8.2f} MB sent "
                        f"({out['requests']} requests) for {out['stored_bytes'] / 1e6:.3f} MB stored",
                        flush=True,
                    )
    finally:
        server.terminate()
        server.wait()
    print_table(results)
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "before_commit": BEFORE_COMMIT,
        "settings": {
            "step_record_keys": len(STEP_KEYS) + 1,
            "epoch_every_steps": EPOCH_EVERY,
            "part_bytes": logbook_after.PART_BYTES,
            "counted": "bytes clients sent to the S3 server (headers and bodies), through a counting TCP proxy",
        },
        "results": results,
    }
    OUT.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


def print_table(results: list[dict]) -> None:
    """Per sync cadence and run length: MB sent before and after, and bytes sent per step (flat when linear)."""
    print(f"\n{'K':>3s} {'steps':>6s} {'before MB':>10s} {'after MB':>9s} {'ratio':>7s} {'before B/step':>14s} "
          f"{'after B/step':>13s} {'log MB':>7s}")  # fmt: skip
    rows = {(r["every"], r["steps"], r["variant"]): r for r in results}
    for every, steps in sorted({(r["every"], r["steps"]) for r in results}):
        before, after = rows[(every, steps, "before")], rows[(every, steps, "after")]
        print(
            f"{every:3d} {steps:6d} {before['sent_bytes'] / 1e6:10.2f} {after['sent_bytes'] / 1e6:9.2f} "
            f"{before['sent_bytes'] / after['sent_bytes']:7.1f} {before['sent_bytes'] / steps:14.0f} "
            f"{after['sent_bytes'] / steps:13.0f} {after['stored_bytes'] / 1e6:7.3f}"
        )


if __name__ == "__main__":
    main()
