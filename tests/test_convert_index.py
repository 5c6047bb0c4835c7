"""The streamed, packed annotation index of a conversion: what json.loads and validate.py would give, in less."""

from __future__ import annotations

import io
import json

import pytest

from ddetr.data import coco_index
from ddetr.data.coco_index import PackedAnnotations, read_index, stream_array
from ddetr.data.validate import SkipLog, check_annotations, check_categories, check_images


def coco_dict() -> dict:
    """Members in an order COCO does not use (annotations before images), a nested member to skip, numbers of many
    digits, non-ASCII names, and records validate.py skips: a duplicate annotation id, a box outside its image."""
    images = [{"id": i, "file_name": f"ü{i}.jpg", "width": 640, "height": 480 + i} for i in range(1, 40)]
    anns = [
        {"id": 1000 + k, "image_id": 1 + k % 39, "category_id": 1 + k % 3, "bbox": [k / 7, 2.123456789012345, 30.5, 20],
         "area": 610.25 + k, "iscrowd": k % 5 == 0, "segmentation": [[1, 2, 3, 4.5]]}
        for k in range(300)
    ]  # fmt: skip
    anns.append({**anns[10], "bbox": [1, 1, 5, 5]})  # the same id again
    anns.append({**anns[11], "id": 5000, "bbox": [700, 10, 5, 5]})  # outside the 640-wide image
    return {
        "info": {"year": 2017, "nested": {"a": [1, {"b": [2, 3]}], "s": "]},{"}},
        "annotations": anns,
        "licenses": [],
        "images": images,
        "categories": [{"id": c, "name": f"class {c}"} for c in (1, 2, 3)],
    }


def test_stream_array_gives_each_element_across_buffer_ends(monkeypatch):
    monkeypatch.setattr(coco_index, "CHUNK_CHARS", 7)  # every value cut by a read, numbers included
    coco = coco_dict()
    text = json.dumps(coco, indent=1, ensure_ascii=False).encode()
    for key in ("images", "annotations", "categories", "licenses", "missing"):
        assert list(stream_array(io.BytesIO(text), key, "x.json")) == coco.get(key, [])


def test_stream_array_names_the_file_of_bad_json():
    with pytest.raises(ValueError, match=r"x\.json: not valid JSON"):
        list(stream_array(io.BytesIO(b'{"images": [{"id": 1}, {"id": 2]}'), "images", "x.json"))


def test_read_index_is_what_validate_gives_for_the_whole_json(tmp_path, monkeypatch):
    monkeypatch.setattr(coco_index, "ANNOTATION_BATCH", 64)  # duplicates found across batches
    coco = coco_dict()
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    skips = SkipLog()
    categories, records, anns, clipped = read_index(str(path), skips)

    expected_skips = SkipLog()
    assert categories == check_categories(coco["categories"], expected_skips, str(path))
    assert records == check_images(coco["images"], expected_skips, str(path))
    by_image, expected_clipped = check_annotations(coco["annotations"], records, {1, 2, 3}, expected_skips, str(path))
    assert clipped == expected_clipped
    assert skips.counts == expected_skips.counts == {"duplicate_annotation_id": 1, "box_outside_image": 1}
    for iid in records:
        unpacked = anns.get(iid)
        assert unpacked == by_image.get(iid, [])
        assert [type(v) for o in unpacked for v in o.values()] == [type(v) for o in by_image[iid] for v in o.values()]


def test_packed_annotations_keep_ids_past_64_bits():
    packed = PackedAnnotations()
    big = {"id": 2**70, "bbox": [1.0, 2.0, 3.0, 4.0], "category_id": 1, "iscrowd": 0, "area": 12.0}
    packed.add({7: [big]})
    assert packed[7] == [big] and 7 in packed and 8 not in packed and packed.get(8) == []
