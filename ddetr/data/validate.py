"""Checks on COCO records before they become shard rows: what is skipped, clipped or refused.

Every problem is either a counted skip (the default) or, in strict mode, a ``BadRecordError`` that
names the file, the image id, the annotation id and the field. Boxes that stick out of the image are
clipped (a fix, counted under ``box_clipped``); in strict mode a box sticking out by more than
``CLIP_TOLERANCE`` pixels is an error, since it usually means the width and height were swapped.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ddetr.data.images import orientation, swaps_sides

CLIP_TOLERANCE = 1.0  # pixels; COCO itself has boxes a fraction of a pixel past the border
MAX_EXAMPLES = 20  # skipped records kept verbatim in the summary, per run


class BadRecordError(ValueError):
    """A record the converter refuses in strict mode.

    Attributes: ``reason`` (a skip reason such as ``box_not_finite``), ``file``, ``image_id``,
    ``ann_id``, ``field`` and ``detail``; the message carries all of them and what to do.
    """

    def __init__(self, skip: Skip) -> None:
        self.skip = skip
        self.reason, self.file, self.image_id = skip.reason, skip.file, skip.image_id
        self.ann_id, self.field, self.detail = skip.ann_id, skip.field, skip.detail
        super().__init__(
            f"{skip.reason}: {skip.detail} (file={skip.file}, image_id={skip.image_id}, "
            f"annotation_id={skip.ann_id}, field={skip.field}). Fix the record, or convert without "
            f"--strict to skip it and count it in the summary."
        )


@dataclass
class Skip:
    """Where a bad record is and what is wrong with it."""

    reason: str
    file: str | None = None
    image_id: int | None = None
    ann_id: int | None = None
    field: str | None = None
    detail: str = ""


@dataclass
class SkipLog:
    """Counts skips by reason (raising instead in strict mode) and keeps the first few verbatim."""

    strict: bool = False
    counts: Counter = field(default_factory=Counter)
    examples: list[Skip] = field(default_factory=list)

    def skip(self, skip: Skip) -> None:
        if self.strict:
            raise BadRecordError(skip)
        self.count(skip)

    def count(self, skip: Skip) -> None:
        self.counts[skip.reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(skip)

    def merge(self, counts: dict[str, int], examples: list[dict[str, Any]]) -> None:
        self.counts.update(counts)
        room = MAX_EXAMPLES - len(self.examples)
        self.examples.extend(Skip(**e) for e in examples[: max(room, 0)])


def check_categories(categories: Any, log: SkipLog, file: str) -> list[dict[str, Any]]:
    """Categories with unique integer ids (later duplicates skipped)."""
    kept: dict[int, dict[str, Any]] = {}
    for c in categories or []:
        cid = c.get("id") if isinstance(c, dict) else None
        if not isinstance(cid, int) or isinstance(cid, bool):
            log.skip(Skip("category_bad_id", file, field="categories.id", detail=f"category {c!r}"))
        elif cid in kept:
            log.skip(Skip("duplicate_category_id", file, field="categories.id", detail=f"category id {cid}"))
        else:
            kept[cid] = {"id": cid, "name": str(c.get("name", cid)), "supercategory": str(c.get("supercategory", ""))}
    if not kept:
        raise BadRecordError(Skip("no_categories", file, field="categories", detail="the file lists no categories"))
    return [kept[k] for k in sorted(kept)]


def check_images(images: Any, log: SkipLog, file: str) -> dict[int, dict[str, Any]]:
    """Image records keyed by id: ``{id: {"file_name", "height", "width"}}`` (later duplicates skipped)."""
    kept: dict[int, dict[str, Any]] = {}
    for im in images or []:
        iid = im.get("id")
        if not isinstance(iid, int) or isinstance(iid, bool):
            log.skip(Skip("image_bad_field", file, field="images.id", detail=f"image record {im!r:.80}"))
            continue
        if iid in kept:
            log.skip(Skip("duplicate_image_id", file, image_id=iid, field="images.id", detail="second record"))
            continue
        h, w, name = im.get("height"), im.get("width"), im.get("file_name")
        for key, value, ok in (
            ("height", h, isinstance(h, int) and h > 0),
            ("width", w, isinstance(w, int) and w > 0),
            ("file_name", name, isinstance(name, str) and name != ""),
        ):
            if not ok:
                log.skip(Skip("image_bad_field", file, image_id=iid, field=f"images.{key}", detail=f"{value!r}"))
                break
        else:
            kept[iid] = {"file_name": name, "height": h, "width": w}
    return kept


def check_annotations(
    annotations: Any, images: dict[int, dict[str, Any]], category_ids: set[int], log: SkipLog, file: str
) -> tuple[dict[int, list[dict[str, Any]]], int]:
    """Valid annotations grouped by image id, boxes clipped to the image; and how many were clipped.

    Each kept annotation is ``{"id", "bbox" [x, y, w, h], "category_id", "iscrowd", "area"}``.
    """
    by_image: dict[int, list[dict[str, Any]]] = {}
    seen: set[int] = set()
    clipped = 0
    for a in annotations or []:
        aid, iid = a.get("id"), a.get("image_id")

        def bad(reason: str, fld: str, detail: str, aid: Any = aid, iid: Any = iid) -> None:
            log.skip(Skip(reason, file, image_id=iid, ann_id=aid, field=f"annotations.{fld}", detail=detail))

        if not isinstance(aid, int) or isinstance(aid, bool):
            bad("annotation_bad_id", "id", f"{aid!r}")
            continue
        if aid in seen:
            bad("duplicate_annotation_id", "id", "second record")
            continue
        seen.add(aid)
        if iid not in images:
            bad("annotation_unknown_image", "image_id", f"no image with id {iid!r}")
            continue
        if a.get("category_id") not in category_ids:
            bad("annotation_unknown_category", "category_id", f"no category with id {a.get('category_id')!r}")
            continue
        box = a.get("bbox")
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
            bad("box_malformed", "bbox", f"{box!r:.80}")
            continue
        x, y, w, h = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            bad("box_not_finite", "bbox", f"{box!r}")
            continue
        if w < 0 or h < 0:
            bad("box_negative_size", "bbox", f"{box!r}")
            continue
        if w == 0 or h == 0:
            bad("box_zero_area", "bbox", f"{box!r}")
            continue
        W, H = images[iid]["width"], images[iid]["height"]
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(W)), min(y + h, float(H))
        if x1 <= x0 or y1 <= y0:
            bad("box_outside_image", "bbox", f"{box!r} lies outside the {W}x{H} image")
            continue
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            overshoot = max(-x, -y, x + w - W, y + h - H)
            if overshoot > CLIP_TOLERANCE and log.strict:
                bad("box_outside_image", "bbox", f"{box!r} extends {overshoot:.1f} px past the {W}x{H} image")
            clipped += 1
        area = a.get("area")
        area = float(area) if _is_number(area) and math.isfinite(area) and area > 0 else (x1 - x0) * (y1 - y0)
        crowd = a.get("iscrowd", 0)
        by_image.setdefault(iid, []).append(
            {
                "id": aid,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "category_id": a["category_id"],
                "iscrowd": 1 if crowd else 0,
                "area": area,
            }
        )
    return by_image, clipped


def check_image_bytes(data: bytes | None, record: dict[str, Any], image_id: int, path: str) -> Skip | None:
    """Decode the image cheaply (JPEG: 1/8-scale DCT) and check its size against the record."""
    if data is None:
        return Skip("image_missing", path, image_id=image_id, field="images.file_name", detail="file not found")
    try:
        with Image.open(io.BytesIO(data)) as img:
            stored, turn = img.size, orientation(img)
            img.draft("RGB", (max(stored[0] // 8, 1), max(stored[1] // 8, 1)))
            img.load()
    except Exception as err:  # Pillow raises many types for bad data
        return Skip("image_undecodable", path, image_id=image_id, field="image", detail=f"{type(err).__name__}: {err}")
    size = (stored[1], stored[0]) if swaps_sides(turn) else stored  # records describe the upright image (images.py)
    if size != (record["width"], record["height"]):
        turned = f" upright (stored {stored[0]}x{stored[1]} with EXIF orientation {turn})" if size != stored else ""
        return Skip(
            "image_size_mismatch",
            path,
            image_id=image_id,
            field="images.width/height",
            detail=f"file is {size[0]}x{size[1]}{turned}, record says {record['width']}x{record['height']}"
            + ("; the record and its boxes must be those of the upright image" if turned else ""),
        )
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
