"""COCO-like JPEGs for benchmarks: COCO's image sizes and bytes per image, photographic content, boxes.

The synthetic shapes of ``ddetr.data.synthetic`` compress about ten times better than photographs and decode
faster, so they understate what decoding costs on COCO. This writes a COCO folder whose JPEGs cost what COCO's
do: ~640x480 (COCO's mix of landscape, portrait and 640x427-like sizes), ~160 KB each at quality 90 (the mean
over COCO train2017 is ~160 KB), with 1-15 boxes per image over COCO's own non-contiguous category ids.

Nothing is downloaded: the content comes from the sample data matplotlib (a dependency of ddetr) ships -- the
Grace Hopper photograph and two terrain models rendered with hill shading -- cut, scaled and pasted into a pool
of collages once per process, then each image is a crop of one pool collage blended with another, flipped, with
a little grain (the grain is what brings the bytes to a photograph's: the samples are small, so their upscaled
pieces are smoother than a camera's pixels). Image ``i`` depends only on (seed, i), so any subset of a folder can
be written again identically, by any number of processes.

    python benchmarks/coco_like.py OUT --images 2000 [--seed 0] [--quality 90]

writes ``OUT/images/000000000001.jpg ...`` and ``OUT/annotations.json`` (COCO instances json: ``images``,
``annotations`` with ``bbox`` [x, y, w, h], ``area``, ``iscrowd``; ``categories``). From Python:
``write_coco_like(folder, n_images, seed=0, quality=90) -> Path`` (the annotations file).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib import cbook
from matplotlib.colors import LightSource
from PIL import Image

# COCO's 80 category ids (1..90 with gaps) and names.
COCO_CATEGORIES = dict(
    enumerate(
        "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant - stop_sign "
        "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe - backpack umbrella - - "
        "handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard "
        "surfboard tennis_racket bottle - wine_glass cup fork knife spoon bowl banana apple sandwich orange "
        "broccoli carrot hot_dog pizza donut cake chair couch potted_plant bed - dining_table - - toilet - tv "
        "laptop mouse remote keyboard cell_phone microwave oven toaster sink refrigerator - book clock vase "
        "scissors teddy_bear hair_drier toothbrush".split(),
        start=1,
    )
)
COCO_CATEGORIES = {k: v.replace("_", " ") for k, v in COCO_CATEGORIES.items() if v != "-"}
# (width, height) and weight: COCO train2017's most common sizes (640 on the long side for ~90% of images).
SIZES = (
    ((640, 480), 0.42),
    ((480, 640), 0.14),
    ((640, 427), 0.16),
    ((427, 640), 0.06),
    ((640, 425), 0.06),
    ((640, 360), 0.05),
    ((500, 375), 0.04),
    ((640, 512), 0.04),
    ((612, 612), 0.03),
)
POOL_SIZE = 128  # collages per process: built once (~1 s), enough that crops of pairs rarely repeat
POOL_SIDE = 704  # each collage is POOL_SIDE square: room to crop any of SIZES at an offset
GRAIN = 19.0  # std of the grain in 8-bit levels: brings the mean JPEG at quality 90 to ~160 KB (measured: 161)
GRAIN_SIDE = 1024  # side of the grain bank that each image takes a random window of (no per-image RNG of pixels)


def _sample(name: str) -> Any:
    return cbook.get_sample_data(name, asfileobj=False)


@lru_cache(maxsize=1)
def _sources() -> list[Image.Image]:
    """The photograph and shaded terrain renderings the collages are cut from (RGB), and the sprite (RGBA)."""
    photo = Image.open(_sample("grace_hopper.jpg")).convert("RGB")
    shade = LightSource(azdeg=315, altdeg=45)
    terrains = [
        np.load(_sample("jacksboro_fault_dem.npz"))["elevation"].astype(np.float64),
        np.load(_sample("topobathy.npz"))["topo"].astype(np.float64),
    ]
    sources = [photo, photo.transpose(Image.FLIP_LEFT_RIGHT), photo.convert("L").convert("RGB")]
    for terrain in terrains:
        for cmap in ("gist_earth", "terrain", "copper", "bone", "pink"):
            rgb = shade.shade(terrain, cmap=matplotlib.colormaps[cmap], blend_mode="soft", vert_exag=0.05)
            sources.append(Image.fromarray((rgb[..., :3] * 255).astype(np.uint8)))
    return sources


@lru_cache(maxsize=1)
def _sprite() -> Image.Image:
    return Image.open(_sample("Minduka_Present_Blue_Pack.png")).convert("RGBA")


@lru_cache(maxsize=1)
def _pool() -> tuple[list[np.ndarray], np.ndarray]:
    """``POOL_SIZE`` (POOL_SIDE, POOL_SIDE, 3) uint8 collages and a (GRAIN_SIDE, GRAIN_SIDE, 3) int16 grain bank.

    The same for every seed (built once per process): a seed picks other crops, pairs, blends and grain of it.
    """
    rng = np.random.default_rng(0x5EED)
    sources, sprite = _sources(), _sprite()
    pool = []
    for _ in range(POOL_SIZE):
        canvas = sources[rng.integers(len(sources))].resize((POOL_SIDE, POOL_SIDE), Image.BILINEAR)
        for _ in range(int(rng.integers(4, 9))):
            src = sources[rng.integers(len(sources))]
            w, h = src.size
            cw, ch = int(rng.integers(w // 3, w + 1)), int(rng.integers(h // 3, h + 1))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            scale = rng.uniform(0.5, 1.3)
            patch = src.resize(
                (max(8, int(cw * scale)), max(8, int(ch * scale))), Image.BILINEAR, (x, y, x + cw, y + ch)
            )
            if rng.random() < 0.5:
                patch = patch.transpose(Image.FLIP_LEFT_RIGHT)
            px = int(rng.integers(-patch.width // 2, POOL_SIDE - patch.width // 2))
            py = int(rng.integers(-patch.height // 2, POOL_SIDE - patch.height // 2))
            canvas.paste(patch, (px, py))
        for _ in range(int(rng.integers(0, 4))):
            side = int(rng.integers(40, 200))
            obj = sprite.resize((side, side), Image.BILINEAR)
            canvas.paste(obj, (int(rng.integers(0, POOL_SIDE - side)), int(rng.integers(0, POOL_SIDE - side))), obj)
        # Per-collage colour balance, as photographs differ in exposure and white balance.
        # Fixed point (gain in 1/64), as in coco_like_image.
        gain = rng.integers(54, 80, 3).astype(np.uint16)
        arr = (np.asarray(canvas).astype(np.uint16) * gain >> 6) + rng.integers(0, 25, 3).astype(np.uint16)
        pool.append(np.minimum(arr, 255).astype(np.uint8))
    grain = np.clip(rng.normal(0, GRAIN, (GRAIN_SIDE, GRAIN_SIDE, 3)), -127, 127).astype(np.int16)
    return pool, grain


def coco_like_image(index: int, seed: int = 0) -> tuple[np.ndarray, list[tuple[list[float], int]]]:
    """Image ``index`` of the set ``seed``: its (H, W, 3) uint8 pixels and its boxes as ([x, y, w, h], category id).

    Deterministic in (seed, index) alone.
    """
    pool, grain = _pool()
    rng = np.random.default_rng([seed, index])
    weights = np.array([w for _, w in SIZES])
    width, height = SIZES[rng.choice(len(SIZES), p=weights / weights.sum())][0]
    a, b = pool[rng.integers(POOL_SIZE)], pool[rng.integers(POOL_SIZE)]
    ax, ay = int(rng.integers(0, POOL_SIDE - width + 1)), int(rng.integers(0, POOL_SIDE - height + 1))
    bx, by = int(rng.integers(0, POOL_SIDE - width + 1)), int(rng.integers(0, POOL_SIDE - height + 1))
    alpha = int(rng.integers(96, 224))  # of 256: mostly one collage, the other a ghost in it
    # Fixed-point blend (8 bits of weight) in uint16, which holds 255 * 256: a float blend of 0.9 M samples would
    # dominate the time. Then int16 for the signed grain.
    blend = (a[ay : ay + height, ax : ax + width].astype(np.uint16) * alpha) >> 8
    blend += (b[by : by + height, bx : bx + width].astype(np.uint16) * (256 - alpha)) >> 8
    img = blend.astype(np.int16)
    gx, gy = int(rng.integers(0, GRAIN_SIDE - width + 1)), int(rng.integers(0, GRAIN_SIDE - height + 1))
    img += grain[gy : gy + height, gx : gx + width]
    pixels = np.clip(img, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    boxes = []
    for _ in range(int(rng.integers(1, 16))):
        # Box sides log-uniform from 8 px to the whole image, as COCO mixes small, medium and large objects.
        bw = float(np.exp(rng.uniform(np.log(8), np.log(width))))
        bh = float(np.clip(bw * np.exp(rng.normal(0, 0.5)), 4, height))
        x, y = float(rng.uniform(0, width - bw)), float(rng.uniform(0, height - bh))
        category = int(rng.choice(list(COCO_CATEGORIES)))
        boxes.append(([round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)], category))
    return np.ascontiguousarray(pixels), boxes


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_coco_like(folder: Path, n_images: int, seed: int = 0, quality: int = 90) -> Path:
    """Write ``n_images`` COCO-like JPEGs to ``folder/images`` and their COCO json to ``folder/annotations.json``.

    Image ids run 1..n_images, files ``images/{id:012d}.jpg`` (COCO's naming). Every file goes to a temporary name
    first and is renamed into place; the json is written last, so its presence means the folder is complete.
    Returns the path of ``annotations.json``.
    """
    if n_images < 1:
        raise ValueError(f"write_coco_like: n_images must be at least 1, got {n_images}")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, n_images + 1):
        pixels, boxes = coco_like_image(image_id, seed)
        name = f"{image_id:012d}.jpg"
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
        _write_atomic(folder / "images" / name, buf.getvalue())
        height, width = pixels.shape[:2]
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for bbox, category in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": bbox,
                    "area": round(bbox[2] * bbox[3], 2),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": k, "name": v, "supercategory": "object"} for k, v in COCO_CATEGORIES.items()]
    out = folder / "annotations.json"
    _write_atomic(out, json.dumps({"images": images, "annotations": annotations, "categories": categories}).encode())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write images/ and annotations.json into")
    parser.add_argument("--images", type=int, default=1000, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    args = parser.parse_args()
    start = time.perf_counter()
    ann = write_coco_like(args.out, args.images, seed=args.seed, quality=args.quality)
    elapsed = time.perf_counter() - start
    sizes = [p.stat().st_size for p in (args.out / "images").glob("*.jpg")]
    print(
        f"wrote {args.images} images and {ann} in {elapsed:.1f} s ({args.images / elapsed:.0f} images/s); "
        f"mean {np.mean(sizes) / 1e3:.0f} KB per JPEG in the folder"
    )


if __name__ == "__main__":
    main()
