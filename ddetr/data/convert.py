"""Convert a COCO detection split (image folder + instances json) into Parquet shards.

The conversion streams: the annotation json is read as a stream into a packed index (``coco_index.py``),
then images are read, checked and written one shard at a time, so memory holds one shard of encoded
bytes at most besides the index. Each
shard goes to a hidden temporary name and is renamed into place; a rerun skips every shard that is
already there with the same settings (the shard assignment is deterministic, see ``shards.py``),
and recounts its skips from the record stored in the shard's footer. ``dataset.json`` is written
last, so its presence means the split is complete.

With ``workers`` > 1 the missing shards are written by that many processes, each writing whole shards
from the images and annotations of its shard alone; the files are the same bytes as a serial
conversion's, and memory is one shard per process besides the annotation index.

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
import multiprocessing
import posixpath
import sys
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ddetr.data.coco_index import PackedAnnotations, read_index
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
    BadRecordError,
    Skip,
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
    workers: int = 1,
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
        workers: processes writing shards (1: this one); each reads with ``num_threads`` threads. The shards
            are the same bytes whatever the number.
    Returns:
        a ``ConvertSummary`` (also logged).
    """
    start = time.perf_counter()
    skips = skips if skips is not None else SkipLog(strict=strict)
    # What makes an existing shard reusable: the same annotation content (file or dict) and the same chunking.
    sha1 = _fingerprint(annotations) if coco is None else hashlib.sha1(json.dumps(coco).encode()).hexdigest()
    anns: PackedAnnotations | dict[int, list[dict[str, Any]]]
    if coco is None:  # a file: streamed and packed, so memory does not grow with the whole json (coco_index.py)
        categories, records, anns, clipped = read_index(annotations, skips)
    else:
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
    footers: dict[int, dict[str, Any]] = {}  # shard index -> the record in its footer
    missing: dict[int, list[int]] = {}  # shard index -> the image ids it is to hold
    for k, chunk in enumerate(chunks):
        path = posixpath.join(out_root, shard_file(k))
        footer = read_shard_footer(out_fs, path) if exists(path, out_fs) else None
        if footer is not None and footer.get("key") != key:
            raise ValueError(
                f"{out}: {shard_file(k)} was written from other annotations or another shard size "
                f"({footer.get('key')} != {key}); convert into an empty directory"
            )
        if footer is None:
            missing[k] = chunk
        else:
            footers[k] = footer
    bar = _Progress(len(chunks), enabled=progress)
    bar.update(len(footers), sum(f["num_rows"] for f in footers.values()))
    jobs = [
        ShardJob(out, posixpath.join(out_root, shard_file(k)), k, chunk, images, strict, key, row_group_size)
        for k, chunk in missing.items()
    ]
    write = _write_serial if workers <= 1 or len(jobs) <= 1 else _write_parallel
    for k, footer in write(jobs, records, anns, num_threads, workers):
        footers[k] = footer
        bar.update(len(footers), sum(f["num_rows"] for f in footers.values()))
    bar.close()
    shards: list[ShardInfo] = []
    for k in range(len(chunks)):  # in shard order, whatever order they were written in: the same summary
        skips.merge(footers[k]["skips"], footers[k]["examples"])
        shards.append(ShardInfo(shard_file(k), footers[k]["num_rows"], footers[k]["num_annotations"]))

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
        shards_written=len(missing),
        shards_resumed=len(shards) - len(missing),
        boxes_clipped=clipped,
        skips=dict(skips.counts),
        examples=[asdict(e) for e in skips.examples],
        seconds=time.perf_counter() - start,
    )
    log.info("%s", summary)
    return summary


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: where (``path`` inside ``out``'s file system), which images, with which settings."""

    out: str
    path: str
    index: int
    ids: list[int]
    images: str
    strict: bool
    key: dict[str, Any]
    row_group_size: int


def _write_serial(
    jobs: list[ShardJob],
    records: dict[int, dict[str, Any]],
    anns: Any,  # image id -> its annotations: a dict, or PackedAnnotations
    num_threads: int,
    workers: int,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(shard index, footer) of each job, written one after the other in this process."""
    if not jobs:
        return
    out_fs, _ = resolve(jobs[0].out)
    img_fs, img_root = resolve(jobs[0].images)
    with ThreadPoolExecutor(num_threads) as pool:
        for j in jobs:
            footer = _write_shard(
                out_fs, j.path, j.index, j.ids, records, anns, img_fs, img_root, pool, j.strict, j.key, j.row_group_size
            )
            yield j.index, footer


def _write_parallel(
    jobs: list[ShardJob],
    records: dict[int, dict[str, Any]],
    anns: Any,  # image id -> its annotations: a dict, or PackedAnnotations
    num_threads: int,
    workers: int,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(shard index, footer) of each job as the `workers` processes finish them.

    Each process is sent its shard's own records and annotations, not the whole index, and at most two shards
    per process are queued, so memory stays one shard per process. Spawned, not forked: the parent may hold
    threads (Ray, pyarrow's pools) that a forked child would inherit in whatever state they were.
    """
    pending: dict[Future, int] = {}
    queue = iter(jobs)
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            while True:
                while len(pending) < 2 * workers and (job := next(queue, None)) is not None:
                    own_records = {i: records[i] for i in job.ids}
                    own_anns = {i: anns[i] for i in job.ids if i in anns}
                    pending[pool.submit(_shard_process, job, own_records, own_anns, num_threads)] = job.index
                if not pending:
                    return
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    footer, bad = future.result()
                    if bad is not None:  # strict mode: the record that stopped it, as serial conversion raises it
                        raise BadRecordError(Skip(**bad))
                    yield index, footer
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _shard_process(
    job: ShardJob, records: dict[int, dict[str, Any]], anns: dict[int, list[dict[str, Any]]], num_threads: int
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """`_write_shard` in a worker process: (footer, None), or (None, the bad record) in strict mode (a
    BadRecordError is rebuilt by the parent: it does not pickle)."""
    out_fs, _ = resolve(job.out)
    img_fs, img_root = resolve(job.images)
    with ThreadPoolExecutor(num_threads) as pool:
        try:
            footer = _write_shard(
                out_fs, job.path, job.index, job.ids, records, anns, img_fs, img_root, pool, job.strict, job.key,
                job.row_group_size,
            )  # fmt: skip
        except BadRecordError as err:
            return None, asdict(err.skip)
    return footer, None


def _write_shard(
    out_fs: Any,
    path: str,
    index: int,
    ids: list[int],
    records: dict[int, dict[str, Any]],
    anns: Any,  # image id -> its annotations: a dict, or PackedAnnotations
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
