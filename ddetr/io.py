"""Files and URIs: one place that reads, writes and lists local paths and object storage alike.

Every path the project takes may be a local path or a URI that `pyarrow.fs` understands (`s3://`, `gs://`,
`hdfs://`, `file://`). Writes that must not be lost (shards, checkpoints, safetensors, metrics, tables, plots) go
through one writer, `atomic_writer` (or `atomic_write` for bytes in hand): a reader sees the old file or the whole
new one, never a part, and on local disks the file and its folder are on the disk when the write returns.

    from ddetr import io
    io.atomic_write("s3://bucket/run/metrics.json", json.dumps(metrics))
    with io.atomic_writer("runs/demo/checkpoint_00000010/state.pt") as f:
        torch.save(payload, f)
    text = io.read_text("runs/demo/metrics.json")

Reads and writes of object storage that fail transiently are retried with backoff (`retried`).

Object storage reads the standard variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...) through pyarrow.
"""

from __future__ import annotations

import contextlib
import io as _io
import logging
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TextIO, TypeVar

import pyarrow.fs as pafs

# Object stores where one upload becomes visible whole or not at all (`FileSystem.type_name`): writing the final
# name directly is atomic there, and a temporary name plus a move would cost a second copy of the object.
_ATOMIC_PUT_FILESYSTEMS = ("s3", "gcs")
log = logging.getLogger(__name__)
T = TypeVar("T")
COPY_CHUNK = 32 * 1024 * 1024  # bytes per read when copying: each read from an object store is one request
# A write to object storage is gathered locally first (in memory up to this size, then in a temporary file), so
# that the upload can be retried and an error inside the writer's block uploads nothing.
SPOOL_BYTES = 64 * 1024 * 1024


def is_uri(path: str | os.PathLike) -> bool:
    """Whether `path` names a file system by scheme (`s3://...`) rather than a local path."""
    return "://" in str(path)


def absolute(path: str | os.PathLike) -> str:
    """A local path made absolute (user and relative parts resolved); URIs and "" unchanged.

    Ray runs workers in directories of its own, so paths handed to them must not depend on the caller's cwd.
    """
    path = str(path)
    return path if not path or is_uri(path) else str(Path(path).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a local path or a URI (URIs always join with "/")."""
    return posixpath.join(base.rstrip("/"), *parts) if is_uri(base) else str(Path(base, *parts))


def resolve(path: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """The file system of `path` (a local path or a URI) and the path within it.

    With `filesystem`, `path` already is a path inside it (tests wrap a local file system this way).
    """
    path = str(path)
    if filesystem is not None:
        return filesystem, path
    return pafs.FileSystem.from_uri(path if is_uri(path) else os.path.abspath(os.path.expanduser(path)))


def exists(path: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> bool:
    fs, inner = resolve(path, filesystem)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def file_size(path: str | os.PathLike) -> int | None:
    """The size of the file at `path` in bytes; None when there is no file there (nothing, or a folder)."""
    fs, inner = resolve(path)
    info = fs.get_file_info(inner)
    return info.size if info.type == pafs.FileType.File else None


def is_dir(path: str | os.PathLike) -> bool:
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def listdir(path: str | os.PathLike) -> list[str]:
    """Names (not paths) of the entries of a folder, sorted; [] when it does not exist."""
    fs, inner = resolve(path)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        return []
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in fs.get_file_info(pafs.FileSelector(inner)))


def makedirs(path: str | os.PathLike) -> None:
    fs, inner = resolve(path)
    fs.create_dir(inner, recursive=True)


def remove(path: str | os.PathLike) -> None:
    """Delete a file (nothing when it is not there)."""
    fs, inner = resolve(path)
    if fs.get_file_info(inner).type == pafs.FileType.File:
        fs.delete_file(inner)


def read_bytes(path: str | os.PathLike) -> bytes:
    fs, inner = resolve(path)
    # A random-access file reads an object in one request of its known size; a stream fetches it piece by piece.
    with fs.open_input_file(inner) as f:
        return f.read()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode()


def _temp_name(name: str) -> str:
    """A hidden temporary name for the file `name` (a leading "." keeps pyarrow and Ray from listing it)."""
    return f".{name}.tmp-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> Iterator[BinaryIO]:
    """A binary file to write that appears at `path` whole when the block ends without error, else not at all.

    The one writer of everything that must not be lost: `torch.save` of a checkpoint, safetensors, Parquet
    shards, JSON (`atomic_write`, `atomic_open`). Parent folders are created.

    Local files: a hidden temporary name in the same folder, flushed and fsync'ed, renamed over `path`, then the
    folder fsync'ed, so that both the content and the new name survive a power loss once the block has ended.
    S3 / GCS: gathered locally, then one upload to the final name (an object appears only once complete), retried
    on transient errors. Other file systems: the same upload to a hidden temporary name, then a move.

    Args:
        path: a local path or URI; with `filesystem`, a path inside it (see `resolve`).
    """
    fs, inner = resolve(path, filesystem)
    if isinstance(fs, pafs.LocalFileSystem):
        local = Path(inner)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(_temp_name(local.name))
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, local)
            fsync_dir(local.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
        yield spool  # type: ignore[misc]  # a binary file object
        head, tail = posixpath.split(inner)
        target = inner if fs.type_name in _ATOMIC_PUT_FILESYSTEMS else posixpath.join(head, _temp_name(tail))

        def upload() -> None:
            spool.seek(0)
            fs.create_dir(head, recursive=True)
            with fs.open_output_stream(target) as out:
                shutil.copyfileobj(spool, out, COPY_CHUNK)
            if target != inner:
                fs.move(target, inner)

        retried(f"writing {path}", upload)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (text as UTF-8) so that `path` holds either its previous content or all of `data`
    (`atomic_writer`)."""
    with atomic_writer(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[TextIO]:
    """A text file (UTF-8) to write little by little that appears at `path` whole, when the block ends without
    error (`atomic_writer`). An error inside the block leaves `path` as it was."""
    with atomic_writer(path) as raw:
        text = _io.TextIOWrapper(raw, encoding="utf-8")
        yield text
        text.flush()
        text.detach()  # the writer closes the file: the wrapper must not


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a local folder: a file renamed into it keeps its new name after a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems (FUSE, network mounts) refuse fsync on a folder: nothing more to do there
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file under a local folder, then every folder bottom up, the folder itself last."""
    for folder, _, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append to a local file (created if missing); on object storage, rewrite the object with `text` added.

    Object stores have no append: the whole object is read and written again, atomically, so a lost writer
    loses at most the line it was adding.
    """
    path = str(path)
    if not is_uri(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(text)
        return
    old = read_bytes(path) if exists(path) else b""
    atomic_write(path, old + text.encode())


def retried(what: str, action: Callable[[], T], attempts: int = 4, first_wait_s: float = 1.0) -> T:
    """`action()`, tried again after 1, 2, 4 ... s when it raises an OSError other than a missing file (a network
    timeout, an object store's 503); each retry is logged, and the last error is raised naming `what`."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except FileNotFoundError:
            raise
        except OSError as err:
            if attempt == attempts:
                raise OSError(f"{what}: failed {attempts} times, last with {err}") from err
            wait = first_wait_s * 2 ** (attempt - 1)
            log.warning("%s failed (%s); retry %d of %d in %.0f s", what, err, attempt, attempts - 1, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def copy(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Copy a file, or a folder and everything under it, between any two file systems (paths or URIs).

    Each file is written whole (an object store shows it complete or not at all); a folder is not copied
    atomically: write a marker last (a checkpoint's manifest) when readers must tell a complete copy.
    """
    src_fs, src = resolve(source)
    dst_fs, dst = resolve(destination)
    info = src_fs.get_file_info(src)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"nothing to copy at {source}")
    if info.type == pafs.FileType.File:
        dst_fs.create_dir(posixpath.dirname(dst), recursive=True)
    else:
        dst_fs.create_dir(dst, recursive=True)

    # Large pieces: each piece read from an object store is a request of its own.
    def copy_all() -> None:
        pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs, chunk_size=COPY_CHUNK)

    retried(f"copying {source} to {destination}", copy_all)


@contextlib.contextmanager
def local_copy(path: str | os.PathLike) -> Iterator[Path]:
    """`path` as a local path for the length of the block: itself when local, else a downloaded copy (file or
    folder) in a temporary folder removed at the end. For readers that need a real file (torch.load, safetensors).
    """
    path = str(path)
    if not is_uri(path) or path.startswith("file://"):
        yield Path(path.removeprefix("file://")).expanduser()
        return
    folder = tempfile.mkdtemp(prefix="ddetr-download-")
    try:
        local = Path(folder, posixpath.basename(path.rstrip("/")) or "download")
        copy(path, local)
        yield local
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def save_figure(figure, path: str | os.PathLike, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG through `atomic_write`."""
    buffer = _io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    atomic_write(path, buffer.getvalue())
