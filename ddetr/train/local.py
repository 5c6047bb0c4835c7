"""The single-process runtime: a torch DataLoader, checkpoints in a run folder, no Ray.

It is the debugging path, and the path on a machine without Ray (e.g. a single GPU box).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddetr.config import Config
from ddetr.data.coco_eval import CocoEvaluator
from ddetr.data.loader import build_dataloader
from ddetr.data.transforms import TransformConfig
from ddetr.train.logbook import Logbook
from ddetr.train.state import STATE_FILE, checkpoint_score

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint_"
_CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}\d{{8}}")  # not "<name>.tmp", a copy cut short


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint taken after optimizer step `step`."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def run_dir(cfg: Config) -> Path:
    """`train.storage_path / train.name`, made absolute."""
    return Path(cfg.train.storage_path).expanduser().resolve() / cfg.train.name


def transform_config(cfg: Config) -> TransformConfig:
    return TransformConfig().scaled(cfg.data.scale) if cfg.data.scale != 1.0 else TransformConfig()


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first (a checkpoint is complete once its state file exists)."""
    found = [
        p
        for p in directory.glob(f"{CHECKPOINT_PREFIX}*")
        if _CHECKPOINT_NAME.fullmatch(p.name) and (p / STATE_FILE).exists()
    ]
    return sorted(found, key=lambda p: p.name)


class LocalRuntime:
    """`fit`'s runtime for one process on one device.

    Checkpoints go to `run_dir/checkpoint_<step>`: written in a temporary folder and renamed into place; the best
    `keep_checkpoints` by validation AP and the latest are kept. A run restarted with the same storage path and
    name continues from its latest checkpoint; `resume` names another checkpoint to start from instead.
    """

    def __init__(self, cfg: Config, device: str | torch.device | None = None, resume: str | None = None) -> None:
        self.cfg = cfg
        self.rank, self.world_size = 0, 1
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dir = run_dir(cfg)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.resume = resume
        self.logbook = Logbook(self.dir)
        self.transforms = transform_config(cfg)
        self._evaluator = CocoEvaluator.from_shards(cfg.data.val) if cfg.data.val else None

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def train_batches(self, epoch: int, skip_images: int) -> Iterable[dict]:
        return build_dataloader(
            self.cfg.data.train,
            self.transforms,
            train=True,
            batch_size=self.cfg.train.batch_size,
            seed=self.cfg.train.seed,
            epoch=epoch,
            skip=skip_images,
            num_workers=self.cfg.data.loader_workers,
        )

    def val_batches(self) -> Iterable[dict] | None:
        if not self.cfg.data.val:
            return None
        return build_dataloader(
            self.cfg.data.val,
            self.transforms,
            train=False,
            batch_size=self.cfg.train.batch_size,
            num_workers=self.cfg.data.loader_workers,
        )

    def evaluate(self, predictions: dict[int, dict[str, torch.Tensor]]) -> dict[str, float]:
        return self._evaluator.evaluate(predictions)

    def log_step(self, step: int, metrics: dict[str, Any]) -> None:
        self.logbook.write("step", step, metrics)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if not metrics.get("mid_epoch"):  # a mid-epoch checkpoint's metrics are its step's, logged already
            self.logbook.write("epoch", int(metrics.get("step", 0)), metrics)
        if checkpoint_dir is None:
            return
        final = self.dir / checkpoint_name(int(metrics.get("step", 0)))
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoint_dir, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self._prune()

    def _prune(self) -> None:
        checkpoints = list_checkpoints(self.dir)
        latest = checkpoints[-1] if checkpoints else None
        ranked = sorted(checkpoints, key=lambda p: (checkpoint_score(p), p.name), reverse=True)
        keep = set(ranked[: self.cfg.train.keep_checkpoints]) | {latest}
        for p in checkpoints:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        if self.resume:
            return Path(self.resume)
        checkpoints = list_checkpoints(self.dir)
        return checkpoints[-1] if checkpoints else None

    def local_run_dir(self) -> Path | None:
        return self.dir

    def close(self) -> None:
        self.logbook.close()
