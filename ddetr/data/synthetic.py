"""A small synthetic COCO dataset of coloured shapes: the demo's default data and the tests' fixture.

Each image is a noisy, textured background with 0 to ``max_objects`` filled shapes (categories
below), each with its own colour, sizes from small to large, allowed to overlap a little. It is
easy enough that a tiny Deformable DETR trained for minutes on a CPU reaches a useful AP50, and
it is a real COCO split: JPEG files plus an ``instances_*.json``, converted to shards like COCO.
Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from PIL import Image, ImageDraw

from ddetr import io
from ddetr.data.convert import convert_coco

# (id, name, RGB colour): distinct hues so colour alone nearly tells the class.
CATEGORIES = [
    (1, "rectangle", (220, 40, 40)),
    (2, "ellipse", (40, 200, 60)),
    (3, "triangle", (50, 80, 230)),
    (4, "diamond", (230, 210, 40)),
]
MAX_OVERLAP = 0.35  # a new object covering more of an old box (or vice versa) is redrawn elsewhere


@dataclass
class SyntheticPaths:
    """Where ``make_synthetic_coco`` put each split: image folder, instances json, shard directory."""

    root: str
    train_images: str
    train_annotations: str
    train_shards: str
    val_images: str
    val_annotations: str
    val_shards: str


def make_synthetic_coco(
    out_dir: str,
    num_train: int,
    num_val: int,
    seed: int = 0,
    image_size: tuple[int, int] = (128, 192),
    max_objects: int = 4,
    shard_size: int = 256,
    row_group_size: int | None = None,
) -> SyntheticPaths:
    """Write a synthetic COCO dataset and its shards under ``out_dir``.

    Layout: ``images/{train,val}/*.jpg``, ``annotations/instances_{train,val}.json``,
    ``shards/{train,val}/``. Image sides are drawn uniformly from ``image_size`` (min, max).
    ``row_group_size`` defaults to the converter's. ``out_dir`` may be a URI (``s3://bucket/synth``).
    """
    paths = SyntheticPaths(
        root=out_dir,
        train_images=io.join(out_dir, "images", "train"),
        train_annotations=io.join(out_dir, "annotations", "instances_train.json"),
        train_shards=io.join(out_dir, "shards", "train"),
        val_images=io.join(out_dir, "images", "val"),
        val_annotations=io.join(out_dir, "annotations", "instances_val.json"),
        val_shards=io.join(out_dir, "shards", "val"),
    )
    for split_code, (n, images, annotation_file, shards) in enumerate(
        [
            (num_train, paths.train_images, paths.train_annotations, paths.train_shards),
            (num_val, paths.val_images, paths.val_annotations, paths.val_shards),
        ]
    ):
        write_split(images, annotation_file, n, seed, split_code, image_size, max_objects)
        extra = {} if row_group_size is None else {"row_group_size": row_group_size}
        convert_coco(images, annotation_file, shards, shard_size=shard_size, progress=False, **extra)
    return paths


def write_split(
    image_dir: str,
    annotation_file: str,
    num_images: int,
    seed: int,
    split_code: int,
    image_size: tuple[int, int],
    max_objects: int,
) -> None:
    """Draw ``num_images`` images into ``image_dir`` and write their COCO json to ``annotation_file`` (paths or
    URIs)."""
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, split_code, i])
        image_id = i + 1
        img, objects = draw_image(rng, image_size, max_objects)
        name = f"{image_id:08d}.jpg"
        jpeg = BytesIO()
        img.save(jpeg, format="JPEG", quality=90)
        io.atomic_write(io.join(image_dir, name), jpeg.getvalue())
        images.append({"id": image_id, "file_name": name, "height": img.height, "width": img.width})
        for cat, box, area in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": box,
                    "area": area,
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"description": f"ddetr synthetic shapes, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": n, "supercategory": "shape"} for c, n, _ in CATEGORIES],
    }
    io.atomic_write(annotation_file, json.dumps(coco))


def draw_image(
    rng: np.random.Generator, image_size: tuple[int, int], max_objects: int
) -> tuple[Image.Image, list[tuple[int, list[float], float]]]:
    """One image and its objects as ``(category_id, [x, y, w, h], area)``.

    The box is the exact pixel extent of the drawn shape; the area its pixel count.
    """
    w, h = (int(v) for v in rng.integers(image_size[0], image_size[1] + 1, size=2))
    pixels = _background(rng, h, w)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    # Mostly 1-3 objects, sometimes none, sometimes max_objects.
    n = int(min(rng.poisson(2.0), max_objects))
    objects: list[tuple[int, list[float], float]] = []
    placed: list[tuple[float, float, float, float]] = []
    for _ in range(n):
        for _attempt in range(10):
            side = rng.uniform(0.12, 0.6) * min(w, h)
            bw, bh = side * rng.uniform(0.7, 1.4), side * rng.uniform(0.7, 1.4)
            bw, bh = min(bw, w - 2), min(bh, h - 2)
            x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            if all(_overlap((x0, y0, x0 + bw, y0 + bh), p) < MAX_OVERLAP for p in placed):
                break
        else:
            continue
        cat, _, colour = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        jitter = rng.integers(-20, 21, size=3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, jitter, strict=True))
        mask = Image.new("L", (w, h), 0)
        for canvas, colour_ in ((draw, fill), (ImageDraw.Draw(mask), 255)):
            _shape(canvas, cat, (x0, y0, x0 + bw, y0 + bh), colour_)
        m = np.asarray(mask) > 0
        ys, xs = np.nonzero(m)
        if len(xs) == 0:
            continue
        box = [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]
        placed.append((x0, y0, x0 + bw, y0 + bh))
        objects.append((cat, box, float(m.sum())))
    return img, objects


def _shape(draw: ImageDraw.ImageDraw, cat: int, box: tuple[float, float, float, float], fill) -> None:
    x0, y0, x1, y1 = box
    if cat == 1:
        draw.rectangle(box, fill=fill)
    elif cat == 2:
        draw.ellipse(box, fill=fill)
    elif cat == 3:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A greyish gradient with blotchy low-frequency texture and pixel noise, (h, w, 3) uint8."""
    base = rng.uniform(70, 170, size=3)
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    slope = rng.uniform(-0.3, 0.3, size=2)
    coarse = rng.normal(0, 18, size=(h // 16 + 2, w // 16 + 2, 3))
    texture = np.kron(coarse, np.ones((16, 16, 1)))[:h, :w]
    noise = rng.normal(0, 8, size=(h, w, 3))
    img = base + (slope[0] * gy + slope[1] * gx)[..., None] + texture + noise
    return np.clip(img, 0, 255).astype(np.uint8)


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over the smaller box: how much of either box the other covers."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller if smaller > 0 else 0.0
