"""Images as cameras write them: an EXIF-rotated photo converts, trains and is predicted upright; 16-bit PNGs keep
their range; images of any aspect ratio (sides of 1 pixel) plan, decode and detect; reduced decoding keeps boxes in
the whole image's pixels. No Ray."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from ddetr.config import apply_overrides, get_preset
from ddetr.data.convert import convert_coco
from ddetr.data.decode import decode_example, decode_rgb
from ddetr.data.images import decode_reduced
from ddetr.data.shards import read_metadata, read_shard, shard_uris
from ddetr.data.transforms import (
    TransformConfig,
    resized_size,
    sample_train_geometry,
    transform_boxes,
    val_geometry,
)
from ddetr.inference import Detector, read_image
from ddetr.models import build_detector

UPRIGHT = (120, 200)  # width, height of the photo as shown
RECT = (20, 40, 50, 80)  # x, y, w, h of its red rectangle, upright


def upright_pixels() -> np.ndarray:
    w, h = UPRIGHT
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 2] = 60
    x, y, rw, rh = RECT
    arr[y : y + rh, x : x + rw] = (255, 0, 0)
    return arr


def exif_rotated_jpeg() -> bytes:
    """The upright picture stored as a camera held sideways writes it: turned a quarter counter-clockwise, with EXIF
    orientation 6 ("turn 90 degrees clockwise to show")."""
    stored = Image.fromarray(upright_pixels()).transpose(Image.Transpose.ROTATE_90)
    assert stored.size == (UPRIGHT[1], UPRIGHT[0])
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def red_extent(img: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero((img[..., 0].astype(int) > 128) & (img[..., 1] < 100))
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


@pytest.fixture(scope="module")
def detector() -> Detector:
    """A freshly initialised tiny model that reads shorter side 80, longer at most 133 (data.scale=0.1)."""
    torch.manual_seed(0)
    cfg = apply_overrides(get_preset("tiny"), ["data.scale=0.1"])
    return Detector(build_detector(cfg.model, load_backbone_weights=False), cfg, device="cpu")


def test_an_exif_rotated_photo_converts_trains_and_is_predicted_upright(tmp_path, detector):
    photo = exif_rotated_jpeg()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "photo.jpg").write_bytes(photo)
    w, h = UPRIGHT
    coco = {
        "categories": [{"id": 1, "name": "rectangle"}],
        # The annotation tool showed the photo upright: its size and box are upright. The second record gives the
        # stored size of the same file, so its box could be in either frame: skipped, saying why.
        "images": [{"id": 1, "file_name": "photo.jpg", "width": w, "height": h},
                   {"id": 2, "file_name": "photo.jpg", "width": h, "height": w}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": list(RECT), "area": 4000, "iscrowd": 0}],
    }  # fmt: skip
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    out = str(tmp_path / "shards" / "val")
    summary = convert_coco(str(tmp_path / "images"), str(tmp_path / "instances.json"), out, progress=False)
    assert summary.num_images == 1 and summary.skips == {"image_size_mismatch": 1}
    detail = summary.examples[0]["detail"]
    assert "file is 120x200 upright (stored 200x120 with EXIF orientation 6), record says 200x120" in detail

    row = read_shard(shard_uris(out, read_metadata(out))[0]).to_pylist()[0]
    assert (row["height"], row["width"]) == (h, w)  # the upright size is what the shard records
    cfg = TransformConfig().scaled(0.5)
    example = decode_example(row, cfg, train=False, seed=0, epoch=0)
    assert example["image"].shape[:2] == example["size"] == resized_size(h, w, cfg.val_size, cfg.max_size)
    assert example["image"].shape[0] > example["image"].shape[1]  # a portrait, as shown
    boxes, _ = transform_boxes(np.array([RECT], np.float64), val_geometry(h, w, cfg))
    np.testing.assert_allclose(red_extent(example["image"]), boxes[0], atol=1.5)  # the box is on the rectangle
    for epoch in range(6):  # training's random crops and flips follow the upright pixels too
        train = decode_example(row, cfg, train=True, seed=0, epoch=epoch)
        geo = sample_train_geometry(h, w, cfg, np.random.default_rng([0, epoch, 1]))
        boxes, keep = transform_boxes(np.array([RECT], np.float64), geo)
        assert train["image"].shape[:2] == geo.out_size
        if keep[0] and min(boxes[0, 2] - boxes[0, 0], boxes[0, 3] - boxes[0, 1]) > 4:
            np.testing.assert_allclose(red_extent(train["image"]), boxes[0], atol=2.0)

    path = tmp_path / "images" / "photo.jpg"
    reference = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))  # PIL's own reading of the tag
    assert reference.shape == (h, w, 3)
    np.testing.assert_array_equal(read_image(path), reference)  # what `ddetr predict` draws on
    found = detector.predict_files([str(path)])[str(path)]
    direct = detector.predict([reference])[0]
    torch.testing.assert_close(found["scores"], direct["scores"])
    torch.testing.assert_close(found["boxes"], direct["boxes"])  # in upright pixels
    centres = (found["boxes"][:, :2] + found["boxes"][:, 2:]) / 2  # the model's centres lie inside the image
    assert float(centres[:, 0].max()) <= w and float(centres[:, 1].max()) <= h


def test_a_16_bit_png_keeps_its_whole_range():
    ramp = np.linspace(0, 65535, 512).round().astype(np.uint16).reshape(2, 256)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    assert Image.open(buffer).mode.startswith("I")  # 16 bits per sample as PIL reads it
    for pixels in (decode_rgb(buffer.getvalue()), decode_reduced(buffer.getvalue(), 2, None)[0]):
        assert pixels.dtype == np.uint8 and pixels.shape[2] == 3
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
    grey = decode_rgb(buffer.getvalue())[..., 0].astype(int)
    np.testing.assert_array_equal(grey, np.round(ramp / 257))  # 0..65535 -> 0..255, not clipped at 255
    assert grey.min() == 0 and grey.max() == 255 and grey.reshape(-1)[256] == 128  # mid-grey stays mid-grey


@pytest.mark.parametrize(
    ("h", "w", "size", "max_size", "expected"),
    [(1, 3000, 80, 133, (1, 133)), (3000, 1, 80, 133, (133, 1)), (1, 200, 80, 133, (1, 133)),
     (2, 3000, 800, 1333, (1, 1333)), (1, 1, 80, 133, (80, 80)), (480, 640, 800, 1333, (800, 1066))],
)  # fmt: skip
def test_every_side_is_at_least_one_pixel_and_the_longer_at_most_max_size(h, w, size, max_size, expected):
    assert resized_size(h, w, size, max_size) == expected


@pytest.mark.parametrize(("h", "w"), [(1, 3000), (3000, 1), (1, 1)])
def test_a_sliver_of_an_image_trains_and_is_detected(h, w, detector):
    pixels = np.full((h, w, 3), 200, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    row = {"image_id": 5, "height": h, "width": w, "image": buffer.getvalue(), "boxes": [0.0, 0.0, float(w), float(h)],
           "category_id": [1], "iscrowd": [0]}  # fmt: skip
    cfg = TransformConfig().scaled(0.1)
    for train, epoch in ((False, 0), *((True, e) for e in range(4))):  # the crop branch and the plain resize
        example = decode_example(row, cfg, train=train, seed=0, epoch=epoch)
        assert example["image"].shape[:2] == example["size"] and min(example["size"]) >= 1
        assert max(example["size"]) <= max(cfg.max_size, max(cfg.crop_range)) + 1
    found = detector.predict([pixels, np.zeros((72, 96, 3), np.uint8)])  # beside an ordinary image, in one batch
    assert len(found) == 2 and len(found[0]["scores"]) == 100
    centres = (found[0]["boxes"][:, :2] + found[0]["boxes"][:, 2:]) / 2
    assert float(centres[:, 0].max()) <= w and float(centres[:, 1].max()) <= h


def test_reduced_decoding_keeps_boxes_in_the_whole_image(detector):
    h, w = 900, 1200
    arr = np.zeros((h, w, 3), np.uint8)
    arr[300:600, 150:450] = (255, 0, 0)
    for fmt in ("JPEG", "PNG"):
        buffer = io.BytesIO()
        Image.fromarray(arr).save(buffer, format=fmt)
        pixels, size = decode_reduced(buffer.getvalue(), detector.size, detector.max_size)
        needed = resized_size(h, w, detector.size, detector.max_size)
        assert size == (h, w)
        assert needed[0] <= pixels.shape[0] < 2 * needed[0] and needed[1] <= pixels.shape[1] < 2 * needed[1], fmt
        fy, fx = h / pixels.shape[0], w / pixels.shape[1]
        x0, y0, x1, y1 = red_extent(pixels)
        np.testing.assert_allclose([x0 * fx, y0 * fy, x1 * fx, y1 * fy], [150, 300, 450, 600], atol=2 * max(fx, fy))
        # The model's boxes are fractions of the image: given the whole size, they are in its pixels.
        whole, own = detector.predict([pixels], [size])[0], detector.predict([pixels])[0]
        torch.testing.assert_close(whole["boxes"], own["boxes"] * torch.tensor([fx, fy, fx, fy]), rtol=1e-5, atol=1e-3)


def test_predict_files_skips_what_does_not_decode_and_detects_a_sliver(tmp_path: Path, detector, caplog):
    sliver, truncated = tmp_path / "sliver.png", tmp_path / "truncated.jpg"
    Image.fromarray(np.full((1, 3000, 3), 90, np.uint8)).save(sliver)
    truncated.write_bytes(exif_rotated_jpeg()[:400])
    with caplog.at_level("WARNING"):
        found = detector.predict_files([str(truncated), str(sliver)], batch_size=2)
    assert list(found) == [str(sliver)] and len(found[str(sliver)]["scores"]) == 100
    assert any(str(truncated) in r.getMessage() and "not a readable image" in r.getMessage() for r in caplog.records)
