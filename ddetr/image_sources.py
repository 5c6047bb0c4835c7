"""The images a `ddetr predict` command line names: files, folders, globs and object-storage prefixes, listed.

    images = list_images(["a.jpg", "photos/", "shots/**/*.png", "s3://bucket/cameras/"])
    for image in images:
        image.path    # what to read: a local path or a URI, in the form given ("photos/x/y.jpg")
        image.name    # its drawing under the output folder, without extension: "a", "x/y"

One input is, in this order:
- an existing file: taken as it is, whatever its extension (one that does not decode is skipped later, with a warning
  naming it);
- a folder, local or in object storage (`s3://bucket/images/`): every image file under it, recursively;
- a glob (`*`, `?`, `[...]` within one name, `**` for any number of folders), quoted so that the shell leaves it to
  us: the image files it matches, local or in object storage (`"s3://bucket/cam*/*.jpg"`);
- an object-storage key prefix (`s3://bucket/images/cam1_`): the image files whose keys start with it;
- anything else: taken as a file, so that the reader's warning names it (a missing file is skipped, not fatal).

An image file has an extension of `IMAGE_EXTENSIONS` and a name not starting with "." (writers' temporary files).
Folders and globs list in sorted order, inputs in the order given, each path once. Only paths are held: a million
images cost their names, never their pixels.
"""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow.fs as pafs

from ddetr import io

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_WILDCARD = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class ImageSource:
    """One image to detect: `path` to read (a local path or a URI) and `name`, its drawing's path relative to the
    output folder without extension (unique within one listing)."""

    path: str
    name: str


def is_image_name(path: str) -> bool:
    """Whether a file's name is an image's: an extension of `IMAGE_EXTENSIONS` (any case), not hidden."""
    base = posixpath.basename(path)
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def list_images(inputs: Iterable[str]) -> list[ImageSource]:
    """Every image the inputs name (see the module docstring), in order, each path once; logs one line saying what
    the inputs were read as ("200 images from 1 folder").

    An input that names no image (an empty folder, a glob that matches nothing) gets a warning naming it; whether
    an empty listing is an error is the caller's to say.
    """
    images: list[ImageSource] = []
    seen: set[str] = set()
    names: set[str] = set()
    kinds: dict[str, int] = {}
    for spec in map(str, inputs):
        kind, found = _expand(spec)
        kinds[kind] = kinds.get(kind, 0) + 1
        if not found:
            log.warning("%s: a %s with no image file (%s)", spec, kind, " ".join(IMAGE_EXTENSIONS))
        for path, name in found:
            if path in seen:
                continue
            seen.add(path)
            unique, n = name, 1
            while unique in names:  # a.jpg of two folders given one by one: a.png and a-1.png
                unique, n = f"{name}-{n}", n + 1
            names.add(unique)
            images.append(ImageSource(path, unique))
    read_as = ", ".join(f"{n} {kind}{'s' * (n > 1)}" for kind, n in kinds.items())
    log.info("%d image%s from %s", len(images), "s" * (len(images) != 1), read_as or "no input")
    return images


def _expand(spec: str) -> tuple[str, list[tuple[str, str]]]:
    """What `spec` is ("file", "folder", "glob", "prefix") and the (path, drawing name) of each image it names."""
    fs, inner = io.resolve(spec)
    kind = fs.get_file_info(inner).type
    if kind == pafs.FileType.File:
        return "file", [(spec, _stem(posixpath.basename(inner)))]
    if kind == pafs.FileType.Directory:
        return "folder", [(p, _stem(rel)) for p, rel in _files_under(spec) if is_image_name(rel)]
    if _WILDCARD.search(spec):
        return "glob", _glob(spec)
    scheme, _, key = spec.partition("://")
    if key and "/" in key.rstrip("/"):  # bucket/some/key_prefix: the keys below its folder that start with it
        folder, start = spec.rsplit("/", 1)
        found = [(p, _stem(rel)) for p, rel in _files_under(folder) if rel.startswith(start) and is_image_name(rel)]
        return "prefix", found
    return "file", [(spec, _stem(posixpath.basename(inner)))]  # missing: the reader's warning will name it


def _files_under(folder: str) -> list[tuple[str, str]]:
    """(path, path relative to `folder` with "/") of every file under `folder`, recursively, sorted; paths keep the
    form of `folder` (relative local paths stay relative, URIs stay URIs)."""
    fs, inner = io.resolve(folder)
    inner = inner.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    rels = sorted(i.path[len(inner) :].lstrip("/") for i in infos if i.type == pafs.FileType.File)
    return [(_below(folder, rel), rel) for rel in rels]


def _below(folder: str, rel: str) -> str:
    return f"{folder.rstrip('/')}/{rel}" if io.is_uri(folder) else io.join(folder, *rel.split("/"))


def _glob(pattern: str) -> list[tuple[str, str]]:
    """The image files a glob matches, named by their path below its last folder without wildcards.

    Without `**`, folders are listed one level at a time and only those that match are entered (as a shell does);
    with it, the folder below the fixed part is listed recursively and matched whole."""
    scheme, sep, rest = pattern.rpartition("://")
    parts = rest.split("/")
    first = next(i for i, part in enumerate(parts) if _WILDCARD.search(part))
    base = "/".join(parts[:first]) or ("/" if rest.startswith("/") else ".")
    base = f"{scheme}{sep}{base}"
    wild = parts[first:]
    if "**" in wild:
        regex = re.compile("".join(_part_regex(p, last=i == len(wild) - 1) for i, p in enumerate(wild)) + r"\Z")
        return [(p, _stem(rel)) for p, rel in _files_under(base) if regex.match(rel) and is_image_name(rel)]
    fs, inner = io.resolve(base)
    frontier = [("", inner.rstrip("/"))]
    for depth, part in enumerate(wild):
        regex, last = re.compile(_part_regex(part, last=True) + r"\Z"), depth == len(wild) - 1
        wanted = pafs.FileType.File if last else pafs.FileType.Directory
        entered = []
        for rel, folder in frontier:
            for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
                name = posixpath.basename(info.path.rstrip("/"))
                if info.type == wanted and regex.match(name):
                    entered.append((f"{rel}/{name}".lstrip("/"), info.path))
        frontier = sorted(entered)
    return [(_below(base, rel), _stem(rel)) for rel, _ in frontier if is_image_name(rel)]


def _part_regex(part: str, last: bool) -> str:
    """The regular expression of one component of a glob: `**` any folders, `*` and `?` any characters but "/",
    `[...]` / `[!...]` a set; followed by "/" unless it is the last."""
    if part == "**":
        return ".*" if last else "(?:.*/)?"
    out, i = [], 0
    while i < len(part):
        c = part[i]
        end = part.find("]", i + 2) if c == "[" else -1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif end > 0:
            body = part[i + 1 : end]
            negated, body = body.startswith("!"), body.removeprefix("!").replace("\\", r"\\")
            if body.startswith("^"):  # a literal caret, not a regex negation
                body = "\\" + body
            out.append("[" + "^" * negated + body + "]")  # ranges (1-4) as they are
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out) + ("" if last else "/")


def _stem(relative: str) -> str:
    """A relative file path without its extension: the drawing's name."""
    return posixpath.splitext(relative)[0].lstrip("/") or "image"
