"""The annotation index of a COCO split for conversion: read as a stream, held packed.

`json.loads` of COCO train2017's 448 MB instances file builds about 2 GB of Python objects, and the checked
annotations (a dict per box) as much again: a converter built on them grows with the dataset. Here the file is
read in three streaming passes (`stream_array`: categories, images, annotations), one array element in memory at
a time, each pass checked by `validate.py` as it comes; the kept annotations of each image are packed into one
bytes object of fixed-size records (`PackedAnnotations`, 57 bytes a box) and unpacked only for the shard being
written. What remains per image is its record (file name, height, width) and its packed boxes.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator
from typing import IO, Any

import numpy as np

from ddetr.data.validate import Skip, SkipLog, check_annotations, check_categories, check_images
from ddetr.io import resolve

CHUNK_CHARS = 1 << 20  # what one read adds to the parse buffer
ANNOTATION_BATCH = 20_000  # annotations checked, then packed, at a time
# One kept annotation (`validate.check_annotations`'s dict), packed.
RECORD = np.dtype(
    [("id", "<i8"), ("bbox", "<f8", (4,)), ("category_id", "<i8"), ("iscrowd", "i1"), ("area", "<f8")], align=False
)


class _Stream:
    """Characters of a text stream, parsed one JSON value at a time (`json.JSONDecoder.raw_decode`) from a buffer
    that holds only the value being parsed and what one read brought past it."""

    def __init__(self, f: IO[bytes], name: str) -> None:
        self.f, self.name = f, name
        self.text, self.pos, self.eof = "", 0, False
        self.utf8 = codecs.getincrementaldecoder("utf-8-sig")()
        self.decoder = json.JSONDecoder()

    def _read(self) -> bool:
        data = self.f.read(CHUNK_CHARS)
        self.eof = not data
        self.text = self.text[self.pos :] + self.utf8.decode(data, final=self.eof)
        self.pos = 0
        return not self.eof

    def peek(self) -> str:
        """The next character that is not white space ('' at the end), not consumed."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.text) or not self._read():
                return self.text[self.pos : self.pos + 1]

    def expect(self, chars: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            self.fail(f"expected {' or '.join(repr(x) for x in chars)}, found {c or 'the end of the file'!r}")
        self.pos += 1
        return c

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                value, end = self.decoder.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as err:
                if self._read():
                    continue
                self.fail(err.msg)
            if end < len(self.text) or self.eof or not self._read():  # a number cut by the buffer's end: read on
                self.pos = end
                return value

    def fail(self, what: str) -> None:
        raise ValueError(f"{self.name}: not valid JSON ({what}); check the file, e.g. with python -m json.tool")


def stream_array(f: IO[bytes], key: str, name: str) -> Iterator[Any]:
    """The elements of the top-level object's array `key` in the JSON file `f`, one at a time (nothing if the key
    is missing or not an array); every other member is parsed element by element and dropped. `name` names the
    file in errors."""
    s = _Stream(f, name)
    s.expect("{")
    if s.peek() == "}":
        return
    while True:
        member = s.value()
        s.expect(":")
        if s.peek() == "[":
            s.expect("[")
            if s.peek() == "]":
                s.pos += 1
            else:
                while True:
                    element = s.value()
                    if member == key:
                        yield element
                    if s.expect(",]") == "]":
                        break
        else:
            s.value()
        if s.expect(",}") == "}":
            return


def _stream(uri: str, key: str) -> Iterator[Any]:
    fs, path = resolve(uri)
    try:
        f = fs.open_input_stream(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"annotation file {uri} not found") from err
    with f:
        yield from stream_array(f, key, uri)


class PackedAnnotations:
    """Each image's checked annotations as one bytes object of `RECORD`s; `get` gives back the dicts of
    `validate.check_annotations` (`{"id", "bbox", "category_id", "iscrowd", "area"}`), the same Python values."""

    def __init__(self) -> None:
        self._by_image: dict[int, bytes | list[dict[str, Any]]] = {}

    def add(self, by_image: dict[int, list[dict[str, Any]]]) -> None:
        """Append a batch's annotations (`check_annotations`'s first result) to their images'."""
        for iid, objs in by_image.items():
            if iid in self._by_image:
                objs = self.get(iid) + objs
            try:
                packed = np.array(
                    [(o["id"], o["bbox"], o["category_id"], o["iscrowd"], o["area"]) for o in objs], dtype=RECORD
                )
                self._by_image[iid] = packed.tobytes()
            except OverflowError:  # an id past 64 bits: that image's dicts are kept as they are
                self._by_image[iid] = objs

    def get(self, iid: int, default: list | None = None) -> list[dict[str, Any]]:
        value = self._by_image.get(iid)
        if value is None:
            return [] if default is None else default
        if isinstance(value, list):
            return value
        return [
            {"id": r[0], "bbox": r[1].tolist(), "category_id": r[2], "iscrowd": r[3], "area": r[4]}
            for r in np.frombuffer(value, dtype=RECORD).tolist()
        ]

    def __getitem__(self, iid: int) -> list[dict[str, Any]]:
        if iid not in self._by_image:
            raise KeyError(iid)
        return self.get(iid)

    def __contains__(self, iid: object) -> bool:
        return iid in self._by_image


def index_annotations(
    annotations: Iterable[Any], records: dict[int, dict[str, Any]], category_ids: set[int], skips: SkipLog, file: str
) -> tuple[PackedAnnotations, int]:
    """`check_annotations` over `annotations` in batches, each packed as it is checked: (the kept annotations, how
    many boxes were clipped). Duplicate ids are found across batches here, as `check_annotations` finds them."""
    packed, clipped, seen = PackedAnnotations(), 0, set()

    def unseen() -> Iterator[Any]:
        for a in annotations:
            aid = a.get("id") if isinstance(a, dict) else None
            if isinstance(aid, int) and not isinstance(aid, bool):
                if aid in seen:
                    skips.skip(
                        Skip("duplicate_annotation_id", file, image_id=a.get("image_id"), ann_id=aid,
                             field="annotations.id", detail="second record")
                    )  # fmt: skip
                    continue
                seen.add(aid)
            yield a

    batch: list[Any] = []

    def check_batch() -> None:
        nonlocal clipped
        by_image, n = check_annotations(batch, records, category_ids, skips, file)
        packed.add(by_image)
        clipped += n
        batch.clear()

    for a in unseen():
        batch.append(a)
        if len(batch) == ANNOTATION_BATCH:
            check_batch()
    check_batch()
    return packed, clipped


def read_index(
    annotations: str, skips: SkipLog
) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]], PackedAnnotations, int]:
    """(categories, image records by id, packed annotations, boxes clipped) of the COCO json `annotations` (a path
    or URI), read as streams (three passes over the file) and checked as `validate.py` checks them."""
    categories = check_categories(list(_stream(annotations, "categories")), skips, annotations)
    records = check_images(_stream(annotations, "images"), skips, annotations)
    anns, clipped = index_annotations(
        _stream(annotations, "annotations"), records, {c["id"] for c in categories}, skips, annotations
    )
    return categories, records, anns, clipped
