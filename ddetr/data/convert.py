"""Convert a COCO detection split (image folder + instances json) into Parquet shards.

The conversion streams: the annotation json is read once (it is the index), then images are read,
checked and written one shard at a time, so memory holds one shard of encoded bytes at most. Each
shard goes to a hidden temporary name and is renamed into place; a rerun skips every shard that is
already there with the same settings (the shard assignment is deterministic, see ``shards.py``),
and recounts its skips from the record stored in the shard's footer. ``dataset.json`` is written
last, so its presence means the split is complete.

Shards record images in their upright frame: a photo stored with an EXIF orientation is shown turned
by the annotation tools that drew its boxes (CVAT, Label Studio, VIA), so its record's width/height
and boxes are taken as those of the upright image; a record that gives the stored size of a
quarter-turned photo is skipped as ``image_size_mismatch`` (``images.py``). Decoding turns the
pixels upright to match.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ddetr.data.shards import (
    ROW_GROUP_SIZE,
    ROW_SCHEMA,
    ShardInfo,
    ShardMetadata,
    read_shard_footer,
    shard_file,
    write_metadata,
)
from ddetr.data.validate import (
    SkipLog,
    check_annotations,
    check_categories,
    check_image_bytes,
    check_images,
)
from ddetr.io import atomic_writer, exists, resolve

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 500  # COCO train: 237 shards of ~80 MB; a shard is one Ray task and one read


@dataclass
class ConvertSummary:
    """What a conversion did.

    ``skips`` maps a reason to a count; ``examples`` holds the first few skipped records (dicts with
    keys ``reason``, ``file``, ``image_id``, ``ann_id``, ``field``, ``detail``).
    """

    out: str
    num_images: int
    num_annotations: int
    num_shards: int
    shards_written: int
    shards_resumed: int
    boxes_clipped: int
    skips: dict[str, int]
    examples: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [
            f"converted {self.num_images} images, {self.num_annotations} annotations into {self.num_shards} shards "
            f"at {self.out} ({self.shards_written} written, {self.shards_resumed} already there) "
            f"in {self.seconds:.1f} s; {self.boxes_clipped} boxes clipped to their image",
        ]
        if self.skips:
            lines.append("skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(self.skips.items())))
            for e in self.examples[:5]:  # what a record lacks (a YOLO line has no image id) is left out
                ids = [f"{k} {e[f]}" for k, f in (("image", "image_id"), ("ann", "ann_id")) if e[f] is not None]
                where = " ".join(str(p) for p in (e["file"], *ids, e["field"]) if p)
                lines.append(f"  {e['reason']}: {where}: {e['detail']}")
        return "\n".join(lines)


def convert_coco(
    images: str,
    annotations: str,
    out: str,
    *,
    strict: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    split: str | None = None,
    num_threads: int = 8,
    progress: bool = True,
    row_group_size: int = ROW_GROUP_SIZE,
    coco: dict[str, Any] | None = None,
    skips: SkipLog | None = None,
) -> ConvertSummary:
    """Convert one COCO split into Parquet shards under ``out``.

    Args:
        images: directory of the image files (path or URI); ``file_name`` is relative to it.
        annotations: the COCO instances json (path or URI).
        out: the split directory to write (path or URI), created if missing.
        strict: raise ``BadRecordError`` at the first bad record instead of skipping it.
        shard_size: images per shard; part of the resume key (a rerun with another size refuses).
        split: name stored in the metadata (default: the last component of ``out``).
        num_threads: threads reading and checking image files (Pillow decodes without the GIL).
        progress: draw a progress bar on stderr (a log line per shard is always written).
        row_group_size: images per Parquet row group, the unit a reader fetches (``shards.ROW_GROUP_SIZE``).
        coco: the annotations as an in-memory COCO dict (``yolo.py`` and ``voc.py`` build one), instead of
            reading ``annotations``, which then only names their source in messages and the metadata.
        skips: the log that already counts the skips of building ``coco``, to continue it (else a new one).
    Returns:
        a ``ConvertSummary`` (also logged).
    """
    start = time.perf_counter()
    skips = skips if skips is not None else SkipLog(strict=strict)
    # What makes an existing shard reusable: the same annotation content (file or dict) and the same chunking.
    sha1 = _fingerprint(annotations) if coco is None else hashlib.sha1(json.dumps(coco).encode()).hexdigest()
    coco = _read_json(annotations) if coco is None else coco
    categories = check_categories(coco.get("categories"), skips, annotations)
    records = check_images(coco.get("images"), skips, annotations)
    anns, clipped = check_annotations(
        coco.get("annotations"), records, {c["id"] for c in categories}, skips, annotations
    )
    del coco
    ids = sorted(records)
    chunks = [ids[i : i + shard_size] for i in range(0, len(ids), shard_size)]
    key = {"annotations_sha1": sha1, "shard_size": shard_size}

    out_fs, out_root = resolve(out)
    out_fs.create_dir(out_root, recursive=True)
    img_fs, img_root = resolve(images)
    shards: list[ShardInfo] = []
    written = 0
    bar = _Progress(len(chunks), enabled=progress)
    with ThreadPoolExecutor(num_threads) as pool:
        for k, chunk in enumerate(chunks):
            path = posixpath.join(out_root, shard_file(k))
            footer = read_shard_footer(out_fs, path) if exists(path, out_fs) else None
            if footer is not None and footer.get("key") != key:
                raise ValueError(
                    f"{out}: {shard_file(k)} was written from other annotations or another shard size "
                    f"({footer.get('key')} != {key}); convert into an empty directory"
                )
            if footer is None:
                footer = _write_shard(
                    out_fs, path, k, chunk, records, anns, img_fs, img_root, pool, strict, key, row_group_size
                )
                written += 1
            skips.merge(footer["skips"], footer["examples"])
            shards.append(ShardInfo(shard_file(k), footer["num_rows"], footer["num_annotations"]))
            bar.update(k + 1, sum(s.num_rows for s in shards))
    bar.close()

    meta = ShardMetadata(
        split=split or posixpath.basename(out.rstrip("/")),
        categories=categories,
        num_images=sum(s.num_rows for s in shards),
        num_annotations=sum(s.num_annotations for s in shards),
        shard_size=shard_size,
        shards=shards,
        source={"images": images, "annotations": annotations},
        skips=dict(skips.counts),
    )
    write_metadata(out, meta)
    summary = ConvertSummary(
        out=out,
        num_images=meta.num_images,
        num_annotations=meta.num_annotations,
        num_shards=len(shards),
        shards_written=written,
        shards_resumed=len(shards) - written,
        boxes_clipped=clipped,
        skips=dict(skips.counts),
        examples=[asdict(e) for e in skips.examples],
        seconds=time.perf_counter() - start,
    )
    log.info("%s", summary)
    return summary


def _write_shard(
    out_fs: Any,
    path: str,
    index: int,
    ids: list[int],
    records: dict[int, dict[str, Any]],
    anns: dict[int, list[dict[str, Any]]],
    img_fs: Any,
    img_root: str,
    pool: ThreadPoolExecutor,
    strict: bool,
    key: dict[str, Any],
    row_group_size: int,
) -> dict[str, Any]:
    """Read, check and write the images of one shard; return the record stored in its footer."""
    shard_skips = SkipLog(strict=strict)

    def load(iid: int) -> tuple[int, bytes | None, str]:
        file = posixpath.join(img_root, records[iid]["file_name"])
        try:
            with img_fs.open_input_stream(file) as f:
                data = f.read()
        except (FileNotFoundError, OSError):
            data = None
        return iid, data, file

    rows: dict[str, list[Any]] = {name: [] for name in ROW_SCHEMA.names}
    for iid, data, file in pool.map(load, ids):
        rec = records[iid]
        bad = check_image_bytes(data, rec, iid, file)
        if bad is not None:
            shard_skips.skip(bad)
            continue
        objs = anns.get(iid, [])
        for name, value in (
            ("image_id", iid),
            ("file_name", rec["file_name"]),
            ("height", rec["height"]),  # the upright size: check_image_bytes passed the record only if it is
            ("width", rec["width"]),
            ("image", data),
            ("shard", index),
            ("row", len(rows["image_id"])),
            ("boxes", [v for o in objs for v in o["bbox"]]),
            ("category_id", [o["category_id"] for o in objs]),
            ("iscrowd", [o["iscrowd"] for o in objs]),
            ("area", [o["area"] for o in objs]),
            ("ann_id", [o["id"] for o in objs]),
        ):
            rows[name].append(value)
    footer = {
        "shard": index,
        "key": key,
        "num_rows": len(rows["image_id"]),
        "num_annotations": sum(len(c) for c in rows["ann_id"]),
        "skips": dict(shard_skips.counts),
        "examples": [asdict(e) for e in shard_skips.examples],
    }
    schema = ROW_SCHEMA.with_metadata({"ddetr": json.dumps(footer)})
    table = pa.Table.from_pydict(rows, schema=schema)
    # Small row groups let each rank fetch just its images (``order.py``); no statistics, which nothing
    # reads and which would make the footer, read by every rank, half as large again; no dictionaries
    # (every image differs).
    with atomic_writer(path, out_fs) as f:
        pq.write_table(
            table, f, row_group_size=row_group_size, compression="none", write_statistics=False, use_dictionary=False
        )
    return footer


def _read_json(uri: str) -> dict[str, Any]:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"annotation file {uri} not found") from err


def _fingerprint(uri: str) -> str:
    fs, path = resolve(uri)
    digest = hashlib.sha1()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class _Progress:
    """A one-line progress bar on stderr when it is a terminal; a log line per step otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.start = total, enabled, time.perf_counter()
        self.tty = enabled and sys.stderr.isatty()

    def update(self, done: int, images: int) -> None:
        rate = images / max(time.perf_counter() - self.start, 1e-9)
        if self.tty:
            fill = int(30 * done / max(self.total, 1))
            sys.stderr.write(f"\r[{'#' * fill}{' ' * (30 - fill)}] {done}/{self.total} shards, {rate:.0f} img/s")
            sys.stderr.flush()
        elif self.enabled:
            log.info("shard %d/%d done, %d images, %.0f img/s", done, self.total, images, rate)

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
