"""Transforms: boxes follow the pixels through flip, crop, resize and reduced-size JPEG decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ddetr.config import DataConfig
from ddetr.data.decode import decode_example, decode_image
from ddetr.data.transforms import (
    Geometry,
    TransformConfig,
    resized_size,
    sample_train_geometry,
    transform_boxes,
    val_geometry,
)

RECT = (37.0, 52.0, 61.0, 40.0)  # x, y, w, h of the red rectangle, in original pixels


def _image_with_rect(w: int, h: int, fmt: str, rect=RECT) -> bytes:
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 2] = 60  # a dark blue background
    x, y, rw, rh = (int(v) for v in rect)
    arr[y : y + rh, x : x + rw] = (255, 0, 0)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _red_extent(img: np.ndarray) -> tuple[float, float, float, float] | None:
    red = (img[..., 0].astype(int) > 128) & (img[..., 1] < 100)
    ys, xs = np.nonzero(red)
    if len(xs) == 0:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def test_paper_defaults_and_cpu_preset():
    cfg = TransformConfig()
    assert cfg.scales == (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    assert (cfg.max_size, cfg.crop_resize, cfg.crop_range, cfg.val_size) == (1333, (400, 500, 600), (384, 600), 800)
    small = TransformConfig.small()
    assert small.scales == (96, 102, 109, 115, 122, 128, 134, 141, 147, 154, 160)
    assert (small.max_size, small.crop_resize, small.crop_range, small.val_size) == (
        267,
        (80, 100, 120),
        (77, 120),
        160,
    )


def test_training_augmentation_follows_the_data_config():
    rng = np.random.default_rng(0)
    paper = TransformConfig.for_training(DataConfig(scale=0.2))
    assert paper == TransformConfig.small()
    geos = [sample_train_geometry(150, 180, paper, rng) for _ in range(200)]
    assert any(g.crop != (0.0, 0.0, 180.0, 150.0) for g in geos)  # the crop branch
    assert len({g.out_size for g in geos}) > 5  # random shorter sides
    plain = TransformConfig.for_training(DataConfig(scale=0.2, crop_p=0.0, multi_scale=False))
    geos = [sample_train_geometry(150, 180, plain, rng) for _ in range(200)]
    val = val_geometry(150, 180, plain)
    assert {(g.crop, g.out_size) for g in geos} == {(val.crop, val.out_size)}
    assert {g.flip for g in geos} == {False, True}  # flips stay


@pytest.mark.parametrize(
    "h, w, size, max_size, expected",
    [
        (480, 640, 800, 1333, (800, 1066)),
        (1000, 3000, 800, 1333, (444, 1332)),
        (600, 400, 400, None, (600, 400)),
        (640, 480, 800, 1333, (1066, 800)),
    ],
)
def test_resized_size_follows_detr(h, w, size, max_size, expected):
    assert resized_size(h, w, size, max_size) == expected


def test_flip_mirrors_boxes_exactly():
    geo = Geometry((0.0, 0.0, 200.0, 100.0), (50, 100), flip=True)
    boxes, keep = transform_boxes(np.array([[10.0, 20.0, 30.0, 40.0]]), geo)
    assert keep.tolist() == [True]
    np.testing.assert_allclose(boxes, [[100 - 20.0, 10.0, 100 - 5.0, 30.0]])


def test_crop_clips_and_drops_boxes():
    geo = Geometry((50.0, 0.0, 150.0, 100.0), (100, 100), flip=False)
    boxes, keep = transform_boxes(np.array([[40.0, 10.0, 20.0, 20.0], [0.0, 0.0, 30.0, 30.0]]), geo)
    assert keep.tolist() == [True, False]
    np.testing.assert_allclose(boxes, [[0.0, 10.0, 10.0, 30.0]])


@pytest.mark.parametrize("fmt, size, tol", [("PNG", (200, 150), 1.5), ("JPEG", (800, 600), 2.0)])
def test_boxes_cover_the_transformed_rectangle(fmt, size, tol):
    w, h = size
    rect = RECT if fmt == "PNG" else tuple(4 * v for v in RECT)
    data = _image_with_rect(w, h, fmt, rect)
    cfg = TransformConfig.small() if fmt == "JPEG" else TransformConfig().scaled(0.25)
    crops = flips = 0
    for seed in range(40):
        geo = sample_train_geometry(h, w, cfg, np.random.default_rng(seed))
        crops += geo.crop != (0.0, 0.0, float(w), float(h))
        flips += geo.flip
        img = decode_image(data, (h, w), geo)
        assert img.shape == (*geo.out_size, 3) and img.dtype == np.uint8
        boxes, keep = transform_boxes(np.array([rect]), geo)
        extent = _red_extent(img)
        if not keep[0]:
            assert extent is None
            continue
        if extent is None:  # a sliver thinner than half an output pixel vanishes in resampling
            assert min(boxes[0, 2] - boxes[0, 0], boxes[0, 3] - boxes[0, 1]) < 1
            continue
        np.testing.assert_allclose(boxes[0], extent, atol=tol)
    assert crops > 5 and flips > 5  # both branches and both flips were exercised


def test_reduced_size_decoding_keeps_geometry():
    data = _image_with_rect(800, 600, "JPEG", tuple(4 * v for v in RECT))
    geo = val_geometry(600, 800, TransformConfig.small())
    assert geo.out_size == (160, 213)
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (213, 160))
    assert img.size == (400, 300)  # what decode_image gets: the 1/2 DCT scale
    out = decode_image(data, (600, 800), geo)
    assert out.shape == (160, 213, 3)
    boxes, _ = transform_boxes(np.array([[4 * v for v in RECT]]), geo)
    np.testing.assert_allclose(boxes[0], _red_extent(out), atol=1.5)


def test_example_target_is_normalised_and_crowd_free():
    data = _image_with_rect(200, 150, "PNG")
    row = {
        "image_id": 7,
        "height": 150,
        "width": 200,
        "image": data,
        "boxes": [*RECT, 0.0, 0.0, 50.0, 50.0],
        "category_id": [3, 1],
        "iscrowd": [0, 1],
    }
    cfg = TransformConfig(val_size=150).scaled(0.25)
    ex = decode_example(row, TransformConfig(val_size=150), train=False, seed=0, epoch=0)
    assert ex["size"] == (150, 200) and ex["orig_size"] == (150, 200)  # the original size is kept
    assert ex["labels"].tolist() == [3] and ex["boxes"].dtype == np.float32
    x, y, w, h = RECT
    np.testing.assert_allclose(ex["boxes"][0], [(x + w / 2) / 200, (y + h / 2) / 150, w / 200, h / 150], atol=1e-6)
    a = decode_example(row, cfg, train=True, seed=3, epoch=1)
    b = decode_example(row, cfg, train=True, seed=3, epoch=1)
    c = decode_example(row, cfg, train=True, seed=3, epoch=2)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["boxes"], b["boxes"])
    assert a["size"] != c["size"] or not np.array_equal(a["image"], c["image"])
