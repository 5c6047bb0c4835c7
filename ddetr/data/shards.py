"""The on-disk format of a converted COCO split: Parquet shards plus one ``dataset.json``.

A split directory (local path or ``s3://`` / ``gs://`` / ``file://`` URI) holds::

    dataset.json            ShardMetadata: categories, counts, source, skips, the shard list
    shard-00000.parquet     one row per image, ROW_SCHEMA
    shard-00001.parquet     ...

Shard ``k`` holds the valid images whose rank among the sorted image ids falls in
``[k * shard_size, (k + 1) * shard_size)``, so the assignment is a pure function of the annotation
file and the shard size: a resumed conversion rewrites exactly the shards that are missing.
Every file is written through ``ddetr.io.atomic_writer`` (a temporary name starting with ``.``, ignored by
pyarrow and Ray dataset discovery, renamed into place), so a visible shard is always complete.

Shards are written in row groups of ``ROW_GROUP_SIZE`` images: the unit the epoch order permutes and a
reader fetches (``order.py``). ``open_split`` is how a run opens its data: it reads every shard's
Parquet footer (metadata only: the file's last bytes) and checks it against ``dataset.json``, so an
unreadable shard is one error naming it before the first step; it caches the footers per process.
Reads of the store are retried with backoff (``with_retries``, ``ddetr.io.retried``); one that keeps
failing is a ``ShardReadError`` naming the shard. ``DataError`` is the base of both: a fault of the data or the
store, which restarting a worker will not fix.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ddetr import io

FORMAT_VERSION = 1
METADATA_FILE = "dataset.json"
# Images per row group. A rank reads whole row groups, so a group whose images go to two ranks is read
# twice: with groups of 2 and a per-worker batch that is a multiple of 2, never (``order.py``). Smaller
# groups cost footer bytes (about 440 bytes per group for the 12 columns: 0.3% of a COCO shard at 2).
ROW_GROUP_SIZE = 2
READ_ATTEMPTS = 4  # tries of one read of the store before it is an error
READ_BACKOFF_S = 0.5  # wait before the first retry, doubled after each

log = logging.getLogger(__name__)
T = TypeVar("T")

# One row per image. Annotation columns are parallel lists of length n (boxes: 4 * n, flat xywh in
# original pixels, already clipped to the image and validated by the converter).
ROW_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("image", pa.binary()),  # the original encoded bytes, never re-encoded
        ("shard", pa.int32()),  # shard number and row within it: the key of the epoch order
        ("row", pa.int32()),
        ("boxes", pa.list_(pa.float32())),
        ("category_id", pa.list_(pa.int32())),
        ("iscrowd", pa.list_(pa.int8())),
        ("area", pa.list_(pa.float32())),
        ("ann_id", pa.list_(pa.int64())),
    ]
)
ANNOTATION_COLUMNS = ["image_id", "height", "width", "boxes", "category_id", "iscrowd", "area", "ann_id"]


@dataclass
class ShardInfo:
    """One shard as listed in ``dataset.json``."""

    file: str
    num_rows: int
    num_annotations: int


@dataclass
class ShardMetadata:
    """The content of ``dataset.json``.

    ``categories`` are the COCO category dicts (keys ``id``, ``name``, ``supercategory``);
    ``skips`` maps a skip reason to how many records it removed; ``source`` records where the
    split came from (keys ``images``, ``annotations``).
    """

    split: str
    categories: list[dict[str, Any]]
    num_images: int
    num_annotations: int
    shard_size: int
    shards: list[ShardInfo]
    source: dict[str, str] = field(default_factory=dict)
    skips: dict[str, int] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        """Classifier width when raw category ids are used as labels (COCO: 91)."""
        return max(c["id"] for c in self.categories) + 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ShardMetadata:
        raw = json.loads(text)
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"dataset.json has format_version {raw.get('format_version')}, this code reads "
                f"{FORMAT_VERSION}: convert the dataset again"
            )
        raw["shards"] = [ShardInfo(**s) for s in raw["shards"]]
        return cls(**raw)


class DataError(RuntimeError):
    """A fault of the data or of its store (not of a worker): retrying the worker will not fix it."""


class UnreadableShardError(DataError):
    """Shards of a split whose footer cannot be read or disagrees with ``dataset.json``.

    ``problems`` maps each such shard's file name to what is wrong with it.
    """

    def __init__(self, message: str, problems: dict[str, str]) -> None:
        super().__init__(message)
        self.problems = problems


class ShardReadError(DataError):
    """A read of a shard that still failed after ``READ_ATTEMPTS`` tries; ``uri`` names the shard."""

    def __init__(self, message: str, uri: str) -> None:
        super().__init__(message)
        self.uri = uri


def with_retries(what: str, read: Callable[[], T]) -> T:
    """``read()``, retried on I/O errors with exponential backoff (``io.retried``: each retry logged naming
    ``what``, a missing file not retried); after ``READ_ATTEMPTS`` failures a ``ShardReadError``, which ends a run
    instead of restarting its workers."""
    try:
        return io.retried(f"{what}: read", read, attempts=READ_ATTEMPTS, first_wait_s=READ_BACKOFF_S)
    except FileNotFoundError:
        raise
    except OSError as failed:
        err = failed.__cause__ or failed
        raise ShardReadError(
            f"{what}: reading failed {READ_ATTEMPTS} times ({type(err).__name__}: {err}); check that the store "
            "is reachable and the file readable, then resume the run",
            what,
        ) from err


def shard_file(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def read_metadata(split_dir: str, filesystem: pafs.FileSystem | None = None) -> ShardMetadata:
    """Read ``dataset.json`` of a split directory (path or URI)."""
    fs, root = io.resolve(split_dir, filesystem)
    path = posixpath.join(root, METADATA_FILE)

    def read() -> bytes:  # every rank reads it when it starts: a store's transient error is retried
        if not io.exists(path, fs):
            raise FileNotFoundError(f"{split_dir}: no {METADATA_FILE}; run `ddetr data convert` first")
        with fs.open_input_file(path) as f:
            return f.read()

    return ShardMetadata.from_json(with_retries(f"{split_dir}/{METADATA_FILE}", read).decode())


def write_metadata(split_dir: str, meta: ShardMetadata) -> None:
    io.atomic_write(io.join(split_dir, METADATA_FILE), meta.to_json())


def shard_uris(split_dir: str, meta: ShardMetadata) -> list[str]:
    """Full paths (or URIs, when ``split_dir`` is one) of the shards, in shard order."""
    return [posixpath.join(split_dir.rstrip("/"), s.file) for s in meta.shards]


def read_shard(uri: str, columns: list[str] | None = None, filesystem: pafs.FileSystem | None = None) -> pa.Table:
    """Read one whole shard (a few hundred MB at most for COCO with the default shard size)."""
    fs, path = io.resolve(uri, filesystem)
    return with_retries(uri, lambda: pq.read_table(path, filesystem=fs, columns=columns))


def read_shard_footer(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """The conversion record stored in a shard's key-value metadata, or None if unreadable."""
    try:
        with fs.open_input_file(path) as f:
            kv = pq.ParquetFile(f).schema_arrow.metadata or {}
        return json.loads(kv[b"ddetr"].decode())
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None


@dataclass(frozen=True)
class ShardFooter:
    """A shard's Parquet footer as read by ``open_split``: enough to read any of its row groups.

    ``size`` is the file's length in bytes; ``tail`` its last bytes (the serialized footer, its length
    and the magic); ``row_groups`` the number of rows of each row group, in file order.
    """

    size: int
    tail: bytes
    row_groups: tuple[int, ...]

    def metadata(self) -> pq.FileMetaData:
        """The parsed footer, for ``pq.ParquetFile(file, metadata=...)`` (which then reads no footer)."""
        return pq.read_metadata(pa.BufferReader(self.tail))


@dataclass
class Split:
    """An opened split: its metadata, shard paths and checked footers (``open_split``).

    ``footers[k]`` is None for a shard left out as unreadable (``skip_unreadable``); ``skipped`` maps
    such a shard's file name to what is wrong with it.
    """

    uri: str
    meta: ShardMetadata
    uris: list[str]
    footers: list[ShardFooter | None]
    skipped: dict[str, str]
    filesystem: pafs.FileSystem | None = None
    warned: bool = False  # the skipped shards were logged

    @property
    def units(self) -> list[list[int]]:
        """Rows per row group of each shard, the order's units ([] for a skipped shard)."""
        return [list(f.row_groups) if f is not None else [] for f in self.footers]


_splits: dict[tuple[str, int], tuple[tuple[int, ...], str, Split]] = {}


def open_split(split_dir: str, *, filesystem: pafs.FileSystem | None = None, skip_unreadable: bool = False) -> Split:
    """Open a split for reading: ``dataset.json`` and every shard's footer, checked.

    Cheap: one listing and, per shard, its footer (the file's last bytes); cached per process, and read
    again only when ``dataset.json`` or a shard's size changed. A shard that is missing, has no
    readable Parquet footer, or another row count than ``dataset.json`` says raises
    ``UnreadableShardError`` naming it, or with ``skip_unreadable`` is left out of the split, its
    images counted in a warning. Footers with one big row group work too but make every rank read
    whole shards: a warning says to convert again.
    """
    if "://" not in split_dir and filesystem is None:
        split_dir = os.path.abspath(split_dir)  # readers may run in another working directory
    fs, root = io.resolve(split_dir, filesystem)
    meta_path = posixpath.join(root, METADATA_FILE)
    if not io.exists(meta_path, fs):
        raise FileNotFoundError(f"{split_dir}: no {METADATA_FILE}; run `ddetr data convert` first")
    text = with_retries(meta_path, lambda: _read_all(fs, meta_path)).decode()
    meta = ShardMetadata.from_json(text)
    listing = {
        posixpath.basename(i.path): i.size
        for i in fs.get_file_info(pafs.FileSelector(root))
        if i.type == pafs.FileType.File
    }
    sizes = tuple(listing.get(s.file, -1) for s in meta.shards)
    key = (split_dir, id(filesystem) if filesystem is not None else 0)
    cached = _splits.get(key)
    if cached is not None and cached[0] == sizes and cached[1] == text:
        split = cached[2]
    else:
        split = _read_split(split_dir, fs, root, meta, sizes, filesystem)
        _splits[key] = (sizes, text, split)
        big = max((max(f.row_groups, default=0) for f in split.footers if f is not None), default=0)
        if big > 8 * ROW_GROUP_SIZE:
            log.warning(
                "%s: row groups of up to %d images; every rank reading such a split reads most of each shard. "
                "Convert it again (row groups of %d) to read each image once per epoch",
                split_dir,
                big,
                ROW_GROUP_SIZE,
            )
    if split.skipped and not skip_unreadable:
        raise _unreadable(split_dir, meta, split.skipped)
    if split.skipped and not split.warned:
        split.warned = True
        lost = sum(s.num_rows for s in meta.shards if s.file in split.skipped)
        log.warning(
            "%s: skipping %d unreadable shards and their %d images: %s",
            split_dir,
            len(split.skipped),
            lost,
            "; ".join(f"{k} ({v})" for k, v in split.skipped.items()),
        )
    return split


def _read_split(
    split_dir: str,
    fs: pafs.FileSystem,
    root: str,
    meta: ShardMetadata,
    sizes: tuple[int, ...],
    filesystem: pafs.FileSystem | None,
) -> Split:
    """Read and check every shard's footer; a bad shard gets None and a line in ``skipped``."""
    footers: list[ShardFooter | None] = []
    problems: dict[str, str] = {}
    for info, size in zip(meta.shards, sizes, strict=True):
        path = posixpath.join(root, info.file)
        problem = "missing" if size < 0 else None
        footer = None
        if problem is None:
            try:
                footer = with_retries(path, lambda path=path: read_footer(fs, path))
                problem = _check_footer(footer, info)
            except (ShardReadError, ValueError, pa.ArrowException) as err:
                problem = str(err)
        if problem is not None:
            problems[info.file] = problem
            footer = None
        footers.append(footer)
    return Split(split_dir, meta, shard_uris(split_dir, meta), footers, problems, filesystem)


def _unreadable(split_dir: str, meta: ShardMetadata, problems: dict[str, str]) -> UnreadableShardError:
    lost = sum(s.num_rows for s in meta.shards if s.file in problems)
    names = "; ".join(f"{posixpath.join(split_dir, k)}: {v}" for k, v in problems.items())
    return UnreadableShardError(
        f"{len(problems)} of {len(meta.shards)} shards unreadable ({names}). Convert the split again (remove the "
        f"bad shards first: `ddetr data convert` rewrites missing ones), or skip their {lost} images with "
        "skip_unreadable (data.skip_unreadable_shards=true)",
        problems,
    )


def _read_all(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def read_footer(fs: pafs.FileSystem, path: str) -> ShardFooter:
    """The footer of a Parquet file from its last bytes: ``<footer><length: 4 bytes LE>PAR1``."""
    with fs.open_input_file(path) as f:
        size = f.size()
        if size < 12:
            raise ValueError(f"{size} bytes, too short for a Parquet file")
        f.seek(size - 8)
        end = f.read(8)
        if end[4:] != b"PAR1":
            raise ValueError("no Parquet footer at its end (truncated or not Parquet)")
        length = int.from_bytes(end[:4], "little")
        if length + 12 > size:
            raise ValueError(f"its footer claims {length} bytes of a {size}-byte file")
        f.seek(size - 8 - length)
        tail = f.read(length) + end
    md = pq.read_metadata(pa.BufferReader(tail))
    data_end = size - len(tail)
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
            if start + col.total_compressed_size > data_end:
                raise ValueError(f"row group {g} ends past the data ({data_end} bytes): truncated")
    return ShardFooter(size, tail, tuple(md.row_group(g).num_rows for g in range(md.num_row_groups)))


def _check_footer(footer: ShardFooter, info: ShardInfo) -> str | None:
    rows = sum(footer.row_groups)
    if rows != info.num_rows:
        return f"its footer holds {rows} rows, {METADATA_FILE} says {info.num_rows}"
    return None
