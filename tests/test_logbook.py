"""The run log: a local folder written directly; a bucket folder written in parts by a background thread, against
real S3 servers on loopback (moto's, `s3_server.py`): complete read-back, restarts, old single-file logs, closed
parts never written again, and a store that fails or goes away without ending the run."""

from __future__ import annotations

import json
import logging
import re
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ddetr import io
from ddetr.train.logbook import METRICS_FILE, Logbook, read_metrics
from tests.s3_server import S3Server, free_port, s3_dir, s3_server, wait_until_up  # noqa: F401  (fixtures)


def step_metrics(step: int) -> dict[str, float]:
    """About 300 bytes of JSON per record, as a small model's step logs."""
    return {f"loss_{name}": 1.0 / (step + i) for i, name in enumerate(("ce", "bbox", "giou", "ce_0", "bbox_0"))} | {
        "lr": 1e-4,
        "epoch": 0,
    }


def scalars_in(event_file: bytes) -> int:
    """The scalars of a TensorBoard event file's events, checking every frame's two CRCs (TFRecord framing)."""
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto.event_pb2 import Event

    def masked_crc(data: bytes) -> int:
        crc = crc32c(data) & 0xFFFFFFFF
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    count, at = 0, 0
    while at < len(event_file):
        (length,) = struct.unpack_from("<Q", event_file, at)
        payload = event_file[at + 12 : at + 12 + length]
        assert struct.unpack_from("<I", event_file, at + 8)[0] == masked_crc(event_file[at : at + 8])
        assert struct.unpack_from("<I", event_file, at + 12 + length)[0] == masked_crc(payload)
        event = Event()
        event.ParseFromString(payload)
        count += len(event.summary.value)
        at += 12 + length + 4
    return count


def wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def test_a_local_folder_is_written_directly(tmp_path) -> None:
    book = Logbook(tmp_path / "run")
    for step in (1, 2):
        book.write("step", step, step_metrics(step))
    # Read while the logbook is open: nothing waits for a flush or a thread.
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    book.close()
    assert (tmp_path / "run" / METRICS_FILE).is_file()
    assert not (tmp_path / "run" / "metrics").exists()


def test_a_cut_last_line_is_left_out_and_a_bad_line_is_named(tmp_path, caplog) -> None:
    log_file = tmp_path / METRICS_FILE
    log_file.write_text('{"kind": "step", "step": 1}\n{"kind": "step", "st')  # a writer killed mid-line
    with caplog.at_level(logging.WARNING, logger="ddetr.train.logbook"):
        assert read_metrics(tmp_path) == [{"kind": "step", "step": 1}]
    assert "left out its last line" in caplog.text
    log_file.write_text('{"kind": "step", "step": 1}\nnot json\n{"kind": "step", "step": 2}\n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(log_file))}, line 2: not a JSON record"):
        read_metrics(tmp_path)


def test_the_bucket_log_reads_back_complete_in_parts(s3_server, s3_dir) -> None:  # noqa: F811
    book = Logbook(s3_dir, part_bytes=1024, sync_every_s=0.05)
    local = book.local_dir
    written = []
    for step in range(1, 31):
        book.write("step", step, step_metrics(step))
        written.append(step)
    # Step records go up behind the training thread, without a flush.
    assert wait_for(lambda: [r["step"] for r in read_metrics(s3_dir)] == written, 20)
    book.write("epoch", 30, {"epoch": 0, "val/AP": 0.25})
    book.close()
    records = read_metrics(s3_dir)
    assert [(r["kind"], r["step"]) for r in records] == [("step", s) for s in written] + [("epoch", 30)]
    keys = s3_server.keys(f"{s3_dir}/metrics/")
    parts = {k.rsplit("/", 1)[1]: size for k, size in keys.items() if not k.endswith("/")}  # no folder markers
    assert len(parts) >= 8 and list(parts) == [f"part-{i:05d}.jsonl" for i in range(len(parts))], parts
    assert max(parts.values()) <= 1024
    assert not s3_server.keys(f"{s3_dir}/{METRICS_FILE}")  # the parts only
    events = sorted(k for k in s3_server.keys(f"{s3_dir}/tensorboard/") if "tfevents" in k)
    assert len(events) >= 2 and all(re.search(r"\.part-\d{5}$", k) for k in events), events
    # Each event part is whole TFRecord frames; together they hold every scalar written (7 per step, 2 per epoch).
    client = s3_server.client()
    blobs = [client.get_object(Bucket=s3_server.bucket, Key=k)["Body"].read() for k in events]
    assert sum(map(scalars_in, blobs)) == 7 * len(written) + 2
    assert not local.exists()  # everything reached the bucket: the local copy is gone


def test_a_restart_continues_an_old_single_file_log_with_parts(s3_server, s3_dir) -> None:  # noqa: F811
    """A bucket folder written by the earlier version (one whole `metrics.jsonl`), continued twice."""
    old = [{"kind": "step", "step": s, "loss": 1.0} for s in (1, 2)]
    io.atomic_write(io.join(s3_dir, METRICS_FILE), "".join(json.dumps(r) + "\n" for r in old))
    for step in (3, 4):
        book = Logbook(s3_dir)
        book.write("step", step, {"loss": 0.5})
        book.close()
    assert [r["step"] for r in read_metrics(s3_dir)] == [1, 2, 3, 4]
    assert sorted(k for k in s3_server.keys(f"{s3_dir}/metrics/") if not k.endswith("/")) == [
        f"{s3_dir.split('/', 3)[3]}/metrics/part-{i:05d}.jsonl" for i in (0, 1)
    ]
    assert io.read_text(io.join(s3_dir, METRICS_FILE)) == "".join(json.dumps(r) + "\n" for r in old)  # untouched


def test_a_bucket_that_refuses_writes_does_not_stop_the_run(s3_server, caplog) -> None:  # noqa: F811
    """The run folder's bucket does not exist until mid-run: every upload fails, the training thread goes on, and
    the records arrive once the bucket is there."""
    bucket = f"ddetr-late-{time.monotonic_ns()}"
    book = Logbook(f"s3://{bucket}/run", sync_every_s=0.05, wait_s=0.5)
    with caplog.at_level(logging.WARNING):
        tick = time.monotonic()
        for step in range(1, 21):
            book.write("step", step, step_metrics(step))
        book.write("epoch", 20, {"epoch": 0})  # waits up to wait_s, then goes on
        assert time.monotonic() - tick < 10
        assert wait_for(lambda: "failed" in caplog.text, 20)
        s3_server.client().create_bucket(Bucket=bucket)
        book.wait_s = 60
        book.close()
    assert [r["step"] for r in read_metrics(f"s3://{bucket}/run")] == [*range(1, 21), 20]
    assert f"s3://{bucket}/run" in caplog.text  # the warnings name the run folder


# --- a server of our own: its request log, and stopping it mid-run --------------------------------------------


@dataclass
class OwnServer:
    port: int
    log: Path
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "a") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        wait_until_up(self.endpoint, self.process, self.log)
        S3Server(self.endpoint, "ddetr-own", {"AWS_DEFAULT_REGION": "us-east-1"}).client().create_bucket(
            Bucket="ddetr-own"
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def puts(self) -> list[str]:
        """The keys of the PUT requests the server answered (an upload's, or one of its parts'), in order."""
        return re.findall(r'"PUT /ddetr-own/([^\s?]+)\S* HTTP', self.log.read_text(errors="replace"))


@pytest.fixture
def own_server(tmp_path, monkeypatch) -> Iterator[OwnServer]:
    """moto's S3 server with a bucket "ddetr-own", the AWS variables pointing at it for this test."""
    server = OwnServer(free_port(), tmp_path / "server.log")
    for key, value in {
        "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(key, value)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_closed_parts_and_unchanged_files_are_not_uploaded_again(own_server) -> None:
    """A sync after every step (the worst case): each part is written while it grows, never after the next one
    began; the curves go up once per epoch, not once per sync."""
    book = Logbook("s3://ddetr-own/run", part_bytes=1000, sync_every_s=3600)
    for step in range(1, 25):
        book.write("step", step, step_metrics(step))
        book.flush()
        if step % 12 == 0:
            book.write("epoch", step, {"epoch": step // 12 - 1, "val/AP": 0.1})
    book.close()
    puts = [key for key in own_server.puts() if key.startswith("run/")]
    assert [r["step"] for r in read_metrics("s3://ddetr-own/run")] == [*range(1, 13), 12, *range(13, 25), 24]
    assert puts.count("run/curves.png") == 2
    for prefix in ("run/metrics/part-", ".part-"):
        parts = [key for key in puts if prefix in key]
        started = list(dict.fromkeys(parts))  # in the order they began
        assert len(started) >= 2, parts
        last_put = {key: max(i for i, k in enumerate(parts) if k == key) for key in started}
        first_put = {key: parts.index(key) for key in started}
        for earlier, later in zip(started, started[1:], strict=False):
            assert last_put[earlier] < first_put[later], f"{earlier} written again after {later} began"


@pytest.mark.slow
def test_a_server_that_goes_away_mid_run_gets_the_records_when_it_is_back(own_server, caplog) -> None:
    """The server stops mid-run: the training thread's writes do not raise or hang, a warning names the failure,
    and once a server answers again the whole log arrives (moto keeps objects in memory: the restarted server is
    empty, and the open part holding every record is uploaded again whole)."""
    book = Logbook("s3://ddetr-own/run", sync_every_s=0.1, wait_s=1)
    for step in range(1, 11):
        book.write("step", step, step_metrics(step))
    book.flush()
    own_server.stop()
    with caplog.at_level(logging.WARNING):
        tick = time.monotonic()
        for step in range(11, 21):
            book.write("step", step, step_metrics(step))
        book.write("epoch", 20, {"epoch": 0})
        assert time.monotonic() - tick < 10  # the epoch record waited wait_s at most
        assert wait_for(lambda: "uploading the run log to s3://ddetr-own/run failed" in caplog.text, 60)
        own_server.start()
        book.wait_s = 60
        book.close()
    assert [r["step"] for r in read_metrics("s3://ddetr-own/run")] == [*range(1, 21), 20]
    assert "reaches s3://ddetr-own/run again" in caplog.text
