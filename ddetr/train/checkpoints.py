"""Checkpoints on disk, for both runtimes: what one holds, how it is named, written, verified and found.

A run folder (`train.storage_path / train.name`) holds `checkpoint_<step>` folders (`checkpoint_<step>-<n>` for a
step written again under Ray Train, `checkpoint_name`), each with:

    state.pt            model, optimizer, scheduler, grad scaler, TrainState, config, dataset categories
    metrics.json        the checkpoint's metrics (val/AP ranks checkpoints), small and readable
    config.json         the run's Config, readable without loading the state
    manifest.json       size and sha256 of state.pt, written last: a copy cut short (a node lost mid-write) is
                        detected, and a folder without one is not a checkpoint to resume from

(`state.pt` and `manifest.json` are the format every reader checks: `ddetr.models.checkpoint`, which the models
read too).

and two pointers, small JSON files written atomically after each checkpoint (`update_pointers`):

    latest              {"checkpoint": "checkpoint_00000600", "step": 600, "val/AP": 0.41}: the newest checkpoint
    best                the same for the checkpoint of the highest val/AP (pruning never deletes it)

The single-process runtime writes these folders itself (`ddetr.train.local`: a temporary name, fsync'ed, renamed
into place and verified before anything older is pruned); under Ray Train, `ray.train.report` uploads the same
folder under the same name, so either run folder reads the same way. Either runtime resumes from the newest
checkpoint that verifies (`latest_intact`).
Every command that takes a checkpoint takes a run folder too (`resolve_checkpoint`): its best checkpoint, or its
latest as `RUN_DIR/latest`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ddetr import io
from ddetr.models.checkpoint import (
    MANIFEST_FILE,
    STATE_FILE,
    CorruptCheckpointError,
    read_checkpoint,
    state_file,
    verify_checkpoint,
    write_manifest,
)

log = logging.getLogger(__name__)

CHECKPOINT_METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
CHECKPOINT_PREFIX = "checkpoint_"
# checkpoint_<8 digits>[-<n>], not "<name>.tmp" (a copy cut short)
_CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}(\d{{8}})(?:-([1-9]\d*))?")


@dataclass
class TrainState:
    """Counters of a run. `epoch` is the epoch in progress; `batches_done` counts optimizer steps in it and
    `images_done` the images those steps consumed, by all workers together: the data position to resume from,
    whatever the number of workers then."""

    epoch: int = 0
    step: int = 0
    batches_done: int = 0
    images_done: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    best_ap: float = -1.0


def is_checkpoint_name(name: str) -> bool:
    """Whether `name` is a checkpoint folder's name (`checkpoint_name`'s, not a copy cut short)."""
    return _CHECKPOINT_NAME.fullmatch(name) is not None


def checkpoint_name(step: int, rewrite: int = 0) -> str:
    """The folder name of the checkpoint taken after optimizer step `step`: `checkpoint_00000600`.

    `rewrite` > 0 names the same step written again by a later attempt (`checkpoint_00000600-1`). Ray Train deletes
    a checkpoint it prunes by its path: a run resumed from an older checkpoint (the registered latest was cut short)
    must not write its new checkpoints where Ray Train still holds the old ones (`free_checkpoint_name`).
    """
    return f"{CHECKPOINT_PREFIX}{step:08d}" + (f"-{rewrite}" if rewrite else "")


def checkpoint_order(name: str) -> tuple[int, int]:
    """(step, rewrite) of a checkpoint folder's name: checkpoints sort by it, oldest first.

    Raises:
        ValueError: `name` is not a checkpoint's name.
    """
    found = _CHECKPOINT_NAME.fullmatch(name)
    if found is None:
        raise ValueError(f"{name!r} is not a checkpoint folder's name ({CHECKPOINT_PREFIX}<8 digits>[-<n>])")
    return int(found[1]), int(found[2] or 0)


def free_checkpoint_name(step: int, taken: Collection[str]) -> str:
    """`checkpoint_name(step)`, or its first rewrite whose name is not in `taken`."""
    rewrite = 0
    while checkpoint_name(step, rewrite) in taken:
        rewrite += 1
    return checkpoint_name(step, rewrite)


def checkpoint_names(run_dir: str) -> list[str]:
    """The names of a run folder's checkpoint folders (a local path or a URI), oldest first; complete or not."""
    return sorted((n for n in io.listdir(run_dir) if is_checkpoint_name(n)), key=checkpoint_order)


def run_dir(storage_path: str, name: str) -> str:
    """The run folder `storage_path/name`: an absolute local path, or a URI."""
    return io.join(io.absolute(storage_path), name)


def save_checkpoint(directory: str | os.PathLike, payload: dict[str, Any], metrics: dict[str, Any]) -> Path:
    """Write `payload` (see the module docstring) as `directory/state.pt`, then its metrics and manifest.

    Each file is written atomically (`io.atomic_writer`); the manifest last, so a folder with a manifest is complete.
    Returns the state file's path.
    """
    directory = Path(directory)
    with io.atomic_writer(directory / STATE_FILE) as f:
        torch.save(payload, f)
    finite = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    io.atomic_write(directory / CHECKPOINT_METRICS_FILE, json.dumps(finite))
    io.atomic_write(directory / CONFIG_FILE, json.dumps(payload["config"], indent=1, sort_keys=True))
    write_manifest(directory)
    return directory / STATE_FILE


def load_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint` (a directory, checked against its manifest, or the state file
    itself, read as it is).

    Returns:
        dict with keys model, optimizer, scheduler, scaler, state (a TrainState), config, and optionally
        categories and ema.

    Raises:
        FileNotFoundError: nothing there. CorruptCheckpointError: incomplete or unreadable, naming the file.
    """
    payload = read_checkpoint(state_file(directory), map_location=map_location)
    payload["state"] = TrainState(**payload["state"])
    return payload


def fetch_checkpoint(path: str | os.PathLike, into: str | os.PathLike) -> Path:
    """A checkpoint (folder or state file) as a local path: `path` itself, or when it is a URI (`s3://...`) its
    copy downloaded into the folder `into`, verified against its manifest.

    Raises:
        FileNotFoundError: nothing at `path`. CorruptCheckpointError: the copy does not match its manifest.
    """
    path = str(path)
    if not io.is_uri(path):
        return Path(path)
    local = Path(into) / posixpath.basename(path.rstrip("/"))
    log.info("downloading checkpoint %s", path)
    io.copy(path, local)
    if local.is_dir():
        verify_checkpoint(local)
    return local


def checkpoint_score(directory: str | os.PathLike) -> float:
    """Validation AP recorded beside a checkpoint (a local folder or a URI), or -1 when it was not evaluated."""
    path = io.join(str(directory), CHECKPOINT_METRICS_FILE)
    if not io.exists(path):
        return -1.0
    return _score(json.loads(io.read_text(path)).get("val/AP"))


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoints of a local run folder, oldest first (those whose state file exists; see `latest_intact`)."""
    directory = Path(directory)
    found = [
        p for p in directory.glob(f"{CHECKPOINT_PREFIX}*") if is_checkpoint_name(p.name) and (p / STATE_FILE).exists()
    ]
    return sorted(found, key=lambda p: checkpoint_order(p.name))


# Local checkpoint folders found intact, by the identity of their state file and manifest (inode, size, mtime): a
# run's prune checks every checkpoint it keeps at each new one, and should read each state file once, not each time.
_intact: dict[str, tuple[int, ...]] = {}


def verify_local(checkpoint: Path) -> None:
    """`verify_checkpoint` for a local folder, remembering the folders it passed while their files stay the same."""
    try:
        stats = [os.stat(checkpoint / f) for f in (STATE_FILE, MANIFEST_FILE)]
        identity = tuple(x for st in stats for x in (st.st_ino, st.st_size, st.st_mtime_ns))
    except OSError:  # a file missing: verify_checkpoint names it
        identity = None
    if identity is not None and _intact.get(str(checkpoint)) == identity:
        return
    verify_checkpoint(checkpoint)
    if identity is not None:
        _intact[str(checkpoint)] = identity


def latest_intact(
    run_dir: str | os.PathLike, fetch: Callable[[str], Path] | None = None, skip: Collection[str] = ()
) -> Path | None:
    """The newest checkpoint of a run folder that verifies; each newer one that does not is named in a warning.

    Args:
        run_dir: the run folder, a local path or a URI.
        fetch: for a run folder in object storage: a local copy of one of its checkpoints (Ray: `node_copy`). Each
            is first checked for its manifest and size where it is, so a copy cut short is not downloaded.
        skip: names of checkpoints to leave out (the caller found them corrupt already and said so).

    Returns:
        the checkpoint's local folder (in place, or `fetch`'s copy), or None when none verifies.
    """
    run_dir = str(run_dir)
    names = [n for n in checkpoint_names(run_dir) if n not in skip]
    skipped: list[str] = []
    for name in reversed(names):
        candidate = io.join(run_dir, name)
        try:
            if io.is_uri(candidate):
                if fetch is None:
                    raise ValueError(f"latest_intact({run_dir}): a run folder in object storage needs `fetch`")
                verify_checkpoint(candidate, checksum=False)
                local = fetch(candidate)
                verify_checkpoint(local)
            else:
                local = Path(candidate)
                verify_local(local)
        except CorruptCheckpointError as err:
            log.warning("%s; trying the checkpoint before it", err)
            skipped.append(name)
            continue
        if skipped:
            log.warning("resuming from %s instead of the newer %s, which cannot be used", local, ", ".join(skipped))
        return local
    if names:
        log.warning(
            "%s: none of its %d checkpoints can be used; the run starts from the beginning", run_dir, len(names)
        )
    return None


# ---- checkpoints by name: the best and latest pointers of a run folder -------------------------------------------

BEST, LATEST = "best", "latest"
POINTERS = (BEST, LATEST)
RUN_POINTER = "run"  # a file naming a run folder, e.g. the demo's results/demo/run
HF_WEIGHTS_FILE = "model.safetensors"  # a Hugging Face model folder's weights (see ddetr.models.hf)


def _score(value: Any) -> float:
    """A val/AP as a float; -1 (not evaluated) when missing or not finite."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return -1.0
    return value if math.isfinite(value) else -1.0


def _beats(score: float, current: float) -> bool:
    """Whether a newer checkpoint of val/AP `score` replaces the current best of val/AP `current`.

    A tie keeps the older one (a mid-epoch checkpoint carries the AP of the evaluation before it), except when
    neither was evaluated: then the newer, so a run without validation data points `best` at its newest.
    """
    return score > current or (score < 0 and current < 0)


def _has_state(checkpoint: str) -> bool:
    return io.exists(io.join(checkpoint, STATE_FILE))


def read_pointer(path: str) -> dict[str, Any] | None:
    """A pointer file's JSON (keys "checkpoint", "step", "val/AP"; or "run"), or None when absent or unreadable."""
    try:
        pointer = json.loads(io.read_text(path))
    except (OSError, ValueError):  # missing, or cut short by a writer on a file system without atomic renames
        return None
    return pointer if isinstance(pointer, dict) else None


def update_pointers(run_dir: str, checkpoint: str, metrics: dict[str, Any]) -> None:
    """Point `run_dir/latest` at a checkpoint just written into the run folder, and `run_dir/best` too when its
    val/AP beats the current best's (see `_beats`). Without a best pointer, or when its checkpoint is gone, `best`
    is found again among the run's checkpoints, this one included (see `find_checkpoint`).

    Call it on one process (rank 0) once the checkpoint folder is complete in the run folder (renamed into place,
    or uploaded). Each pointer is written atomically, so a reader sees the old pointer or the new one.

    Args:
        run_dir: the run folder (`run_dir(storage_path, name)`): a local path or a URI.
        checkpoint: the checkpoint folder's name in it (`checkpoint_00000600`), or its path.
        metrics: the checkpoint's metrics; "step" and "val/AP" are recorded in the pointers.
    """
    name = posixpath.basename(str(checkpoint).rstrip("/"))
    entry = {"checkpoint": name, "step": int(metrics.get("step", 0)), "val/AP": _score(metrics.get("val/AP"))}
    io.atomic_write(io.join(run_dir, LATEST), json.dumps(entry))
    best = read_pointer(io.join(run_dir, BEST)) or {}
    current = str(best.get("checkpoint", ""))
    if current == name or current and _has_state(io.join(run_dir, current)):
        # The same checkpoint written again records its new metrics; another one must beat it.
        if current == name or _beats(entry["val/AP"], _score(best.get("val/AP"))):
            io.atomic_write(io.join(run_dir, BEST), json.dumps(entry))
        return
    found = _scan(run_dir, BEST)
    if found is not None:
        found_name = posixpath.basename(found)
        step = checkpoint_order(found_name)[0]
        io.atomic_write(io.join(run_dir, BEST), json.dumps({"checkpoint": found_name, "step": step,
                                                            "val/AP": checkpoint_score(found)}))  # fmt: skip


def pointer_target(run_dir: str, which: str) -> str | None:
    """The checkpoint folder a run folder's `best` or `latest` pointer names, or None (no pointer)."""
    pointer = read_pointer(io.join(run_dir, which))
    return io.join(run_dir, pointer["checkpoint"]) if pointer and pointer.get("checkpoint") else None


def find_checkpoint(run_dir: str, which: str = BEST) -> str | None:
    """A run folder's best or latest checkpoint (local path or URI), or None when it holds none.

    Through its pointer when the pointer's checkpoint is there; else (no pointer yet, a run from before pointers,
    a checkpoint pruned under it) by scanning its `checkpoint_*` folders (`_scan`).
    """
    if which not in POINTERS:
        raise ValueError(f"which must be one of {POINTERS}, got {which!r}")
    target = pointer_target(run_dir, which)
    if target is not None and _has_state(target):
        return target
    found = _scan(run_dir, which)
    if target is not None and found is not None:
        log.warning("%s: the %s pointer names %s, which is gone; using %s", run_dir, which,
                    posixpath.basename(target), posixpath.basename(found))  # fmt: skip
    return found


def _scan(run_dir: str, which: str) -> str | None:
    """The newest of a run folder's checkpoints, or the best by the val/AP of each `metrics.json` (taken oldest
    first, each replacing the best so far when it `_beats` it, as `update_pointers` does); None without any."""
    names = [n for n in checkpoint_names(run_dir) if _has_state(io.join(run_dir, n))]
    if not names:
        return None
    if which == LATEST:
        return io.join(run_dir, names[-1])
    best, best_score = names[0], checkpoint_score(io.join(run_dir, names[0]))
    for name in names[1:]:
        score = checkpoint_score(io.join(run_dir, name))
        if _beats(score, best_score):
            best, best_score = name, score
    return io.join(run_dir, best)


def resolve_checkpoint(path: str | os.PathLike, which: str = BEST) -> str:
    """The checkpoint that `path` names, for every command that takes one (eval, predict, export, serve).

    `path` (a local path or a URI) may be
        a checkpoint: a ddetr checkpoint folder or state file, an official `.pth`, a Hugging Face model folder:
            returned as it is;
        a run folder: its `which` checkpoint ("best" or "latest", see `find_checkpoint`);
        a pointer file `RUN_DIR/best` or `RUN_DIR/latest` (also when not written yet): that checkpoint of the run;
        a `run` pointer file (`{"run": "runs/demo-..."}`, the demo's `results/demo/run`): that run's checkpoint.

    Raises:
        FileNotFoundError: nothing at `path`, or a run folder without a checkpoint; one line naming the path.
    """
    path = str(path)
    name = posixpath.basename(path.rstrip("/"))
    parent = posixpath.dirname(path.rstrip("/")) if io.is_uri(path) else os.path.dirname(path.rstrip("/"))
    if io.is_dir(path):
        if _has_state(path) or io.exists(io.join(path, HF_WEIGHTS_FILE)):
            return path
        found = find_checkpoint(path, which)
        if found is None:
            raise FileNotFoundError(
                f"{path} holds no checkpoint: expected a checkpoint folder ({STATE_FILE}), a Hugging Face folder "
                f"({HF_WEIGHTS_FILE}) or a run folder with {CHECKPOINT_PREFIX}* folders; train into it first"
            )
        log.info("%s: its %s checkpoint is %s", path, which, posixpath.basename(found))
        return found
    if not io.exists(path):
        if name in POINTERS and parent and io.exists(parent):  # RUN_DIR/latest before any pointer was written
            return resolve_checkpoint(parent, name)
        raise FileNotFoundError(f"no such file or folder: {path}")
    if name in POINTERS and parent:
        return resolve_checkpoint(parent, name)
    if name == RUN_POINTER:
        return resolve_checkpoint(_followed_run(path), which)
    return path


def point_to_run(pointer: str | os.PathLike, run: str | os.PathLike) -> None:
    """Write a `run` pointer file naming the run folder `run` (relative to the pointer's folder when inside it)."""
    pointer, run = str(pointer), str(run)
    if not io.is_uri(run) and not io.is_uri(pointer):
        folder = os.path.dirname(os.path.abspath(pointer))
        relative = os.path.relpath(os.path.abspath(run), folder)
        run = relative if not relative.startswith("..") else os.path.abspath(run)
    io.atomic_write(pointer, json.dumps({"run": run}))


def _followed_run(pointer: str) -> str:
    """The run folder a `run` pointer file names (a relative name is relative to the pointer's folder)."""
    content = read_pointer(pointer)
    if not content or not content.get("run"):
        raise FileNotFoundError(f'{pointer} is not a run pointer: expected JSON {{"run": "<run folder>"}}')
    run = str(content["run"])
    if io.is_uri(run) or os.path.isabs(run):
        return run
    return io.join(posixpath.dirname(pointer) if io.is_uri(pointer) else os.path.dirname(pointer), run)
