"""Dataset folders of images with a label file per image (YOLO, Pascal VOC), converted split by split.

What ``yolo.py`` and ``voc.py`` share: a source folder has splits (``FolderSplit``) or is one split itself;
each split becomes an in-memory COCO dict that ``convert_coco`` turns into shards, so the checks, the
skip/strict reporting, the shard writing and the metadata are those of a COCO conversion. A folder with
splits writes ``OUT/<split>/`` for each (``valid`` and ``validation`` are written as ``val``, the name
``ddetr train --data OUT`` looks for); a folder without splits writes ``OUT`` itself, like a COCO split.

Class names (``ClassNames``) come from a file (``classes.txt`` / ``obj.names``: one name per line; an
Ultralytics data YAML: ``names:`` as a list or as ``{index: name}``) or a comma-separated list. A class of
index ``i`` becomes category id ``i + 1``: 0 means "no object" in ddetr, and ``ShardMetadata.num_classes``
is the largest id plus one.

Image sizes are read from the file's header (not its pixels), as the image is shown: an EXIF orientation
that turns the image a quarter swaps width and height, since label tools draw boxes on the turned image.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import yaml
from PIL import Image

from ddetr import io
from ddetr.data.convert import DEFAULT_SHARD_SIZE, ConvertSummary, convert_coco
from ddetr.data.shards import DataError
from ddetr.data.validate import SkipLog

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SPLIT_NAMES = {"valid": "val", "validation": "val"}  # other tools' names for the split ddetr calls val
EXIF_ORIENTATION = 0x0112  # values 5..8 turn the image a quarter


class SourceError(DataError):
    """A dataset folder that cannot be converted as it is: its layout, its class names, or a split asked for."""


@dataclass(frozen=True)
class FolderSplit:
    """One split of a source folder.

    ``name`` is the split's name in the source ("" for a folder without splits); ``images`` the folder the
    image file names are relative to; ``labels`` the folder of the label files (YOLO ``labels/<split>``,
    VOC ``Annotations``); ``ids`` the image ids the split lists (VOC ``ImageSets/Main/<split>.txt``; None:
    every image), ``listed_in`` the file that lists them.
    """

    name: str
    images: str
    labels: str
    ids: tuple[str, ...] | None = None
    listed_in: str = ""

    @property
    def out_name(self) -> str:
        """The split folder written under OUT ("" when the source has no splits: OUT itself)."""
        return SPLIT_NAMES.get(self.name, self.name)


@dataclass(frozen=True)
class ClassNames:
    """Class names by their index in the source (0-based) and where they came from, for messages."""

    names: dict[int, str]
    source: str

    def categories(self) -> list[dict[str, Any]]:
        """COCO categories: index ``i`` is category id ``i + 1``."""
        return [{"id": i + 1, "name": n, "supercategory": ""} for i, n in sorted(self.names.items())]

    def span(self) -> str:
        """The valid indices as a message shows them, e.g. ``0..4``."""
        return f"{min(self.names)}..{max(self.names)}"


def read_class_names(spec: str) -> ClassNames:
    """Class names from a names file, a data YAML, or a comma-separated list (``cat,dog``).

    A spec that ends like a file (``.txt``, ``.names``, ``.yaml``, ``.yml``) or names a path must be one.
    """
    if io.exists(spec) and not io.is_dir(spec):
        return _names_from_file(spec)
    if spec.endswith((".txt", ".names", ".yaml", ".yml")) or "/" in spec:
        raise FileNotFoundError(f"class names file {spec} not found")
    names = [n.strip() for n in spec.split(",")]
    if not all(names):
        raise SourceError(f"class names {spec!r}: an empty name; give them as a,b,c or as a file")
    return ClassNames(dict(enumerate(names)), "--names")


def _names_from_file(path: str) -> ClassNames:
    text = io.read_bytes(path).decode("utf-8-sig", errors="replace")  # Windows tools write a byte-order mark
    where = posixpath.basename(path)
    if path.endswith((".yaml", ".yml")):
        found = _names_from_yaml(text, path)
        if found is None:
            raise SourceError(f"{path}: no names: key (a list of class names, or index: name)")
        return ClassNames(found, where)
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise SourceError(f"{path} line {n}: an empty class name (each line names the class of its index)")
    if not lines:
        raise SourceError(f"{path}: no class names (one name per line)")
    return ClassNames({i: line.strip() for i, line in enumerate(lines)}, where)


def _names_from_yaml(text: str, path: str) -> dict[int, str] | None:
    """``names:`` of an Ultralytics data YAML as {index: name}; None when it has no such key."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SourceError(f"{path}: not YAML ({' '.join(str(err).split())})") from err
    names = data.get("names") if isinstance(data, dict) else None
    if names is None:
        return None
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise SourceError(f"{path}: names: must be a list of class names or index: name, found {names!r:.80}")
    out: dict[int, str] = {}
    for k, v in names.items():
        if not isinstance(k, int) or isinstance(k, bool) or k < 0 or not str(v).strip():
            raise SourceError(f"{path}: names: entry {k!r}: {v!r} is not index: name (index 0, 1, ...)")
        out[k] = str(v).strip()
    return out


def find_yaml_names(root: str) -> ClassNames | None:
    """The names of the first YAML file directly in ``root`` that has a ``names:`` key (data.yaml first)."""
    files = [f for f in io.listdir(root) if f.endswith((".yaml", ".yml"))]
    for f in sorted(files, key=lambda f: (f not in ("data.yaml", "dataset.yaml"), f)):
        found = _names_from_yaml(io.read_text(io.join(root, f)), io.join(root, f))
        if found is not None:
            return ClassNames(found, f)
    return None


def subfolders(root: str) -> tuple[list[str], bool]:
    """Names of the visible folders directly in ``root``, sorted, and whether it directly holds an image file."""
    fs, inner = io.resolve(root)
    folders, images = [], False
    for info in fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True)):
        name = posixpath.basename(info.path.rstrip("/"))
        if info.type == pafs.FileType.Directory and not name.startswith("."):
            folders.append(name)
        images = images or (info.type == pafs.FileType.File and name.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(folders), images


def list_files(root: str, extensions: tuple[str, ...]) -> list[str]:
    """Paths relative to ``root`` (with ``/``) of the files below it with one of ``extensions`` (any case),
    sorted; hidden files and folders (``.name``) left out."""
    fs, inner = io.resolve(root)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        return []
    base = inner.rstrip("/") + "/"
    found = []
    for info in fs.get_file_info(pafs.FileSelector(inner, recursive=True)):
        rel = info.path[len(base) :] if info.path.startswith(base) else posixpath.basename(info.path)
        hidden = any(part.startswith(".") for part in rel.split("/"))
        if info.type == pafs.FileType.File and not hidden and rel.lower().endswith(extensions):
            found.append(rel)
    return sorted(found)


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of an image as shown, from its header; raises ``OSError`` if it is not one."""
    fs, inner = io.resolve(path)
    with fs.open_input_file(inner) as f, Image.open(f) as img:
        w, h = img.size
        try:
            turned = img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
        except Exception:  # a broken EXIF block: Pillow raises several types; the pixels are still usable
            turned = False
    return (h, w) if turned else (w, h)


def convert_splits(
    splits: list[FolderSplit],
    to_coco: Callable[[FolderSplit, SkipLog], dict[str, Any]],
    out: str,
    *,
    strict: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: bool = True,
    num_threads: int = 8,
) -> dict[str, ConvertSummary]:
    """Each split's COCO dict (``to_coco``, which counts its skips in the log it is given) through
    ``convert_coco``; returns the summaries by the split folder written (``OUT/<split>``, or ``OUT``)."""
    summaries: dict[str, ConvertSummary] = {}
    for split in splits:
        skips = SkipLog(strict=strict)
        coco = to_coco(split, skips)
        dest = io.join(out, split.out_name) if split.out_name else out
        summaries[dest] = convert_coco(
            split.images,
            split.labels,
            dest,
            strict=strict,
            shard_size=shard_size,
            progress=progress,
            num_threads=num_threads,
            coco=coco,
            skips=skips,
        )
    written = {s.out_name for s in splits}
    if len(splits) > 1 and not written & {"train", "val"}:
        log.warning(
            "wrote the splits %s under %s; `ddetr train --data %s` looks for train/ and val/: rename two of them "
            "(a split folder may be moved whole)",
            ", ".join(sorted(written)),
            out,
            out,
        )
    return summaries


def pick_splits(found: list[FolderSplit], wanted: list[str] | None, source: str) -> list[FolderSplit]:
    """The splits named in ``wanted`` (all found when None), in the order given; an unknown name is an error."""
    if not wanted:
        return found
    by_name = {s.name: s for s in found}
    missing = [w for w in wanted if w not in by_name]
    if missing:
        have = ", ".join(s.name for s in found if s.name) or "none: the folder is one split"
        raise SourceError(f"{source}: no split {', '.join(missing)} (splits there: {have})")
    return [by_name[w] for w in wanted]
