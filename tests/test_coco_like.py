"""The benchmarks' COCO-like folder: a COCO split that conversion accepts, deterministic, photograph-sized JPEGs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from ddetr.data.convert import convert_coco

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def coco_like():
    spec = importlib.util.spec_from_file_location("coco_like", ROOT / "benchmarks" / "coco_like.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["coco_like"] = module
    spec.loader.exec_module(module)
    return module


def test_folder_is_a_coco_split_with_photograph_sized_jpegs(coco_like, tmp_path):
    ann = coco_like.write_coco_like(tmp_path / "a", 6, seed=3)
    assert ann == tmp_path / "a" / "annotations.json"
    coco = json.loads(ann.read_text())
    assert [im["id"] for im in coco["images"]] == [1, 2, 3, 4, 5, 6]
    category_ids = {c["id"] for c in coco["categories"]}
    assert len(category_ids) == 80 and max(category_ids) == 90  # COCO's ids, with its gaps
    per_image = {im["id"]: 0 for im in coco["images"]}
    sizes = {}
    for im in coco["images"]:
        path = tmp_path / "a" / "images" / im["file_name"]
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert img.size == (im["width"], im["height"])
        assert max(im["width"], im["height"]) in (640, 612, 500)
        sizes[im["id"]] = path.stat().st_size
    for a in coco["annotations"]:
        im = coco["images"][a["image_id"] - 1]
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0
        assert x + w <= im["width"] + 0.01 and y + h <= im["height"] + 0.01
        assert a["category_id"] in category_ids and a["iscrowd"] == 0
        per_image[a["image_id"]] += 1
    assert all(1 <= n <= 15 for n in per_image.values())
    # Photographs' bytes, not synthetic shapes' (~10x smaller): COCO's mean is ~160 KB.
    assert all(60_000 < s < 400_000 for s in sizes.values()), sizes

    summary = convert_coco(str(tmp_path / "a" / "images"), str(ann), str(tmp_path / "shards"), progress=False)
    assert summary.num_images == 6 and summary.num_annotations == len(coco["annotations"]), summary
    assert not summary.skips and summary.boxes_clipped == 0, summary


def test_same_seed_same_bytes_and_any_subset_alone(coco_like, tmp_path):
    coco_like.write_coco_like(tmp_path / "a", 4, seed=1)
    coco_like.write_coco_like(tmp_path / "b", 2, seed=1)
    coco_like.write_coco_like(tmp_path / "c", 2, seed=2)
    a, b, c = (tmp_path / d / "images" / "000000000002.jpg" for d in "abc")
    assert a.read_bytes() == b.read_bytes()  # image 2 depends on (seed, 2) only, not on how many are written
    assert a.read_bytes() != c.read_bytes()
    assert not list((tmp_path / "a").rglob(".*tmp*"))  # every file was renamed into place
    with pytest.raises(ValueError, match="n_images"):
        coco_like.write_coco_like(tmp_path / "d", 0)
