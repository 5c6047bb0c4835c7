"""The data path's fast parts: PIL's flip, images into and out of Arrow without extra copies, Ray Data blocks that
leave a decode task as they are decoded, and the cap on concurrent decode tasks."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from ddetr.data.collate import collate_columns, table_columns
from ddetr.data.decode import decode_image, examples_to_table
from ddetr.data.synthetic import make_synthetic_coco
from ddetr.data.transforms import Geometry, TransformConfig

CFG = TransformConfig().scaled(0.1)


def _jpeg(h: int, w: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_flipped_decode_is_the_mirror_of_the_unflipped_one():
    data = _jpeg(60, 80)
    for crop, out in [((0.0, 0.0, 80.0, 60.0), (90, 120)), ((7.5, 3.25, 61.0, 50.5), (47, 53))]:
        plain = decode_image(data, (60, 80), Geometry(crop, out, False))
        flipped = decode_image(data, (60, 80), Geometry(crop, out, True))
        assert flipped.shape == (*out, 3) and flipped.dtype == np.uint8
        np.testing.assert_array_equal(flipped, plain[:, ::-1])


def _example(i: int, h: int, w: int) -> dict:
    rng = np.random.default_rng(i)
    n = int(rng.integers(0, 4))
    return {
        "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "boxes": rng.random((n, 4), dtype=np.float32),
        "labels": rng.integers(1, 90, n),
        "image_id": 100 + i,
        "orig_size": (h * 2, w * 2),
        "size": (h, w),
        "substitute": i == 2,
    }


def test_images_cross_arrow_unchanged_and_are_read_in_place():
    examples = [_example(i, h, w) for i, (h, w) in enumerate([(5, 7), (9, 4), (6, 6), (1, 1)])]
    table = examples_to_table(examples)
    assert table.column("image").to_pylist() == [e["image"].tobytes() for e in examples]
    # A table as Ray hands it over: several chunks, a slice starting inside one.
    chunked = pa.concat_tables([table, examples_to_table(examples[:2])]).slice(1, 5)
    expected = [examples[i] for i in (1, 2, 3, 0, 1)]
    columns = table_columns(chunked)
    for view, e in zip(columns["image"], expected, strict=True):
        np.testing.assert_array_equal(view, e["image"].reshape(-1))
    wide = chunked.set_column(0, "image", chunked.column("image").cast(pa.large_binary()))
    for view, e in zip(table_columns(wide)["image"], expected, strict=True):
        np.testing.assert_array_equal(view, e["image"].reshape(-1))
    # The same model batch as from Ray's own numpy conversion.
    numpy_columns = {name: chunked.column(name).to_numpy(zero_copy_only=False) for name in chunked.column_names}
    ours, theirs = collate_columns(columns), collate_columns(numpy_columns)
    assert ours["substituted"] == theirs["substituted"] == 1
    assert (ours["images"] == theirs["images"]).all() and (ours["mask"] == theirs["mask"]).all()
    for a, b in zip(ours["targets"], theirs["targets"], strict=True):
        assert all((a[k] == b[k]).all() for k in b)


def test_table_columns_of_an_empty_batch():
    table = examples_to_table([])
    assert table.num_rows == 0 and table_columns(table)["image"] == []


@pytest.mark.ray
def test_decoded_chunks_leave_the_task_as_blocks_and_tasks_are_capped(tmp_path, ray_local, hard_timeout):
    from ray.data import DataContext

    from ddetr.data.pipeline import build_ray_dataset, decode_task_cap

    DataContext.get_current().enable_progress_bars = False
    paths = make_synthetic_coco(str(tmp_path), 24, 0, seed=0, image_size=(64, 96), shard_size=24)
    with hard_timeout(120):
        # One read item of 24 images, decoded 4 at a time: Ray Data's default block target (128 MiB) would gather them
        # into one block at the task's end, and the first batch would wait for the whole task.
        ds = build_ray_dataset(paths.train_shards, CFG, train=True, decode_batch_size=4, read_size=24)
        assert ds.materialize().num_blocks() >= 24 // 4
    assert decode_task_cap(1) == 3 and decode_task_cap(2) == 2 and decode_task_cap(8) == 2  # ray_local: 2 CPUs
