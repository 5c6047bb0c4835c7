"""Object storage against a real S3 server on loopback (`s3_server.py`): plain `s3://` URIs for the data, a run
folder's logbook, a sweep's ASHA rungs, checkpoint downloads and transient store errors. What ddetr wrote is read
back with boto3, an independent client of the same server."""

from __future__ import annotations

import shutil
import types

import pytest

from ddetr import cli, io
from ddetr.config import apply_overrides, get_preset
from ddetr.data.shards import read_metadata
from ddetr.train.logbook import Logbook, read_metrics
from tests.s3_server import s3_dir, s3_server  # noqa: F401  (fixtures)

TRAIN_IMAGES, VAL_IMAGES = 16, 4


@pytest.fixture(scope="module")
def s3_data(s3_server) -> str:  # noqa: F811
    """`ddetr data synth --out s3://...`: images, annotations and shards, all in the bucket."""
    root = f"s3://{s3_server.bucket}/synth"
    argv = ["data", "synth", "--out", root, "--images", str(TRAIN_IMAGES), "--val", str(VAL_IMAGES)]
    assert cli.main(argv) == 0
    return root


def test_synth_and_convert_write_shards_to_the_bucket(s3_server, s3_data, s3_dir) -> None:  # noqa: F811
    keys = s3_server.keys(s3_data)
    assert sum(k.endswith(".jpg") for k in keys) == TRAIN_IMAGES + VAL_IMAGES
    assert read_metadata(f"{s3_data}/shards/train").num_images == TRAIN_IMAGES
    assert read_metadata(f"{s3_data}/shards/val").num_images == VAL_IMAGES
    # Converting the bucket's images and annotations again, into the bucket, gives the same shard, byte for byte.
    argv = ["data", "convert", "--images", f"{s3_data}/images/train", "--out", f"{s3_dir}/train", "--shard-size",
            "256", "--annotations", f"{s3_data}/annotations/instances_train.json"]  # fmt: skip
    assert cli.main(argv) == 0
    client = s3_server.client()

    def shard_etags(prefix: str) -> list[str]:
        found = s3_server.keys(prefix)
        return [client.head_object(Bucket=s3_server.bucket, Key=k)["ETag"] for k in sorted(found) if "shard-" in k]

    synth, converted = shard_etags(f"{s3_data}/shards/train/"), shard_etags(f"{s3_dir}/train/")
    assert len(synth) == 1 and synth == converted


def test_logbook_in_the_bucket_continues_after_a_restart(s3_server, s3_dir) -> None:  # noqa: F811
    book = Logbook(s3_dir)
    for step in (1, 2):
        book.write("step", step, {"loss": 1.0 / step})
    book.write("epoch", 2, {"epoch": 1, "val/AP": 0.1})
    # An epoch record reaches the bucket at once, the log and the redrawn curves with it.
    assert [r["step"] for r in read_metrics(s3_dir)] == [1, 2, 2]
    assert s3_server.keys(f"{s3_dir}/curves.png")
    book.close()
    # A restarted rank 0 (another node, nothing local) goes on with the bucket's log.
    again = Logbook(s3_dir)
    again.write("step", 3, {"loss": 0.3})
    again.close()
    records = read_metrics(s3_dir)
    assert [(r["kind"], r["step"]) for r in records] == [("step", 1), ("step", 2), ("epoch", 2), ("step", 3)]
    events = [k for k in s3_server.keys(f"{s3_dir}/tensorboard/") if "tfevents" in k]
    assert len(events) == 2, events  # one event file per writer, none overwritten
    body = s3_server.client().get_object(Bucket=s3_server.bucket, Key=f"{s3_dir.split('/', 3)[3]}/curves.png")
    assert body["Body"].read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_asha_rungs_in_the_bucket_outlive_the_local_folder(s3_dir) -> None:  # noqa: F811
    """A continued sweep's scheduler, with nothing local, stops a trial behind the rung the first part recorded."""
    from ray.tune.schedulers import TrialScheduler

    from ddetr.sweep.asha import ResumableASHA

    def scheduler(state: str) -> ResumableASHA:
        return ResumableASHA(
            state, metric="val/AP", mode="max", time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2
        )

    def result(sched: ResumableASHA, trial_id: str, ap: float) -> str:
        trial = types.SimpleNamespace(trial_id=trial_id)
        sched.on_trial_add(None, trial)
        return sched.on_trial_result(None, trial, {"epoch": 1, "val/AP": ap})

    first = scheduler(f"{s3_dir}/sweep/asha_state.json")
    assert result(first, "a", 0.5) == result(first, "b", 0.6) == TrialScheduler.CONTINUE
    assert io.exists(f"{s3_dir}/sweep/asha_state.json")
    assert result(scheduler(f"{s3_dir}/sweep/asha_state.json"), "c", 0.1) == TrialScheduler.STOP
    assert result(scheduler(f"{s3_dir}/elsewhere/asha_state.json"), "c", 0.1) == TrialScheduler.CONTINUE


def test_checkpoints_upload_asynchronously_to_object_storage_only(s3_dir) -> None:  # noqa: F811
    from ray.train import CheckpointUploadMode

    from ddetr.train.ray_train import upload_mode

    def mode(storage: str, setting: str = "auto") -> CheckpointUploadMode:
        return upload_mode(apply_overrides(get_preset("tiny"), [f"train.storage_path={storage}",
                                                                f"train.checkpoint_upload={setting}"]))  # fmt: skip

    assert mode(s3_dir) == CheckpointUploadMode.ASYNC
    assert mode("/tmp/runs") == CheckpointUploadMode.SYNC  # a local folder: as before
    assert mode(s3_dir, "sync") == CheckpointUploadMode.SYNC
    assert mode("/tmp/runs", "async") == CheckpointUploadMode.ASYNC


def test_a_checkpoint_is_downloaded_once_per_node(s3_server, s3_dir) -> None:  # noqa: F811
    from ddetr.train.ray_train import node_copy

    io.atomic_write(f"{s3_dir}/checkpoint_00000001/state.pt", b"weights")
    io.atomic_write(f"{s3_dir}/checkpoint_00000001/manifest.json", "{}")
    filesystem, inner = io.resolve(f"{s3_dir}/checkpoint_00000001")
    first = node_copy(inner, filesystem)
    try:
        assert (first / "state.pt").read_bytes() == b"weights"
        s3_server.client().delete_object(Bucket=s3_server.bucket, Key=f"{inner.split('/', 1)[1]}/state.pt")
        # Another rank of the node: the copy is there, nothing is read from the store (the object is gone).
        assert node_copy(inner, filesystem) == first and (first / "state.pt").read_bytes() == b"weights"
    finally:
        shutil.rmtree(first, ignore_errors=True)


def test_transient_store_errors_are_retried_and_named_when_they_persist(caplog) -> None:
    calls: list[int] = []

    def slow_down_twice() -> str:
        calls.append(1)
        if len(calls) <= 2:
            raise OSError("AWS Error SLOW_DOWN (HTTP 503)")
        return "bytes"

    assert io.retried("reading s3://b/k", slow_down_twice, first_wait_s=0.01) == "bytes" and len(calls) == 3
    assert [r.message.split(";")[1] for r in caplog.records if "retry" in r.message] == [
        " retry 1 of 3 in 0 s",
        " retry 2 of 3 in 0 s",
    ]

    def always_down() -> None:
        raise OSError("AWS Error SLOW_DOWN (HTTP 503)")

    with pytest.raises(OSError, match=r"reading s3://b/k: failed 4 times, last with AWS Error SLOW_DOWN"):
        io.retried("reading s3://b/k", always_down, first_wait_s=0.01)
    with pytest.raises(FileNotFoundError):  # a missing file is no transient error
        io.retried("reading s3://b/k", lambda: io.read_bytes("/nonexistent/ddetr"), first_wait_s=0.01)
