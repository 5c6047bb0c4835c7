"""What a converted split holds: ``ddetr data check DIR``, the first look when AP stays near 0.

It prints, per split: the boxes and images of each class by name (a class with no boxes is marked), the
image sizes, the boxes per image and the images without any, and how many boxes COCO evaluation calls
small, medium and large (by the stored ``area``, in the original image's pixels: what COCOeval uses), and
what the conversion skipped. Crowd boxes (VOC's difficult objects) are counted apart: training leaves
them out. Only ``dataset.json`` and the annotation columns of the shards are read, never the images.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ddetr import io
from ddetr.data.shards import METADATA_FILE, ShardMetadata, read_metadata, read_shard, shard_uris

SMALL, MEDIUM = 32**2, 96**2  # COCO's area ranges, in pixels of the original image
COLUMNS = ["height", "width", "category_id", "iscrowd", "area"]


@dataclass
class SplitStats:
    """Counts of one split. ``boxes``/``images`` map a category id to its boxes and to the images holding
    one (crowd boxes apart, in ``crowd``); ``widths``, ``heights`` and ``per_image`` have one entry per image;
    ``sizes`` counts boxes by COCO area range (keys ``small``, ``medium``, ``large``)."""

    split: str
    meta: ShardMetadata
    boxes: Counter = field(default_factory=Counter)
    images: Counter = field(default_factory=Counter)
    crowd: Counter = field(default_factory=Counter)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    per_image: list[int] = field(default_factory=list)
    sizes: Counter = field(default_factory=Counter)


def split_stats(split_dir: str) -> SplitStats:
    """Count one split (a folder holding ``dataset.json`` and its shards, path or URI)."""
    meta = read_metadata(split_dir)
    stats = SplitStats(split_dir, meta)
    for uri in shard_uris(split_dir, meta):
        t = read_shard(uri, COLUMNS).to_pydict()
        stats.widths += t["width"]
        stats.heights += t["height"]
        for cats, crowds, areas in zip(t["category_id"], t["iscrowd"], t["area"], strict=True):
            kept = [(c, a) for c, crowd, a in zip(cats, crowds, areas, strict=True) if not crowd]
            stats.crowd.update(c for c, crowd in zip(cats, crowds, strict=True) if crowd)
            stats.boxes.update(c for c, _ in kept)
            stats.images.update({c for c, _ in kept})
            stats.per_image.append(len(kept))
            stats.sizes.update("small" if a < SMALL else "medium" if a < MEDIUM else "large" for _, a in kept)
    return stats


def format_stats(stats: SplitStats) -> str:
    """The report of one split, as ``ddetr data check`` prints it."""
    meta = stats.meta
    n_images, n_boxes, n_crowd = len(stats.per_image), sum(stats.boxes.values()), sum(stats.crowd.values())
    lines = [
        f"{stats.split}: {n_images} images, {n_boxes} boxes"
        + (f" (and {n_crowd} crowd/difficult, not trained on)" if n_crowd else "")
        + f", {len(meta.categories)} classes (ids {_span([c['id'] for c in meta.categories])})",
    ]
    if meta.skips:
        lines.append("skipped at conversion: " + ", ".join(f"{k}={v}" for k, v in sorted(meta.skips.items())))
    width = max([len(c["name"]) for c in meta.categories] + [5])
    lines.append(f"  {'id':>4}  {'class':<{width}}  {'boxes':>7}  {'images':>7}" + ("  crowd" if n_crowd else ""))
    for c in meta.categories:
        cid = c["id"]
        row = f"  {cid:>4}  {c['name']:<{width}}  {stats.boxes[cid]:>7}  {stats.images[cid]:>7}"
        row += f"  {stats.crowd[cid]:>5}" if n_crowd else ""
        lines.append(row + ("  <- no boxes" if not stats.boxes[cid] else ""))
    unknown = sorted(set(stats.boxes) - {c["id"] for c in meta.categories})
    if unknown:
        lines.append(f"  boxes of category ids not in {METADATA_FILE}: {unknown}")
    if n_images:
        empty = sum(1 for n in stats.per_image if n == 0)
        lines += [
            f"image width     {_three(stats.widths)}",
            f"image height    {_three(stats.heights)}",
            f"boxes/image     {_three(stats.per_image)}; {empty} image{'s' * (empty != 1)} without boxes",
            f"box sizes       small {stats.sizes['small']}, medium {stats.sizes['medium']}, large "
            f"{stats.sizes['large']} (COCO areas < 32², < 96², larger; original pixels)",
        ]
    return "\n".join(lines)


def check(data: str) -> str:
    """The report of a split folder, or of each split of a dataset folder (``DIR/{train,val}``,
    ``DIR/shards/{train,val}``, or any folders of ``DIR`` holding a ``dataset.json``)."""
    return "\n\n".join(format_stats(split_stats(s)) for s in split_folders(data))


def split_folders(data: str) -> list[str]:
    """The split folders ``data`` names: itself when it holds ``dataset.json``, else its sub-folders that do."""
    if io.exists(io.join(data, METADATA_FILE)):
        return [data]
    for root in (io.join(data, "shards"), data):
        found = [io.join(root, d) for d in io.listdir(root) if io.exists(io.join(root, d, METADATA_FILE))]
        if found:
            order = {"train": 0, "val": 1}  # train first, as a user reads them
            return sorted(found, key=lambda p: (order.get(p.rstrip("/").rsplit("/", 1)[-1], 2), p))
    raise FileNotFoundError(f"{data}: no {METADATA_FILE} in it or its folders; make shards with `ddetr data convert`")


def _three(values: list[Any]) -> str:
    return f"min {min(values)}  median {statistics.median(values):g}  max {max(values)}"


def _span(ids: list[int]) -> str:
    return f"{min(ids)}..{max(ids)}" if ids else "none"
