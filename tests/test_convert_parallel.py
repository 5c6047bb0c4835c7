"""COCO -> Parquet shards over processes, and a conversion killed midway: the same bytes as one serial conversion."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddetr.data.convert import convert_coco
from ddetr.data.synthetic import write_split
from ddetr.data.validate import BadRecordError

SHARD_SIZE = 5  # 23 images: 5 shards, the last one of 3


@pytest.fixture(scope="module")
def coco_split(tmp_path_factory):
    """A synthetic split of 23 images (json + jpgs), and its serial conversion in `serial/train`."""
    root = tmp_path_factory.mktemp("coco")
    write_split(
        str(root / "images"), str(root / "instances.json"), 23, seed=7, split_code=0, image_size=(40, 64), max_objects=3
    )
    convert_coco(str(root / "images"), str(root / "instances.json"), str(root / "serial" / "train"),
                 shard_size=SHARD_SIZE, progress=False)  # fmt: skip
    return root


def files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def test_parallel_conversion_writes_the_serial_bytes(coco_split, tmp_path):
    # The same split name ("train"): dataset.json records it, and must be the serial one's byte for byte too.
    out = tmp_path / "train"
    summary = convert_coco(str(coco_split / "images"), str(coco_split / "instances.json"), str(out),
                           shard_size=SHARD_SIZE, progress=False, workers=2)  # fmt: skip
    assert (summary.num_shards, summary.shards_written, summary.num_images) == (5, 5, 23)
    assert files(out) == files(coco_split / "serial" / "train")


def test_parallel_conversion_writes_only_the_missing_shards(coco_split, tmp_path):
    out = tmp_path / "train"
    convert_coco(str(coco_split / "images"), str(coco_split / "instances.json"), str(out),
                 shard_size=SHARD_SIZE, progress=False)  # fmt: skip
    kept = {name: (out / name).stat().st_ino for name in ("shard-00000.parquet", "shard-00002.parquet")}
    for name in ("shard-00001.parquet", "shard-00003.parquet", "dataset.json"):
        (out / name).unlink()
    summary = convert_coco(str(coco_split / "images"), str(coco_split / "instances.json"), str(out),
                           shard_size=SHARD_SIZE, progress=False, workers=2)  # fmt: skip
    assert (summary.shards_resumed, summary.shards_written) == (3, 2)
    assert {name: (out / name).stat().st_ino for name in kept} == kept  # not rewritten
    assert files(out) == files(coco_split / "serial" / "train")


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def test_a_killed_conversion_continues_without_redoing_finished_shards(coco_split, tmp_path):
    # The first image of shard 2 is a FIFO with no writer: reading it blocks, so the command is certainly midway
    # (shards 0 and 1 written, shard 2 not) when it is killed, however fast the machine.
    images = tmp_path / "images"
    images.mkdir()
    coco = json.loads((coco_split / "instances.json").read_text())
    for record in coco["images"]:
        (images / record["file_name"]).write_bytes((coco_split / "images" / record["file_name"]).read_bytes())
    blocked = images / sorted(coco["images"], key=lambda r: r["id"])[2 * SHARD_SIZE]["file_name"]
    real = blocked.read_bytes()
    blocked.unlink()
    os.mkfifo(blocked)
    out = tmp_path / "train"
    cmd = [
        sys.executable, "-m", "ddetr.cli", "data", "convert", "--images", str(images),
        "--annotations", str(coco_split / "instances.json"), "--out", str(out), "--shard-size", str(SHARD_SIZE),
    ]  # fmt: skip
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first_two = [out / "shard-00000.parquet", out / "shard-00001.parquet"]
        wait_for(lambda: all(p.exists() for p in first_two) or child.poll() is not None, 60, "shards 0 and 1")
        assert child.poll() is None, "the conversion ended instead of blocking on the FIFO"
        time.sleep(0.2)  # it is blocked in reading shard 2's images
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".parquet")) == [p.name for p in first_two]
    assert not (out / "dataset.json").exists()
    finished = {p.name: p.stat().st_ino for p in first_two}

    blocked.unlink()
    blocked.write_bytes(real)
    summary = convert_coco(str(images), str(coco_split / "instances.json"), str(out),
                           shard_size=SHARD_SIZE, progress=False)  # fmt: skip
    assert (summary.shards_resumed, summary.shards_written, summary.num_images) == (2, 3, 23)
    assert {name: (out / name).stat().st_ino for name in finished} == finished
    # Only the source folder differs from the serial conversion's: every shard is the same bytes.
    serial = files(coco_split / "serial" / "train")
    resumed = files(out)
    assert resumed.keys() == serial.keys()
    assert {k: v for k, v in resumed.items() if k != "dataset.json"} == {
        k: v for k, v in serial.items() if k != "dataset.json"
    }
    meta = json.loads(resumed["dataset.json"])
    assert meta["num_images"] == 23 and meta["source"]["images"] == str(images)


def test_strict_parallel_conversion_names_the_bad_record(coco_split, tmp_path):
    # A record whose size its file contradicts is found by a shard-writing process, and raised here as serial
    # conversion raises it (a BadRecordError does not pickle: the process sends the record back instead).
    coco = json.loads((coco_split / "instances.json").read_text())
    bad = coco["images"][17]
    bad["width"] += 1
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps(coco))
    with pytest.raises(BadRecordError) as caught:
        convert_coco(str(coco_split / "images"), str(annotations), str(tmp_path / "train"), strict=True,
                     shard_size=SHARD_SIZE, progress=False, workers=2)  # fmt: skip
    assert (caught.value.reason, caught.value.image_id) == ("image_size_mismatch", bad["id"])
    assert not (tmp_path / "train" / "dataset.json").exists()
