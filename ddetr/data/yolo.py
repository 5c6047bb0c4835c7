"""YOLO (Ultralytics, darknet) label folders to shards: ``ddetr data convert --format yolo``.

Layouts found under the source folder ``DIR``::

    DIR/images/<split>/**.jpg   DIR/labels/<split>/**.txt     Ultralytics (splits: any folder names)
    DIR/images/**.jpg           DIR/labels/**.txt             one split: written to OUT itself
    DIR/<split>/images/**.jpg   DIR/<split>/labels/**.txt     Roboflow's export (``valid`` is written as val)

The label file of ``images/<split>/a/b.jpg`` is ``labels/<split>/a/b.txt``: one object per line, ``class cx
cy w h`` as fractions of the image's width and height (a line ``class x1 y1 x2 y2 ...`` is a polygon: its
box is taken, as Ultralytics does). An image without a label file, or with an empty one, has no objects.
Class names come from ``--names`` or, found in ``DIR``, a data YAML with ``names:`` (``data.yaml`` first),
``classes.txt`` (also in ``labels/`` and ``labels/<split>/``, where labelImg writes it), ``*.names``.
Class ``i`` is category id ``i + 1`` (``folders.py``).

A bad line is skipped and counted (or, with ``--strict``, stops the conversion), naming the label file,
the line and the field: ``labels/train/abc.txt line 3: class 7 is not in classes.txt (0..4)``.
Repeated lines are skipped as ``label_duplicate``, as Ultralytics drops them.
"""

from __future__ import annotations

import logging
import math
import posixpath
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ddetr import io
from ddetr.data.convert import DEFAULT_SHARD_SIZE, ConvertSummary
from ddetr.data.folders import (
    IMAGE_EXTENSIONS,
    ClassNames,
    FolderSplit,
    SourceError,
    convert_splits,
    find_yaml_names,
    image_size,
    list_files,
    pick_splits,
    read_class_names,
    subfolders,
)
from ddetr.data.validate import CLIP_TOLERANCE, Skip, SkipLog

log = logging.getLogger(__name__)

NORMALISED_TOLERANCE = 0.01  # label tools round; a value past 1.01 means pixels, not fractions of the image
BOX_FIELDS = ("cx", "cy", "w", "h")


def convert_yolo(
    source: str,
    out: str,
    *,
    names: str | None = None,
    splits: list[str] | None = None,
    strict: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: bool = True,
    num_threads: int = 8,
) -> dict[str, ConvertSummary]:
    """Convert a YOLO dataset folder into shards: ``OUT/<split>/`` per split, or ``OUT`` for a folder without.

    Args:
        source: the dataset folder (path or URI), one of the layouts of the module docstring.
        out: where the shards go.
        names: a names file, data YAML or ``a,b,c`` (default: found in ``source``).
        splits: the splits to convert (default: every one found).
        strict, shard_size, progress, num_threads: as ``convert_coco``.
    Returns:
        the ``ConvertSummary`` of each split written, by its folder.
    """
    found = find_splits(source)
    classes = read_class_names(names) if names else find_names(source, found)
    log.info(
        "YOLO classes from %s: %s", classes.source, ", ".join(f"{i}={n}" for i, n in sorted(classes.names.items()))
    )

    def to_coco(split: FolderSplit, skips: SkipLog) -> dict[str, Any]:
        return yolo_to_coco(split, classes, skips, num_threads=num_threads)

    return convert_splits(pick_splits(found, splits, source), to_coco, out, strict=strict, shard_size=shard_size,
                          progress=progress, num_threads=num_threads)  # fmt: skip


def find_splits(root: str) -> list[FolderSplit]:
    """The splits of a YOLO folder (one unnamed split when ``images/`` holds the images directly)."""
    if not io.is_dir(root):
        raise FileNotFoundError(f"YOLO dataset folder {root} not found")
    images, labels = io.join(root, "images"), io.join(root, "labels")
    if io.is_dir(images):
        folders, direct = subfolders(images)
        if folders and not direct:
            return [FolderSplit(f, io.join(images, f), io.join(labels, f)) for f in folders]
        return [FolderSplit("", images, labels)]
    found = [FolderSplit(f, io.join(root, f, "images"), io.join(root, f, "labels"))
             for f in subfolders(root)[0] if io.is_dir(io.join(root, f, "images"))]  # fmt: skip
    if not found:
        raise SourceError(
            f"{root}: no images/ folder; a YOLO dataset holds images/ and labels/ (each with split folders such "
            "as train/ and val/, or none), or <split>/images and <split>/labels"
        )
    return found


def find_names(root: str, splits: list[FolderSplit]) -> ClassNames:
    """The class names a YOLO folder carries: a data YAML's ``names:``, else a ``classes.txt`` or ``*.names``."""
    from_yaml = find_yaml_names(root)
    if from_yaml is not None:
        return from_yaml
    candidates = [io.join(root, "classes.txt"), io.join(root, "labels", "classes.txt")]
    candidates += [io.join(s.labels, "classes.txt") for s in splits]
    candidates += [io.join(root, f) for f in io.listdir(root) if f.endswith(".names") or f in ("names", "names.txt")]
    for path in candidates:
        if io.exists(path) and not io.is_dir(path):
            return read_class_names(path)
    raise SourceError(
        f"{root}: no class names found (a data YAML with names:, classes.txt or a .names file); "
        "give them with --names FILE or --names a,b,c"
    )


def yolo_to_coco(split: FolderSplit, classes: ClassNames, skips: SkipLog, num_threads: int = 8) -> dict[str, Any]:
    """The COCO dict of one split: an image record per readable image file (ids 1.. in path order), an
    annotation per valid label line; bad lines and unreadable images go to ``skips``."""
    rels = list_files(split.images, IMAGE_EXTENSIONS)
    if not rels:
        log.warning("%s: no image files (%s)", split.images, ", ".join(IMAGE_EXTENSIONS))

    def load(rel: str) -> tuple[tuple[int, int] | str, bytes | None]:
        """(width, height), or why the image is unreadable; the label file's bytes, None without one."""
        try:
            size: tuple[int, int] | str = image_size(io.join(split.images, rel))
        except Exception as err:  # Pillow raises many types for a file that is not an image
            size = f"{type(err).__name__}: {err}"
        try:
            return size, io.read_bytes(io.join(split.labels, posixpath.splitext(rel)[0] + ".txt"))
        except FileNotFoundError:
            return size, None

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    unlabelled = 0
    with ThreadPoolExecutor(num_threads) as pool:
        for rel, (size, data) in zip(rels, pool.map(load, rels), strict=True):
            if isinstance(size, str):
                skips.skip(Skip("image_undecodable", io.join(split.images, rel), field="image", detail=size))
                continue
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": rel, "width": size[0], "height": size[1]})
            if data is None:
                unlabelled += 1
                continue
            label = io.join(split.labels, posixpath.splitext(rel)[0] + ".txt")
            try:
                text = data.decode("utf-8-sig")  # Windows tools start a file with a byte-order mark
            except UnicodeDecodeError as err:
                skips.skip(Skip("label_unreadable", label, field="text", detail=f"not UTF-8 text ({err})"))
                continue
            for category_id, box in parse_labels(text, label, classes, size, skips):
                annotations.append(
                    {"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id, "bbox": box}
                )
    _report_unmatched(split, rels, unlabelled)
    return {"images": images, "annotations": annotations, "categories": classes.categories()}


def parse_labels(
    text: str, file: str, classes: ClassNames, size: tuple[int, int], skips: SkipLog
) -> list[tuple[int, list[float]]]:
    """The valid lines of one label file as (category id, [x, y, w, h] in pixels of the ``size`` (W, H) image)."""
    W, H = size
    kept: list[tuple[int, list[float]]] = []
    seen: set[tuple[float, ...]] = set()
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue

        def bad(reason: str, detail: str, n: int = n) -> None:
            skips.skip(Skip(reason, file, field=f"line {n}", detail=detail))

        polygon = len(fields) >= 7 and len(fields) % 2 == 1
        if len(fields) != 5 and not polygon:
            bad("label_malformed", f"{len(fields)} fields; expected 5 (class cx cy w h) or a polygon (class x1 y1 ...)")
            continue
        points = [f"{a}{i}" for i in range(1, len(fields) // 2 + 1) for a in "xy"]  # x1 y1 x2 y2 ...
        keys = ["class", *(points if polygon else BOX_FIELDS)]
        values = []
        for key, raw in zip(keys, fields, strict=True):
            try:
                values.append(float(raw))
            except ValueError:
                bad("label_malformed", f"{key} {raw!r} is not a number")
                break
        else:
            box = _check_line(values, keys, classes, W, H, bad, skips.strict)
            if box is None:
                continue
            if tuple(values) in seen:
                bad("label_duplicate", "repeats an earlier line")
                continue
            seen.add(tuple(values))
            kept.append((int(values[0]) + 1, box))
    return kept


def _check_line(
    values: list[float],
    keys: list[str],
    classes: ClassNames,
    W: int,
    H: int,
    bad: Callable[[str, str], None],
    strict: bool,
) -> list[float] | None:
    """[x, y, w, h] in pixels of a parsed line, or None after reporting what is wrong with it."""
    for key, v in zip(keys, values, strict=True):
        if not math.isfinite(v):
            bad("box_not_finite", f"{key} is {v}")
            return None
    c = values[0]
    if c != int(c) or int(c) not in classes.names:
        bad("label_unknown_class", f"class {c:g} is not in {classes.source} ({classes.span()})")
        return None
    coords = values[1:]
    if len(coords) == 4:
        cx, cy, w, h = coords
        if w < 0 or h < 0:
            bad("box_negative_size", f"{'w' if w < 0 else 'h'} is {w if w < 0 else h:g}")
            return None
        if w == 0 or h == 0:
            bad("box_zero_area", f"{'w' if w == 0 else 'h'} is 0")
            return None
        x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    else:
        xs, ys = coords[0::2], coords[1::2]
        x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
        if x1 <= x0 or y1 <= y0:
            bad("box_zero_area", "the polygon has no width or no height")
            return None
    for key, v in zip(keys[1:], coords, strict=True):
        if not -NORMALISED_TOLERANCE <= v <= 1 + NORMALISED_TOLERANCE:
            bad("label_not_normalised", f"{key} {v:g} lies outside 0..1: YOLO coordinates are fractions of the "
                "image's width and height (are these pixels?)")  # fmt: skip
            return None
    if x1 <= 0 or y1 <= 0 or x0 >= 1 or y0 >= 1:
        bad("box_outside_image", f"the box ({x0:g}, {y0:g})-({x1:g}, {y1:g}) lies outside the image (0..1)")
        return None
    # Past the border it is clipped (counted by ``convert_coco``); far past it, strict mode refuses, as for COCO.
    overshoot = max(-x0 * W, -y0 * H, (x1 - 1) * W, (y1 - 1) * H)
    if strict and overshoot > CLIP_TOLERANCE:
        bad("box_outside_image", f"the box extends {overshoot:.1f} px past the {W}x{H} image")
        return None
    return [x0 * W, y0 * H, (x1 - x0) * W, (y1 - y0) * H]


def _report_unmatched(split: FolderSplit, images: list[str], unlabelled: int) -> None:
    """Log images without a label file, and label files without an image (a name or folder mismatch)."""
    stems = {posixpath.splitext(r)[0] for r in images}
    orphans = [f for f in list_files(split.labels, (".txt",)) if posixpath.splitext(f)[0] not in stems]
    orphans = [f for f in orphans if posixpath.basename(f) != "classes.txt"]
    if images and unlabelled == len(images):
        log.warning(
            "%s: none of the %d images has a label file under %s; every image is taken to have no objects",
            split.images,
            len(images),
            split.labels,
        )
    elif unlabelled:
        log.info("%s: %d of %d images have no label file (no objects)", split.images, unlabelled, len(images))
    if orphans:
        log.warning(
            "%s: %d label file(s) without an image of the same name in %s (e.g. %s); their boxes are not converted",
            split.labels,
            len(orphans),
            split.images,
            orphans[0],
        )
