"""A local folder kept in step with a folder in object storage by a background thread that uploads only what is new.

Object stores have no append: a growing file uploaded whole at every change costs the square of its final size.
Here an append-only file (a `Stream`: the JSON-lines log, a TensorBoard event file) goes up in parts, each a run of
its whole records in order. The newest part is uploaded again as it grows (a reader sees it whole, never half a
record) until it holds `part_bytes`; then it is closed, never written again, and the next part begins. A sync costs
at most one part plus what is new, so a run's traffic grows with its length. Any other file (`curves.png`) is
uploaded whole when its size or modification time changed.

The uploads run on a thread of their own: the caller appends to local files and goes on. A failed upload is logged
and tried again after 1, 2, 4 ... up to 60 s for as long as the mirror lives; nothing here raises into the caller.
`flush` and `close` wait for the uploads, with a bound.

    mirror = FolderMirror(local_dir, "s3://bucket/run", classify=lambda rel: None)
    ...  # write files under local_dir
    mirror.flush(timeout_s=30)  # True once everything written before the call is in the bucket
    mirror.close(timeout_s=60)
"""

from __future__ import annotations

import bisect
import logging
import posixpath
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from ddetr import io

log = logging.getLogger(__name__)

# The newest part of a stream is rewritten at every sync until it holds this much: a sync uploads at most this plus
# what is new (half of it on average). Smaller parts mean less traffic per sync and more objects to read back: at
# ~1 KB of log per step, one part per ~60 steps (a 100k-step run's log is ~1,600 parts, read 16 at a time).
PART_BYTES = 64 * 1024
SYNC_EVERY_S = 5.0  # how often the thread looks for changes when nobody asks for a sync
RETRY_FIRST_S = 1.0  # the wait after a failed sync, doubled after each further failure ...
RETRY_MAX_S = 60.0  # ... up to this
# Object stores where one upload appears whole or not at all (`FileSystem.type_name`): a part is written to its name.
_ATOMIC_PUT_FILESYSTEMS = ("s3", "gcs")


def line_ends(data: bytes) -> list[int]:
    """Offsets just past each newline of `data`: the ends of its whole lines (a line being written has none yet)."""
    ends, at = [], data.find(b"\n")
    while at != -1:
        ends.append(at + 1)
        at = data.find(b"\n", at + 1)
    return ends


def tfrecord_ends(data: bytes) -> list[int]:
    """Offsets just past each whole TFRecord frame of `data` (u64 length, u32 crc, payload, u32 crc; little
    endian): TensorBoard's writer thread may be halfway through a frame when the file is read."""
    ends, at = [], 0
    while at + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, at)
        end = at + 12 + length + 4
        if end > len(data):
            break
        ends.append(end)
        at = end
    return ends


@dataclass
class Stream:
    """How one append-only local file goes up in parts.

    Attributes:
        part_path: the remote path of part i, relative to the remote folder.
        record_ends: the ends of the whole records in a piece of the file that starts at a record (`line_ends`,
            `tfrecord_ends`).
        index: the open part's number.
        start: where the open part begins in the local file (bytes before it are in closed parts, or were in the
            remote folder already: a restarted run's log).
        sent: up to where the open part is in the remote folder.
    """

    part_path: Callable[[int], str]
    record_ends: Callable[[bytes], list[int]]
    index: int = 0
    start: int = 0
    sent: int = 0

    def __post_init__(self) -> None:
        self.sent = max(self.sent, self.start)


class FolderMirror:
    """Uploads what is new under `local_dir` to `remote_dir` on a daemon thread (see the module's docstring).

    Args:
        local_dir: the folder written by the caller; files whose names start with "." (temporary files) are left.
        remote_dir: the folder in object storage (a URI).
        classify: the `Stream` of a file given its path relative to `local_dir` ("tensorboard/events..."), or None
            for a file uploaded whole; asked once per file.
        streams: streams known from the start (a restarted run's log), by relative path.
        part_bytes, every_s, retry_first_s: see PART_BYTES, SYNC_EVERY_S, RETRY_FIRST_S.
    """

    def __init__(
        self,
        local_dir: Path,
        remote_dir: str,
        classify: Callable[[str], Stream | None],
        streams: dict[str, Stream] | None = None,
        part_bytes: int = PART_BYTES,
        every_s: float = SYNC_EVERY_S,
        retry_first_s: float = RETRY_FIRST_S,
    ) -> None:
        self.local_dir, self.remote_dir = Path(local_dir), remote_dir
        self.part_bytes, self.every_s, self.retry_first_s = part_bytes, every_s, retry_first_s
        self._classify = classify
        self._streams: dict[str, Stream | None] = dict(streams or {})
        self._whole: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) last uploaded
        self._fs: tuple[pafs.FileSystem, str] | None = None  # the remote file system and the folder in it
        self._cond = threading.Condition()
        self._asked = 0  # the newest sync asked for (a number that grows)
        self._started = 0  # the newest asked-for sync that a pass began after
        self._done = 0  # the newest asked-for sync that a pass completed after
        self._failures = 0  # failed passes in a row
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="ddetr-log-upload", daemon=True)
        self._thread.start()

    def request(self) -> int:
        """Ask for a sync now (without waiting); returns its number for `wait`."""
        with self._cond:
            self._asked += 1
            self._cond.notify_all()
            return self._asked

    def wait(self, number: int, timeout_s: float) -> bool:
        """Whether the sync `number` completed within `timeout_s`: every file as it was when it was asked for is in
        the remote folder."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._done < number:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(left)
        return True

    def flush(self, timeout_s: float) -> bool:
        """Sync now and wait up to `timeout_s`; whether everything written before the call is in the remote folder."""
        return self.wait(self.request(), timeout_s)

    def close(self, timeout_s: float) -> bool:
        """A last sync, waited for up to `timeout_s`, then the thread ends; whether everything is in the remote
        folder."""
        synced = self.flush(timeout_s)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if synced:
            self._thread.join(timeout=timeout_s)
        return synced

    def _run(self) -> None:
        last_pass, retry_at = 0.0, 0.0
        while True:
            with self._cond:
                while True:  # until asked, or due (the next look for changes, or the retry after a failure)
                    if self._stop:
                        return
                    due = retry_at if self._failures else last_pass + self.every_s
                    left = due - time.monotonic()
                    if self._asked > self._started or left <= 0:
                        break
                    self._cond.wait(min(left, RETRY_MAX_S))  # a bounded wait: `every_s` may be infinite
                number = self._started = self._asked
            try:
                error = self._sync()
            except Exception as err:  # noqa: BLE001 - the thread must outlive any failure, and report it
                error = err
            if error is not None:
                self._fs = None  # connect afresh next time (credentials may have been renewed meanwhile)
            with self._cond:
                last_pass = time.monotonic()
                if error is None:
                    if self._failures:
                        log.warning("the run log reaches %s again (after %d failed syncs)", self.remote_dir,
                                    self._failures)  # fmt: skip
                    self._failures = 0
                    self._done = max(self._done, number)
                else:
                    self._failures += 1
                    wait = min(RETRY_MAX_S, self.retry_first_s * 2 ** (self._failures - 1))
                    retry_at = last_pass + wait
                    log.warning(
                        "uploading the run log to %s failed (%s: %s); the run goes on, its log is kept in %s and "
                        "uploaded again in %.3g s (failure %d in a row)",
                        self.remote_dir, type(error).__name__, error, self.local_dir, wait, self._failures,
                    )  # fmt: skip
                self._cond.notify_all()

    def _sync(self) -> Exception | None:
        """Upload what changed; the first error (the store is likely down: the rest waits for the next pass)."""
        for path in sorted(self.local_dir.rglob("*")):
            relative = path.relative_to(self.local_dir).as_posix()
            if path.name.startswith(".") or not path.is_file():
                continue
            if relative not in self._streams:
                self._streams[relative] = self._classify(relative)
            stream = self._streams[relative]
            try:
                if stream is None:
                    self._upload_whole(path, relative)
                else:
                    self._upload_stream(path, stream)
            except Exception as err:  # noqa: BLE001 - a store error of any kind is retried, never raised
                return err
        return None

    def _put(self, relative: str, data: bytes) -> None:
        """Write `data` at `relative` in the remote folder, one attempt: the passes are the retries (`io.atomic_write`
        retries inside for many seconds, which would hold the pass up and hide the failure from it)."""
        if self._fs is None:
            self._fs = io.resolve(self.remote_dir)
        fs, root = self._fs
        inner = posixpath.join(root, relative)
        if fs.type_name not in _ATOMIC_PUT_FILESYSTEMS:  # a file system where a half-written file can be seen
            io.atomic_write(io.join(self.remote_dir, relative), data)
            return
        with fs.open_output_stream(inner) as out:
            out.write(data)

    def _upload_whole(self, path: Path, relative: str) -> None:
        try:
            info = path.stat()
            data = path.read_bytes()
        except FileNotFoundError:  # replaced between the listing and the read: the next pass sees the new one
            return
        version = (info.st_size, info.st_mtime_ns)
        if self._whole.get(relative) == version:
            return
        self._put(relative, data)
        self._whole[relative] = version

    def _upload_stream(self, path: Path, stream: Stream) -> None:
        """Upload the open part again with its new records, closing it (and any further full parts) at
        `part_bytes`; a record larger than that is a part of its own."""
        with open(path, "rb") as f:
            f.seek(stream.start)
            data = f.read()
        ends = stream.record_ends(data)  # offsets in `data`, which begins at the open part
        base = stream.start
        if not ends or base + ends[-1] <= stream.sent:
            return
        while True:
            begin = stream.start - base
            fits = bisect.bisect_right(ends, begin + self.part_bytes)
            end = ends[fits - 1] if fits and ends[fits - 1] > begin else ends[bisect.bisect_right(ends, begin)]
            self._put(stream.part_path(stream.index), data[begin:end])
            if end - begin < self.part_bytes and end == ends[-1]:  # room left: the part stays open
                stream.sent = base + end
                return
            stream.index, stream.start, stream.sent = stream.index + 1, base + end, base + end
            if end == ends[-1]:
                return
