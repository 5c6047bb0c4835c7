"""Shard rows to training examples: reduced-size JPEG decoding, the transform, the target.

``try_decode_example`` is what both pipelines run on each image (in a Ray Data task through
``decode_batch``, or in a torch DataLoader worker). A row whose bytes fail to decode is dropped with
a warning naming its image id and counted in ``decode_failures()`` of that process, so one bad
image never ends an epoch.
Images leave here as uint8 HWC (a quarter of float32 through Ray's object store); normalisation
happens in the collate step. A decoded batch is an Arrow table of plain columns (``EXAMPLE_SCHEMA``):
the image as raw bytes beside its height and width, because Ray's variable-shaped tensor columns
cost as much to build as the decoding itself.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from ddetr.data.shards import read_shard
from ddetr.data.transforms import (
    Geometry,
    TransformConfig,
    image_rng,
    sample_train_geometry,
    transform_boxes,
    val_geometry,
    xyxy_to_cxcywh_normalized,
)

log = logging.getLogger(__name__)
_failures = 0

# A decoded batch: image = the (height, width, 3) uint8 array's bytes; boxes flat (4 * n) cxcywh
# normalised; orig_* the size of the file, height/width the size of the transformed image.
EXAMPLE_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("boxes", pa.list_(pa.float32())),
        ("labels", pa.list_(pa.int64())),
        ("image_id", pa.int64()),
        ("orig_height", pa.int32()),
        ("orig_width", pa.int32()),
    ]
)
# Shard columns the decoder reads (the rest stay on disk).
ROW_COLUMNS = ("image_id", "height", "width", "image", "boxes", "category_id", "iscrowd")


def decode_failures() -> int:
    """How many rows this process has dropped because their image failed to decode."""
    return _failures


def decode_rgb(data: bytes) -> np.ndarray:
    """One encoded image as it is: the (H, W, 3) uint8 RGB array (inference, drawing)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def decode_image(data: bytes, orig_size: tuple[int, int], geo: Geometry) -> np.ndarray:
    """Decode, crop, resize and flip one encoded image as ``geo`` says.

    JPEGs are decoded at the smallest DCT scale (1, 1/2, 1/4, 1/8) whose size still covers the
    output at the crop's resolution; the crop box is rescaled by the size actually decoded.
    Returns the (oh, ow, 3) uint8 image.
    """
    h, w = orig_size
    x0, y0, x1, y1 = geo.crop
    oh, ow = geo.out_size
    img = Image.open(io.BytesIO(data))
    scale = max(ow / (x1 - x0), oh / (y1 - y0))
    if scale < 1:
        img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))  # a no-op for non-JPEG files
    img = img.convert("RGB")
    dw, dh = img.size
    fx, fy = dw / w, dh / h
    out = img.resize((ow, oh), Image.BILINEAR, box=(x0 * fx, y0 * fy, x1 * fx, y1 * fy))
    arr = np.asarray(out)
    return np.ascontiguousarray(arr[:, ::-1]) if geo.flip else arr


def decode_example(row: dict[str, Any], cfg: TransformConfig, train: bool, seed: int, epoch: int) -> dict[str, Any]:
    """One shard row (``shards.ROW_SCHEMA`` keys) to an example.

    Returns a dict: ``image`` (H, W, 3) uint8; ``boxes`` (n, 4) float32 cxcywh normalised by
    (W, H); ``labels`` (n,) int64 category ids; ``image_id`` int; ``orig_size`` and ``size`` (h, w).
    Crowd boxes are removed; training samples its transform from ``image_rng(seed, epoch, id)``.
    """
    h, w, image_id = int(row["height"]), int(row["width"]), int(row["image_id"])
    if train:
        geo = sample_train_geometry(h, w, cfg, image_rng(seed, epoch, image_id))
    else:
        geo = val_geometry(h, w, cfg)
    image = decode_image(row["image"], (h, w), geo)
    crowd = np.asarray(row["iscrowd"], dtype=bool)
    boxes = np.asarray(row["boxes"], dtype=np.float32).reshape(-1, 4)[~crowd]
    labels = np.asarray(row["category_id"], dtype=np.int64)[~crowd]
    boxes, keep = transform_boxes(boxes, geo)
    return {
        "image": image,
        "boxes": xyxy_to_cxcywh_normalized(boxes, geo.out_size),
        "labels": labels[keep],
        "image_id": image_id,
        "orig_size": (h, w),
        "size": geo.out_size,
    }


def decode_batch(batch: dict[str, Any], cfg: TransformConfig, train: bool, seed: int, epoch: int) -> pa.Table:
    """A batch of shard rows (``ROW_COLUMNS``, as lists or arrays) to a table of ``EXAMPLE_SCHEMA``.

    Undecodable rows are dropped (see the module docstring).
    """
    examples = []
    for i in range(len(batch["image_id"])):
        row = {k: batch[k][i] for k in ROW_COLUMNS}
        example = try_decode_example(row, cfg, train, seed, epoch)
        if example is not None:
            examples.append(example)
    return examples_to_table(examples)


def decode_shard_rows(
    item: pa.Table, cfg: TransformConfig, train: bool, seed: int, epoch: int, chunk: int
) -> Iterator[pa.Table]:
    """Read the rows named in ``item`` (one row: ``uri``, ``rows``) from one shard; decode them in that order.

    Yields ``EXAMPLE_SCHEMA`` tables of ``chunk`` images (the Ray pipeline's map function).
    """
    uri = item.column("uri")[0].as_py()
    rows = np.asarray(item.column("rows")[0].as_py(), dtype=np.int64)
    table = read_shard(uri, list(ROW_COLUMNS)).take(pa.array(rows, type=pa.int64()))
    for start in range(0, table.num_rows, chunk):
        out = decode_batch(table.slice(start, chunk).to_pydict(), cfg, train, seed, epoch)
        if out.num_rows:
            yield out


def try_decode_example(
    row: dict[str, Any], cfg: TransformConfig, train: bool, seed: int, epoch: int
) -> dict[str, Any] | None:
    """``decode_example``, or None (with a warning naming the image id, and counted) if it fails."""
    global _failures
    try:
        return decode_example(row, cfg, train, seed, epoch)
    except Exception as err:  # a corrupt image must not end the epoch
        _failures += 1
        log.warning(
            "skipping image_id %s: its bytes failed to decode (%s: %s)", row["image_id"], type(err).__name__, err
        )
        return None


def examples_to_table(examples: list[dict[str, Any]]) -> pa.Table:
    """``decode_example`` dicts to a table of ``EXAMPLE_SCHEMA`` (``collate.collate_columns`` undoes it)."""
    columns = {
        "image": [e["image"].tobytes() for e in examples],
        "height": [e["size"][0] for e in examples],
        "width": [e["size"][1] for e in examples],
        "boxes": [e["boxes"].reshape(-1) for e in examples],
        "labels": [e["labels"] for e in examples],
        "image_id": [e["image_id"] for e in examples],
        "orig_height": [e["orig_size"][0] for e in examples],
        "orig_width": [e["orig_size"][1] for e in examples],
    }
    return pa.Table.from_pydict(columns, schema=EXAMPLE_SCHEMA)
