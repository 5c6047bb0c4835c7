"""Shard rows to training examples: reduced-size JPEG decoding, the transform, the target.

``try_decode_example`` is what both pipelines run on each image (in a Ray Data task through
``decode_rows``, or in a torch DataLoader worker). A row whose bytes fail to decode is logged with
a warning naming its image id and counted in ``decode_failures()`` of that process, so one bad
image never ends an epoch. In the Ray pipeline it is replaced in place by the next image of its read
item that decodes (``fill_failed``), flagged ``substitute``: every rank keeps the number of images it
was dealt, so every rank takes the same number of steps (and the same collectives) whatever the data.
Images leave here as uint8 HWC (a quarter of float32 through Ray's object store); normalisation
happens in the collate step. A decoded batch is an Arrow table of plain columns (``EXAMPLE_SCHEMA``):
the image as raw bytes beside its height and width, because Ray's variable-shaped tensor columns
cost as much to build as the decoding itself.

Reading: ``read_rows`` fetches given (shard, row) pairs by reading only the row groups that hold them
(``ParquetFile.read_row_groups``), each needed group once, with the footer the caller already has or
one this process read before (``_footer``), and retries on I/O errors (``shards.with_retries``).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from ddetr.data.images import decode_upright, open_image, orientation, swaps_sides, to_rgb8, upright
from ddetr.data.shards import ShardFooter, read_footer, with_retries
from ddetr.data.transforms import (
    Geometry,
    TransformConfig,
    image_rng,
    sample_train_geometry,
    transform_boxes,
    val_geometry,
    xyxy_to_cxcywh_normalized,
)
from ddetr.io import resolve

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
        ("substitute", pa.bool_()),  # a copy standing in for an image that failed to decode
    ]
)
# Shard columns the decoder reads (the rest stay on disk).
ROW_COLUMNS = ("image_id", "height", "width", "image", "boxes", "category_id", "iscrowd")


def decode_failures() -> int:
    """How many rows this process has dropped because their image failed to decode."""
    return _failures


def decode_rgb(data: bytes) -> np.ndarray:
    """One encoded image as shown: the (H, W, 3) uint8 RGB array, upright by its EXIF orientation, 16-bit samples
    scaled to 8 bits (``images.decode_upright``; inference, drawing)."""
    return decode_upright(data)


def decode_image(data: bytes, orig_size: tuple[int, int], geo: Geometry) -> np.ndarray:
    """Decode, crop, resize and flip one encoded image as ``geo`` says.

    ``orig_size`` (h, w) and ``geo`` are in the upright frame (what conversion records, see ``images``): the pixels
    are turned upright by their EXIF orientation first. JPEGs are decoded at the smallest DCT scale (1, 1/2, 1/4,
    1/8) whose size still covers the output at the crop's resolution; the crop box is rescaled by the size actually
    decoded. Returns the (oh, ow, 3) uint8 image.
    """
    h, w = orig_size
    x0, y0, x1, y1 = geo.crop
    oh, ow = geo.out_size
    img = open_image(data)
    turn = orientation(img)
    if swaps_sides(turn) and img.size == (w, h) and w != h:
        # A shard converted before orientations were applied recorded the stored frame: keep to it.
        turn = 1
    scale = max(ow / (x1 - x0), oh / (y1 - y0))
    if scale < 1:
        dw, dh = math.ceil(w * scale), math.ceil(h * scale)
        img.draft("RGB", (dh, dw) if swaps_sides(turn) else (dw, dh))  # the stored frame; a no-op but for JPEGs
    img = upright(to_rgb8(img), turn)
    dw, dh = img.size
    fx, fy = dw / w, dh / h
    out = img.resize((ow, oh), Image.BILINEAR, box=(x0 * fx, y0 * fy, x1 * fx, y1 * fy))
    if geo.flip:  # PIL's transposition: the same pixels as numpy's [:, ::-1] copy, in a sixth of the time
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


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
    return examples_to_table([e for e in decode_examples(batch, cfg, train, seed, epoch) if e is not None])


def decode_examples(
    batch: dict[str, Any], cfg: TransformConfig, train: bool, seed: int, epoch: int
) -> list[dict[str, Any] | None]:
    """``try_decode_example`` of each row of a batch of shard rows: None where the image failed to decode."""
    rows = ({k: batch[k][i] for k in ROW_COLUMNS} for i in range(len(batch["image_id"])))
    return [try_decode_example(row, cfg, train, seed, epoch) for row in rows]


def fill_failed(examples: list[dict[str, Any] | None], fallback: dict[str, Any] | None) -> list[dict[str, Any]]:
    """``examples`` with each None replaced by the next example that decoded (wrapping round), else by
    ``fallback``; a replacement is a copy flagged ``substitute``. All None and no fallback: [].

    Deterministic: the same rows fail in every epoch and after every resume, and get the same stand-ins.
    """
    good = [i for i, e in enumerate(examples) if e is not None]
    if not good and fallback is None:
        return []
    filled = []
    for i, example in enumerate(examples):
        if example is None:
            after = [j for j in good if j > i] or good
            source = examples[after[0]] if after else fallback
            example = {**source, "substitute": True}
        filled.append(example)
    return filled


def decode_rows(
    item: pa.Table,
    uris: Sequence[str],
    cfg: TransformConfig,
    train: bool,
    seed: int,
    epoch: int,
    chunk: int,
    sizes: Sequence[int] | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> Iterator[pa.Table]:
    """Read the images named in ``item`` (one row: ``shard``, ``row`` lists) and decode them in that order.

    ``uris`` are the split's shards and ``sizes`` their sizes in bytes when the split was opened (a
    footer this process read for another size is read again). Yields ``EXAMPLE_SCHEMA`` tables of
    ``chunk`` images (the Ray pipeline's map function).
    """
    pairs = np.stack(
        [np.asarray(item.column("shard")[0].as_py(), np.int64), np.asarray(item.column("row")[0].as_py(), np.int64)],
        axis=1,
    )
    table = read_rows(uris, pairs, filesystem=filesystem, sizes=sizes)
    # Rows that failed before any image of the item decoded wait for the first one that does (order is kept);
    # an item in which nothing decodes yields nothing, and the trainer repeats a batch instead (`loop.py`).
    waiting: list[None] = []
    last_good: dict[str, Any] | None = None
    for start in range(0, table.num_rows, chunk):
        examples = decode_examples(table.slice(start, chunk).to_pydict(), cfg, train, seed, epoch)
        filled = fill_failed([*waiting, *examples], last_good)
        if not filled:
            waiting += examples
            continue
        waiting = []
        last_good = next((e for e in reversed(filled) if not e.get("substitute")), last_good)
        yield examples_to_table(filled)


# This process's footers, by (filesystem, uri, file size): a Ray decode worker reads each shard's footer once.
_footers: dict[tuple[int, str, int | None], ShardFooter] = {}
_parsed: OrderedDict[tuple[int, str, int | None], pq.FileMetaData] = OrderedDict()
PARSED_FOOTERS = 32  # parsed footers kept per process (COCO: ~3 MB each with row groups of 2)
# The file systems given explicitly, distinct by value (`FileSystem.equals`): each task gets its own unpickled copy
# of the one its dataset was built with, and a key by object would read every footer again in every task.
_filesystems: list[pafs.FileSystem] = []


def _filesystem_key(filesystem: pafs.FileSystem | None) -> int:
    if filesystem is None:  # resolved from the URI
        return 0
    for i, known in enumerate(_filesystems):
        if known.equals(filesystem) or _same_handler(known, filesystem):
            return i + 1
    _filesystems.append(filesystem)
    return len(_filesystems)


def _same_handler(a: pafs.FileSystem, b: pafs.FileSystem) -> bool:
    """Whether two `PyFileSystem`s (fsspec's through `FSSpecHandler`, say) wrap equal handlers: their own `equals`
    tells copies apart by object."""
    if not (isinstance(a, pafs.PyFileSystem) and isinstance(b, pafs.PyFileSystem)):
        return False
    return type(a.handler) is type(b.handler) and bool(a.handler.equals(b.handler))


def _metadata(
    uri: str, filesystem: pafs.FileSystem | None, footer: ShardFooter | None, size: int | None
) -> pq.FileMetaData:
    key = (_filesystem_key(filesystem), uri, footer.size if footer is not None else size)
    if key in _parsed:
        _parsed.move_to_end(key)
        return _parsed[key]
    if footer is None:
        footer = _footers.get(key)
    if footer is None:
        fs, path = resolve(uri, filesystem)
        footer = _footers[key] = with_retries(uri, lambda: read_footer(fs, path))
    md = _parsed[key] = footer.metadata()
    if len(_parsed) > PARSED_FOOTERS:
        _parsed.popitem(last=False)
    return md


def read_rows(
    uris: Sequence[str],
    pairs: np.ndarray,
    *,
    filesystem: pafs.FileSystem | None = None,
    footers: Sequence[ShardFooter | None] | None = None,
    sizes: Sequence[int] | None = None,
    columns: Sequence[str] = ROW_COLUMNS,
) -> pa.Table:
    """The ``columns`` of the (M, 2) (shard, row) ``pairs``, in that order, as one table.

    Per shard, only the row groups holding its rows are read, each once; ``footers[s]`` (from
    ``shards.open_split``) spares reading shard s's footer again; without it, ``sizes[s]`` (the size
    the shard had when the split was opened) keeps this process from using a footer of an older file.
    """
    parts, where, done = [], np.empty(len(pairs), dtype=np.int64), 0
    shards, first = np.unique(pairs[:, 0], return_index=True)
    for s in shards[np.argsort(first)]:
        mine = np.flatnonzero(pairs[:, 0] == s)
        rows = pairs[mine, 1]
        uri = uris[int(s)]
        footer = footers[int(s)] if footers is not None else None
        md = _metadata(uri, filesystem, footer, int(sizes[int(s)]) if sizes is not None else None)
        group_rows = np.array([md.row_group(g).num_rows for g in range(md.num_row_groups)], dtype=np.int64)
        starts = np.cumsum(group_rows) - group_rows
        group = np.searchsorted(starts, rows, side="right") - 1
        groups = np.unique(group)
        fs, path = resolve(uri, filesystem)

        def read(
            fs: pafs.FileSystem = fs, path: str = path, md: pq.FileMetaData = md, groups: np.ndarray = groups
        ) -> pa.Table:
            with fs.open_input_file(path) as f:
                return pq.ParquetFile(f, metadata=md).read_row_groups(groups.tolist(), columns=list(columns))

        table = with_retries(uri, read)
        # Where each wanted row sits in the concatenation of the groups read.
        base = np.cumsum(group_rows[groups]) - group_rows[groups]
        local = base[np.searchsorted(groups, group)] + rows - starts[group]
        parts.append(table.take(pa.array(local, type=pa.int64())))
        where[mine] = done + np.arange(len(mine))
        done += len(mine)
    if not parts:
        return pa.table({c: pa.array([], type=pa.null()) for c in columns})
    return pa.concat_tables(parts).take(pa.array(where, type=pa.int64()))


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


def _binary_column(arrays: list[np.ndarray]) -> pa.Array:
    """uint8 arrays as one Arrow binary array, their bytes copied once (``tobytes`` and then ``pa.array`` of the
    bytes objects copied every image twice)."""
    sizes = np.fromiter((a.nbytes for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    if offsets[-1] >= 2**31:  # binary's int32 offsets
        raise ValueError(f"{len(arrays)} decoded images hold {offsets[-1]} bytes, over 2 GiB: lower decode_batch_size")
    data = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.empty(0, np.uint8)
    return pa.Array.from_buffers(
        pa.binary(), len(arrays), [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)]
    )


def examples_to_table(examples: list[dict[str, Any]]) -> pa.Table:
    """``decode_example`` dicts to a table of ``EXAMPLE_SCHEMA`` (``collate.collate_columns`` undoes it)."""
    columns = {
        "image": _binary_column([e["image"] for e in examples]),
        "height": [e["size"][0] for e in examples],
        "width": [e["size"][1] for e in examples],
        "boxes": [e["boxes"].reshape(-1) for e in examples],
        "labels": [e["labels"] for e in examples],
        "image_id": [e["image_id"] for e in examples],
        "orig_height": [e["orig_size"][0] for e in examples],
        "orig_width": [e["orig_size"][1] for e in examples],
        "substitute": [bool(e.get("substitute", False)) for e in examples],
    }
    return pa.Table.from_pydict(columns, schema=EXAMPLE_SCHEMA)
