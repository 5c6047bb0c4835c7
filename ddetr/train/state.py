"""Training state on disk: one `state.pt` per checkpoint directory, written under a temporary name first.

A checkpoint holds everything a run needs to continue exactly where it stopped: model, optimizer, scheduler,
grad scaler, epoch, global step, the data position within the epoch, the config and the last metrics.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"


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


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    state: TrainState,
    config: dict,
) -> Path:
    """Write `directory/state.pt` atomically (temporary file, fsync, rename), and the metrics beside it as JSON.

    Returns the state file's path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "state": vars(state).copy(),
        "config": config,
    }
    path = directory / STATE_FILE
    tmp = path.with_suffix(".pt.tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    metrics = {k: v for k, v in state.metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    (directory / METRICS_FILE).write_text(json.dumps({"epoch": state.epoch, "step": state.step, **metrics}))
    return path


def checkpoint_score(directory: str | os.PathLike) -> float:
    """Validation AP recorded beside a checkpoint, or -1 when it was not evaluated."""
    path = Path(directory) / METRICS_FILE
    if not path.exists():
        return -1.0
    return float(json.loads(path.read_text()).get("val/AP", -1.0))


def load_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint` (a directory or the state file itself).

    Returns:
        dict with keys model, optimizer, scheduler, scaler, state (a TrainState), config.
    """
    path = Path(directory)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: expected a directory holding {STATE_FILE} or the file")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    payload["state"] = TrainState(**payload["state"])
    return payload
