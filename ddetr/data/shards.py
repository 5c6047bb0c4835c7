"""The on-disk format of a converted COCO split: Parquet shards plus one ``dataset.json``.

A split directory (local path or ``s3://`` / ``gs://`` / ``file://`` URI) holds::

    dataset.json            ShardMetadata: categories, counts, source, skips, the shard list
    shard-00000.parquet     one row per image, ROW_SCHEMA
    shard-00001.parquet     ...

Shard ``k`` holds the valid images whose rank among the sorted image ids falls in
``[k * shard_size, (k + 1) * shard_size)``, so the assignment is a pure function of the annotation
file and the shard size: a resumed conversion rewrites exactly the shards that are missing.
Every file is written under a temporary name starting with ``.`` (ignored by pyarrow and Ray
dataset discovery) and renamed into place, so a visible shard is always complete.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

FORMAT_VERSION = 1
METADATA_FILE = "dataset.json"

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


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Split a local path or URI (``s3://``, ``gs://``, ``file://``) into a filesystem and a path."""
    if "://" not in uri:
        uri = os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write to a hidden temporary name beside ``path``, then rename it into place."""
    tmp = temp_name(path)
    with fs.open_output_stream(tmp) as out:
        out.write(data)
    fs.move(tmp, path)


def temp_name(path: str) -> str:
    """A hidden name in the same directory (a leading ``.`` keeps readers from listing it)."""
    head, tail = posixpath.split(path)
    return posixpath.join(head, f".{tail}.tmp-{uuid.uuid4().hex[:8]}")


def shard_file(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def read_metadata(split_dir: str) -> ShardMetadata:
    """Read ``dataset.json`` of a split directory (path or URI)."""
    fs, root = resolve(split_dir)
    path = posixpath.join(root, METADATA_FILE)
    if not exists(fs, path):
        raise FileNotFoundError(f"{split_dir}: no {METADATA_FILE}; run `ddetr data convert` first")
    with fs.open_input_stream(path) as f:
        return ShardMetadata.from_json(f.read().decode())


def write_metadata(split_dir: str, meta: ShardMetadata) -> None:
    fs, root = resolve(split_dir)
    write_bytes_atomic(fs, posixpath.join(root, METADATA_FILE), meta.to_json().encode())


def shard_uris(split_dir: str, meta: ShardMetadata) -> list[str]:
    """Full paths (or URIs, when ``split_dir`` is one) of the shards, in shard order."""
    return [posixpath.join(split_dir.rstrip("/"), s.file) for s in meta.shards]


def read_shard(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read one whole shard (a few hundred MB at most for COCO with the default shard size)."""
    fs, path = resolve(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def read_shard_footer(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """The conversion record stored in a shard's key-value metadata, or None if unreadable."""
    try:
        with fs.open_input_file(path) as f:
            kv = pq.ParquetFile(f).schema_arrow.metadata or {}
        return json.loads(kv[b"ddetr"].decode())
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None
