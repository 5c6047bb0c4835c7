"""COCO -> Parquet shards: round trip, every kind of bad record in both modes, resume after a crash."""

from __future__ import annotations

import copy
import io
import json
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ddetr.data import convert as convert_module
from ddetr.data.convert import convert_coco
from ddetr.data.shards import read_metadata, read_shard, shard_uris
from ddetr.data.synthetic import write_split
from ddetr.data.validate import BadRecordError


def _jpeg(w: int, h: int, colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="JPEG")
    return buf.getvalue()


def _base_coco(image_dir: str) -> dict:
    """Three good 64x48 images, one annotation each."""
    os.makedirs(image_dir, exist_ok=True)
    images, anns = [], []
    for i in (1, 2, 3):
        name = f"{i}.jpg"
        with open(os.path.join(image_dir, name), "wb") as f:
            f.write(_jpeg(64, 48, (10 * i, 100, 200)))
        images.append({"id": i, "file_name": name, "width": 64, "height": 48})
        anns.append(
            {"id": 10 * i, "image_id": i, "category_id": 1, "bbox": [4.0, 5.0, 20.0, 10.0], "area": 200.0, "iscrowd": 0}
        )
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def _write(tmp_path, coco: dict) -> str:
    path = str(tmp_path / "instances.json")
    with open(path, "w") as f:
        json.dump(coco, f)
    return path


def _bad_ann(**kw) -> dict:
    ann = {"id": 99, "image_id": 1, "category_id": 1, "bbox": [1.0, 1.0, 5.0, 5.0], "area": 25.0, "iscrowd": 0}
    ann.update(kw)
    return ann


# Each case: (reason, how to break the base dataset, expected image id, annotation id, field, file is the image).
CASES = {
    "image_missing": (lambda c, d: os.remove(os.path.join(d, "2.jpg")), 2, None, "images.file_name", True),
    "image_undecodable": (
        lambda c, d: open(os.path.join(d, "3.jpg"), "wb").write(b"\xff\xd8\xff\xe0 not really a jpeg" * 10),
        3,
        None,
        "image",
        True,
    ),
    "image_size_mismatch": (lambda c, d: c["images"][0].update(width=65), 1, None, "images.width/height", True),
    "annotation_unknown_image": (
        lambda c, d: c["annotations"].append(_bad_ann(image_id=7)),
        7,
        99,
        "annotations.image_id",
        False,
    ),
    "annotation_unknown_category": (
        lambda c, d: c["annotations"].append(_bad_ann(category_id=5)),
        1,
        99,
        "annotations.category_id",
        False,
    ),
    "box_not_finite": (
        lambda c, d: c["annotations"].append(_bad_ann(bbox=[1.0, math.nan, 2.0, 2.0])),
        1,
        99,
        "annotations.bbox",
        False,
    ),
    "box_negative_size": (
        lambda c, d: c["annotations"].append(_bad_ann(bbox=[1.0, 1.0, -2.0, 2.0])),
        1,
        99,
        "annotations.bbox",
        False,
    ),
    "box_zero_area": (
        lambda c, d: c["annotations"].append(_bad_ann(bbox=[1.0, 1.0, 0.0, 2.0])),
        1,
        99,
        "annotations.bbox",
        False,
    ),
    "box_outside_image": (
        lambda c, d: c["annotations"].append(_bad_ann(bbox=[70.0, 1.0, 5.0, 5.0])),
        1,
        99,
        "annotations.bbox",
        False,
    ),
    "duplicate_annotation_id": (lambda c, d: c["annotations"].append(_bad_ann(id=10)), 1, 10, "annotations.id", False),
    "duplicate_image_id": (
        lambda c, d: c["images"].append({"id": 2, "file_name": "1.jpg", "width": 64, "height": 48}),
        2,
        None,
        "images.id",
        False,
    ),
}


@pytest.mark.parametrize("reason", sorted(CASES))
def test_bad_record_is_skipped_and_counted(tmp_path, reason):
    image_dir = str(tmp_path / "images")
    coco = _base_coco(image_dir)
    breaker, image_id, _, _, _ = CASES[reason]
    breaker(coco, image_dir)
    summary = convert_coco(image_dir, _write(tmp_path, coco), str(tmp_path / "out"), progress=False)
    assert summary.skips == {reason: 1}
    assert summary.examples[0]["image_id"] == image_id
    image_level = reason.startswith("image_")
    assert summary.num_images == (2 if image_level else 3)
    assert summary.num_annotations == (2 if image_level else 3)
    assert read_metadata(str(tmp_path / "out")).skips == {reason: 1}


@pytest.mark.parametrize("reason", sorted(CASES))
def test_bad_record_in_strict_mode_raises_naming_where(tmp_path, reason):
    image_dir = str(tmp_path / "images")
    coco = _base_coco(image_dir)
    breaker, image_id, ann_id, field, file_is_image = CASES[reason]
    breaker(coco, image_dir)
    annotations = _write(tmp_path, coco)
    with pytest.raises(BadRecordError) as info:
        convert_coco(image_dir, annotations, str(tmp_path / "out"), strict=True, progress=False)
    err = info.value
    assert (err.reason, err.image_id, err.ann_id, err.field) == (reason, image_id, ann_id, field)
    assert err.file.endswith(".jpg") if file_is_image else err.file == annotations
    for part in (reason, str(image_id), str(ann_id), field):
        assert part in str(err)


def test_box_partly_outside_is_clipped(tmp_path):
    image_dir = str(tmp_path / "images")
    coco = _base_coco(image_dir)
    coco["annotations"][0]["bbox"] = [50.0, -3.0, 30.0, 10.0]  # 64x48 image: clipped to x 50..64, y 0..7
    summary = convert_coco(image_dir, _write(tmp_path, coco), str(tmp_path / "out"), progress=False)
    assert summary.boxes_clipped == 1 and summary.skips == {}
    meta = read_metadata(str(tmp_path / "out"))
    row = read_shard(shard_uris(str(tmp_path / "out"), meta)[0]).to_pylist()[0]
    assert row["boxes"] == [50.0, 0.0, 14.0, 7.0]
    with pytest.raises(BadRecordError, match="box_outside_image"):
        convert_coco(image_dir, _write(tmp_path, coco), str(tmp_path / "strict"), strict=True, progress=False)


@pytest.fixture(scope="module")
def coco_split(tmp_path_factory):
    """A synthetic split of 23 images (json + jpgs), not yet converted."""
    root = tmp_path_factory.mktemp("coco")
    write_split(
        str(root / "images"), str(root / "instances.json"), 23, seed=5, split_code=0, image_size=(40, 64), max_objects=3
    )
    return str(root / "images"), str(root / "instances.json")


def _rows(out: str) -> list[dict]:
    meta = read_metadata(out)
    return [r for uri in shard_uris(out, meta) for r in read_shard(uri).to_pylist()]


def test_round_trip_keeps_bytes_and_annotations(coco_split, tmp_path):
    images, annotations = coco_split
    out = "file://" + str(tmp_path / "out")  # a URI goes through pyarrow.fs like s3:// would
    summary = convert_coco(images, annotations, out, shard_size=5, progress=False)
    assert summary.num_shards == 5 and summary.skips == {}
    coco = json.load(open(annotations))
    rows = _rows(out)
    assert [r["image_id"] for r in rows] == sorted(im["id"] for im in coco["images"])
    for r in rows:
        im = next(i for i in coco["images"] if i["id"] == r["image_id"])
        assert r["image"] == open(os.path.join(images, im["file_name"]), "rb").read()
        assert (r["file_name"], r["height"], r["width"]) == (im["file_name"], im["height"], im["width"])
        anns = [a for a in coco["annotations"] if a["image_id"] == r["image_id"]]
        assert r["ann_id"] == [a["id"] for a in anns]
        assert r["category_id"] == [a["category_id"] for a in anns]
        np.testing.assert_allclose(np.reshape(r["boxes"], (-1, 4)), np.reshape([a["bbox"] for a in anns], (-1, 4)))
        np.testing.assert_allclose(r["area"], [a["area"] for a in anns])
    meta = read_metadata(out)
    assert meta.num_images == 23 and meta.num_annotations == len(coco["annotations"])
    assert [c["id"] for c in meta.categories] == [1, 2, 3, 4] and meta.num_classes == 5


def test_resume_after_crash_rewrites_only_missing_shards(coco_split, tmp_path, monkeypatch):
    images, annotations = coco_split
    out = str(tmp_path / "out")
    real = convert_module._write_shard
    calls = []

    def crash_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "_write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        convert_coco(images, annotations, out, shard_size=5, progress=False)
    visible = sorted(f for f in os.listdir(out) if not f.startswith("."))
    assert visible == ["shard-00000.parquet", "shard-00001.parquet"]  # no metadata, no partial shard
    monkeypatch.setattr(convert_module, "_write_shard", real)
    summary = convert_coco(images, annotations, out, shard_size=5, progress=False)
    assert (summary.shards_resumed, summary.shards_written) == (2, 3)
    ids = [r["image_id"] for r in _rows(out)]
    assert len(ids) == len(set(ids)) == 23
    assert all(
        pq.ParquetFile(os.path.join(out, f)).metadata.num_rows > 0 for f in os.listdir(out) if f.endswith(".parquet")
    )
    with pytest.raises(ValueError, match="another shard size"):
        convert_coco(images, annotations, out, shard_size=4, progress=False)


def test_an_error_inside_a_shard_leaves_no_shard(coco_split, tmp_path, monkeypatch):
    images, annotations = coco_split
    out = str(tmp_path / "out")

    real_write = convert_module.pq.write_table

    def write_then_die(table, where, **kwargs):
        real_write(table, where, **kwargs)
        raise OSError("disk gone")  # after the temporary file is written, before its rename

    monkeypatch.setattr(convert_module.pq, "write_table", write_then_die)
    with pytest.raises(OSError):
        convert_coco(images, annotations, out, shard_size=5, progress=False)
    assert os.listdir(out) == []  # no shard, and the writer removed its hidden temporary file
    monkeypatch.undo()
    assert convert_coco(images, annotations, out, shard_size=5, progress=False).num_images == 23


def test_skipping_does_not_change_other_records(tmp_path):
    image_dir = str(tmp_path / "images")
    coco = _base_coco(image_dir)
    broken = copy.deepcopy(coco)
    broken["annotations"].append(_bad_ann(bbox=[1.0, 1.0, 0.0, 2.0]))
    convert_coco(image_dir, _write(tmp_path, broken), str(tmp_path / "a"), progress=False)
    convert_coco(image_dir, _write(tmp_path, coco), str(tmp_path / "b"), progress=False)
    assert _rows(str(tmp_path / "a")) == _rows(str(tmp_path / "b"))
