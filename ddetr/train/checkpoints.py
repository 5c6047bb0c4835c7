"""Checkpoints on disk, for both runtimes: what one holds, how it is named, written, verified and found.

A run folder (`train.storage_path / train.name`) holds `checkpoint_<step>` folders, each with:

    state.pt            model, optimizer, scheduler, grad scaler, TrainState, config, dataset categories
    metrics.json        the checkpoint's metrics (val/AP ranks checkpoints), small and readable
    config.json         the run's Config, readable without loading the state
    manifest.json       size and sha256 of state.pt: a copy cut short (a node lost mid-write) is detected

The single-process runtime writes these folders itself (a temporary name, renamed into place); under Ray Train,
`ray.train.report` uploads the same folder under the same name, so either run folder reads the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ddetr import io
from ddetr.config import Config, ConfigError

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
CHECKPOINT_METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
# Model settings that do not change the architecture: a run may continue with other values of these.
NOT_ARCHITECTURE = ("init_from", "pretrained_backbone", "msda_backend", "checkpoint_encoder")
MANIFEST_FILE = "manifest.json"
CHECKPOINT_PREFIX = "checkpoint_"
_CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}\d{{8}}")  # not "<name>.tmp", a copy cut short


class CorruptCheckpointError(RuntimeError):
    """A checkpoint whose state file is missing, of the wrong size or checksum, or unreadable."""


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


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint taken after optimizer step `step`."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def run_dir(storage_path: str, name: str) -> str:
    """The run folder `storage_path/name`: an absolute local path, or a URI."""
    return io.join(io.absolute(storage_path), name)


def save_checkpoint(directory: str | os.PathLike, payload: dict[str, Any], metrics: dict[str, Any]) -> Path:
    """Write `payload` (see the module docstring) as `directory/state.pt`, then its metrics and manifest.

    The state file is written atomically; the manifest last, so a folder with a manifest is complete.
    Returns the state file's path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STATE_FILE
    with open(path.with_suffix(".pt.tmp"), "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path.with_suffix(".pt.tmp"), path)
    finite = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    io.atomic_write(directory / CHECKPOINT_METRICS_FILE, json.dumps(finite))
    io.atomic_write(directory / CONFIG_FILE, json.dumps(payload["config"], indent=1, sort_keys=True))
    manifest = {STATE_FILE: {"size": path.stat().st_size, "sha256": _sha256(path)}}
    io.atomic_write(directory / MANIFEST_FILE, json.dumps(manifest))
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checkpoint(directory: str | os.PathLike) -> None:
    """Raise CorruptCheckpointError naming the file when `directory`'s state file does not match its manifest.

    Checkpoints written before manifests existed pass when their state file exists.
    """
    directory = Path(directory)
    path = directory / STATE_FILE
    if not path.exists():
        raise CorruptCheckpointError(f"checkpoint {directory}: {STATE_FILE} is missing")
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.exists():
        return
    expected = json.loads(manifest_path.read_text())[STATE_FILE]
    size = path.stat().st_size
    if size != expected["size"]:
        raise CorruptCheckpointError(
            f"checkpoint {path} is incomplete: {size} bytes where its manifest records {expected['size']}"
        )
    if _sha256(path) != expected["sha256"]:
        raise CorruptCheckpointError(f"checkpoint {path} does not match the checksum its manifest records")


def load_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint` (a directory or the state file itself).

    Returns:
        dict with keys model, optimizer, scheduler, scaler, state (a TrainState), config, and optionally
        categories and ema.

    Raises:
        FileNotFoundError: nothing there. CorruptCheckpointError: incomplete or unreadable, naming the file.
    """
    path = Path(directory)
    if path.is_dir():
        verify_checkpoint(path)
        path = path / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: expected a directory holding {STATE_FILE} or the file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError) as err:  # torch reports a truncated zip as a RuntimeError
        raise CorruptCheckpointError(f"checkpoint {path} cannot be read ({err})") from err
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
    """Validation AP recorded beside a checkpoint, or -1 when it was not evaluated."""
    path = Path(directory) / CHECKPOINT_METRICS_FILE
    if not path.exists():
        return -1.0
    return float(json.loads(path.read_text()).get("val/AP", -1.0))


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoints of a local run folder, oldest first (those whose state file exists; see `latest_intact`)."""
    directory = Path(directory)
    found = [
        p
        for p in directory.glob(f"{CHECKPOINT_PREFIX}*")
        if _CHECKPOINT_NAME.fullmatch(p.name) and (p / STATE_FILE).exists()
    ]
    return sorted(found, key=lambda p: p.name)


def latest_intact(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint of a run folder that verifies; each newer one that does not is named in a warning."""
    skipped: list[str] = []
    for candidate in reversed(list_checkpoints(directory)):
        try:
            verify_checkpoint(candidate)
        except CorruptCheckpointError as err:
            log.warning("%s; trying the checkpoint before it", err)
            skipped.append(candidate.name)
            continue
        if skipped:
            log.warning("resuming from %s instead of the newer %s, which cannot be used", candidate, ", ".join(skipped))
        return candidate
    return None


def check_continuation(cfg: Config) -> None:
    """Refuse to continue a run folder whose checkpoints hold another model (a reused `train.name`).

    Raises:
        ConfigError: naming the folder and every differing model key.
    """
    run = run_dir(cfg.train.storage_path, cfg.train.name)
    if io.is_uri(run):
        return
    latest = latest_intact(run)
    if latest is None or not (latest / CONFIG_FILE).exists():
        return
    saved = Config.from_dict(json.loads((latest / CONFIG_FILE).read_text())).model
    differing = [
        f"model.{f.name} {getattr(saved, f.name)!r} -> {getattr(cfg.model, f.name)!r}"
        for f in dataclasses.fields(saved)
        if f.name not in NOT_ARCHITECTURE and getattr(saved, f.name) != getattr(cfg.model, f.name)
    ]
    if differing:
        raise ConfigError(
            f"run {run} holds checkpoints of another model ({', '.join(differing)}): choose another train.name "
            "(the default is a new one each time), or --resume one of its checkpoints to start a new run from it"
        )
