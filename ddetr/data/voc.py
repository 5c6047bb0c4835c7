"""Pascal VOC folders to shards: ``ddetr data convert --format voc``.

Layout of the source folder ``DIR`` (one year of ``VOCdevkit``, or any tool's VOC export)::

    DIR/Annotations/<id>.xml          one file per image: <size>, and an <object> per box
    DIR/JPEGImages/<id>.jpg           the images (another extension, or the XML's <filename>, is found too)
    DIR/ImageSets/Main/<split>.txt    optional: the ids of a split, one per line

Splits: ``--split`` names any ``ImageSets/Main/<split>.txt``; by default every one there (but ``trainval``
where ``train`` and ``val`` are there too: it is their union), each written to ``OUT/<split>``. Without
split files every annotation is one split, written to ``OUT`` itself. (``<class>_<split>.txt`` files are
VOC's per-class lists, not splits.)

Class names: ``--names``, else every ``<object><name>`` in ``Annotations/`` (all files, not only a split's,
so every split gets the same ids), sorted: category ids 1..K in that order.

Boxes: VOC's pixel indices start at 1 and include both ends, so ``x = xmin - 1`` and ``w = xmax - x``
(as detectron2 reads VOC). Objects marked ``<difficult>1</difficult>`` become ``iscrowd = 1``: kept in the
shards, left out of training (crowd boxes are, ``decode.py``), and ignored by the COCO evaluation: a
detection that matches one neither counts as a hit nor as a false positive, as VOC's own evaluation does
with difficult objects. (One difference: COCOeval divides a detection's overlap with a crowd box by the
detection's area rather than the union, so a detection inside a difficult box is ignored too.)

The image size is the XML's ``<size>``; where it is missing or 0, the image file's header. A bad object is
skipped and counted (or, with ``--strict``, stops the conversion), naming the XML file, the object's
position and the field: ``Annotations/0005.xml object 2 bndbox.xmax: 'ten' is not a number``.
"""

from __future__ import annotations

import logging
import math
import posixpath
import xml.etree.ElementTree as ET
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
    image_size,
    list_files,
    pick_splits,
    read_class_names,
)
from ddetr.data.validate import CLIP_TOLERANCE, Skip, SkipLog

log = logging.getLogger(__name__)

CLASS_SPLIT_SUFFIXES = ("_train", "_val", "_trainval", "_test")  # ImageSets/Main/<class>_<split>.txt: not splits
BOX_TAGS = ("xmin", "ymin", "xmax", "ymax")
TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no", "")

Parsed = dict[str, "ET.Element | str"]  # annotation id -> its XML root, or why it could not be parsed


def convert_voc(
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
    """Convert a Pascal VOC folder into shards: ``OUT/<split>/`` per split, or ``OUT`` without split files.

    Args:
        source: the folder holding ``Annotations/`` and ``JPEGImages/`` (path or URI).
        out: where the shards go.
        names: a names file, data YAML or ``a,b,c`` (default: the sorted object names of every annotation).
        splits: the ``ImageSets/Main`` splits to convert (default: every one, but trainval beside train and val).
        strict, shard_size, progress, num_threads: as ``convert_coco``.
    Returns:
        the ``ConvertSummary`` of each split written, by its folder.
    """
    annotations = io.join(source, "Annotations")
    if not io.is_dir(annotations):
        if not io.is_dir(source):
            raise FileNotFoundError(f"VOC dataset folder {source} not found")
        raise SourceError(f"{source}: no Annotations/ folder; give the folder that holds Annotations/ and JPEGImages/")
    parsed = parse_all(annotations, num_threads)
    classes = read_class_names(names) if names else names_in(parsed, annotations)
    log.info("VOC classes from %s: %s", classes.source, ", ".join(n for _, n in sorted(classes.names.items())))
    found = find_splits(source)
    if not splits:  # every split, but not trainval beside train and val: it is their union
        names_found = {s.name for s in found}
        splits = [s.name for s in found if not (s.name == "trainval" and {"train", "val"} <= names_found)]

    def to_coco(split: FolderSplit, skips: SkipLog) -> dict[str, Any]:
        return voc_to_coco(split, parsed, classes, skips, num_threads=num_threads)

    return convert_splits(pick_splits(found, splits, source), to_coco, out, strict=strict, shard_size=shard_size,
                          progress=progress, num_threads=num_threads)  # fmt: skip


def find_splits(root: str) -> list[FolderSplit]:
    """Every split that ``ImageSets/Main`` lists, or one unnamed split of all annotations when it lists none."""
    images, annotations, main = (
        io.join(root, "JPEGImages"),
        io.join(root, "Annotations"),
        io.join(root, "ImageSets", "Main"),
    )
    found = []
    for f in io.listdir(main):
        name = f[: -len(".txt")]
        if f.endswith(".txt") and not name.endswith(CLASS_SPLIT_SUFFIXES):
            listed = io.join(main, f)
            ids = dict.fromkeys(line.split()[0] for line in io.read_text(listed).splitlines() if line.strip())
            found.append(FolderSplit(name, images, annotations, tuple(ids), listed))
    return found or [FolderSplit("", images, annotations)]


def parse_all(annotations: str, num_threads: int = 8) -> Parsed:
    """Every ``*.xml`` under ``annotations``, parsed, by id (its path without ``.xml``)."""
    files = list_files(annotations, (".xml",))
    if not files:
        raise SourceError(f"{annotations}: no .xml annotation files")
    with ThreadPoolExecutor(num_threads) as pool:
        texts = pool.map(lambda f: io.read_bytes(io.join(annotations, f)), files)
        parsed: Parsed = {}
        for f, text in zip(files, texts, strict=True):
            try:
                parsed[f[: -len(".xml")]] = ET.fromstring(text)
            except ET.ParseError as err:
                parsed[f[: -len(".xml")]] = f"not valid XML: {err}"
    return parsed


def names_in(parsed: Parsed, annotations: str) -> ClassNames:
    """The object names of every parsed annotation, sorted: index ``i`` (category id ``i + 1``) by name."""
    names = sorted({(o.findtext("name") or "").strip() for r in parsed.values() if not isinstance(r, str)
                    for o in r.findall("object")} - {""})  # fmt: skip
    if not names:
        raise SourceError(f"{annotations}: no <object><name> in any annotation; give the classes with --names")
    return ClassNames(dict(enumerate(names)), f"the object names in {posixpath.basename(annotations)}/")


def voc_to_coco(
    split: FolderSplit, parsed: Parsed, classes: ClassNames, skips: SkipLog, num_threads: int = 8
) -> dict[str, Any]:
    """The COCO dict of one split: an image record per annotation with an image file (ids 1.. in the split's
    order, else sorted), an annotation per valid object; what is wrong goes to ``skips``."""
    keys = list(split.ids) if split.ids is not None else sorted(parsed)
    files = _image_files(split.images)
    category = {n: i + 1 for i, n in sorted(classes.names.items())}
    todo = []  # (id, xml path, root, image file name)
    for key in keys:
        xml = io.join(split.labels, key + ".xml")
        root = parsed.get(key)
        if root is None:
            skips.skip(
                Skip("annotation_missing", split.listed_in, field=f"id {key}", detail=f"no {key}.xml in Annotations/")
            )
        elif isinstance(root, str):
            skips.skip(Skip("annotation_unparsable", xml, field="xml", detail=root))
        elif (name := files.get(key) or files.get(posixpath.splitext(root.findtext("filename") or "")[0])) is None:
            tried = f"{key}.jpg, another extension, or <filename> {root.findtext('filename')!r}"
            skips.skip(Skip("image_missing", xml, field="filename", detail=f"no image ({tried}) in {split.images}"))
        else:
            todo.append((key, xml, root, name))
    # The XML's size where it has one; the image's header (a read per image) only where it has not.
    sizes = {key: _xml_size(root) for key, _, root, _ in todo}
    missing = [(key, name) for key, _, _, name in todo if sizes[key] is None]
    with ThreadPoolExecutor(num_threads) as pool:
        read = pool.map(lambda m: _header_size(io.join(split.images, m[1])), missing)
        sizes.update({key: size for (key, _), size in zip(missing, read, strict=True)})

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for key, xml, root, name in todo:
        size = sizes[key]
        if isinstance(size, str):
            skips.skip(Skip("image_undecodable", io.join(split.images, name), field="image", detail=size))
            continue
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
        for k, obj in enumerate(root.findall("object"), 1):

            def bad(reason: str, fld: str, detail: str, k: int = k, xml: str = xml) -> None:
                skips.skip(Skip(reason, xml, field=f"object {k} {fld}", detail=detail))

            ann = _object(obj, category, classes, size, skips.strict, bad)
            if ann is not None:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    return {"images": images, "annotations": annotations, "categories": classes.categories()}


def _object(
    obj: ET.Element,
    category: dict[str, int],
    classes: ClassNames,
    size: tuple[int, int],
    strict: bool,
    bad: Callable[[str, str, str], None],
) -> dict[str, Any] | None:
    """``{"category_id", "bbox", "iscrowd"}`` of one ``<object>``, or None after reporting what is wrong."""
    name = (obj.findtext("name") or "").strip()
    if name not in category:
        detail = "no <name>" if not name else f"class {name!r} is not in {classes.source}"
        bad("annotation_unknown_category", "name", detail)
        return None
    difficult = (obj.findtext("difficult") or "").strip().lower()
    if difficult not in TRUE + FALSE:
        bad("annotation_bad_field", "difficult", f"{difficult!r} is not 0 or 1")
        return None
    box = obj.find("bndbox")
    if box is None:
        bad("box_malformed", "bndbox", "the object has no <bndbox>")
        return None
    values = []
    for tag in BOX_TAGS:
        text = box.findtext(tag)
        try:
            values.append(float(text))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            bad("box_malformed", f"bndbox.{tag}", f"{text!r} is not a number" if text is not None else "missing")
            return None
        if not math.isfinite(values[-1]):
            bad("box_not_finite", f"bndbox.{tag}", f"{text!r}")
            return None
    xmin, ymin, xmax, ymax = values
    for lo, hi, a, b in ((xmin, xmax, "xmin", "xmax"), (ymin, ymax, "ymin", "ymax")):
        if hi < lo:
            bad("box_negative_size", f"bndbox.{b}", f"{b} {hi:g} is less than {a} {lo:g}")
            return None
    x, y = xmin - 1, ymin - 1  # 1-based, both ends included (module docstring)
    W, H = size
    if x >= W or y >= H or xmax <= 0 or ymax <= 0:
        bad("box_outside_image", "bndbox", f"({xmin:g}, {ymin:g})-({xmax:g}, {ymax:g}) lies outside the {W}x{H} image")
        return None
    overshoot = max(-x, -y, xmax - W, ymax - H)
    if strict and overshoot > CLIP_TOLERANCE:  # clipped otherwise, and counted, as for COCO
        bad("box_outside_image", "bndbox", f"the box extends {overshoot:g} px past the {W}x{H} image")
        return None
    return {"category_id": category[name], "bbox": [x, y, xmax - x, ymax - y], "iscrowd": int(difficult in TRUE)}


def _image_files(images: str) -> dict[str, str]:
    """Image file names in ``images`` by their name without extension (``.jpg`` preferred where several)."""
    files: dict[str, str] = {}
    for rel in sorted(list_files(images, IMAGE_EXTENSIONS), key=lambda r: not r.lower().endswith(".jpg")):
        files.setdefault(posixpath.splitext(rel)[0], rel)
    return files


def _xml_size(root: ET.Element) -> tuple[int, int] | None:
    try:
        w, h = (int(float(root.findtext(f"size/{k}") or "0")) for k in ("width", "height"))
    except ValueError:
        return None
    return (w, h) if w > 0 and h > 0 else None


def _header_size(path: str) -> tuple[int, int] | str:
    try:
        return image_size(path)
    except Exception as err:  # Pillow raises many types for a file that is not an image
        return f"{type(err).__name__}: {err}"
