"""The synthetic COCO: deterministic from its seed, valid COCO, boxes on the drawn shapes."""

from __future__ import annotations

import filecmp
import json
import os

import numpy as np

from ddetr.data.shards import read_metadata
from ddetr.data.synthetic import CATEGORIES, draw_image, make_synthetic_coco


def test_same_seed_same_dataset_other_seed_another(tmp_path):
    a = make_synthetic_coco(str(tmp_path / "a"), 12, 4, seed=7, image_size=(64, 96), shard_size=5)
    b = make_synthetic_coco(str(tmp_path / "b"), 12, 4, seed=7, image_size=(64, 96), shard_size=5)
    c = make_synthetic_coco(str(tmp_path / "c"), 12, 4, seed=8, image_size=(64, 96), shard_size=5)
    for split in ("train_images", "val_images"):
        names = sorted(os.listdir(getattr(a, split)))
        _, mismatch, errors = filecmp.cmpfiles(getattr(a, split), getattr(b, split), names, shallow=False)
        assert mismatch == errors == []
    assert json.load(open(a.train_annotations)) != json.load(open(c.train_annotations))
    ja, jb = json.load(open(a.train_annotations)), json.load(open(b.train_annotations))
    assert ja["annotations"] == jb["annotations"] and ja["images"] == jb["images"]
    for name in sorted(os.listdir(a.train_shards)):
        if name.endswith(".parquet"):
            assert filecmp.cmp(os.path.join(a.train_shards, name), os.path.join(b.train_shards, name), shallow=False)
    meta = read_metadata(a.train_shards)
    assert (meta.num_images, len(meta.shards), meta.skips) == (12, 3, {})
    assert read_metadata(a.val_shards).num_images == 4


def test_objects_are_valid_and_cover_their_pixels():
    counts = []
    colours = {cid: np.array(rgb) for cid, _, rgb in CATEGORIES}
    for i in range(60):
        img, objects = draw_image(np.random.default_rng([0, 0, i]), (128, 192), 4)
        arr = np.asarray(img).astype(int)
        assert 128 <= img.width <= 192 and 128 <= img.height <= 192
        counts.append(len(objects))
        for cat, (x, y, w, h), area in objects:
            assert cat in colours and w > 0 and h > 0 and 0 < area <= w * h
            assert x >= 0 and y >= 0 and x + w <= img.width and y + h <= img.height
            assert min(w, h) >= 0.1 * min(img.width, img.height)  # not too tiny to learn
            # The shape's colour is present inside its box (it may be partly covered by a later one).
            patch = arr[int(y) : int(y + h), int(x) : int(x + w)]
            close = np.abs(patch - colours[cat]).max(axis=-1) < 60
            assert close.mean() > 0.2
    assert min(counts) == 0 and max(counts) == 4 and 1.5 < np.mean(counts) < 3
