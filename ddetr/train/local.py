"""The single-process runtime: a torch DataLoader, checkpoints in a run folder, no Ray.

It is the debugging path, and the path on a machine without Ray (e.g. a single GPU box).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddetr import io
from ddetr.config import Config, ConfigError, named
from ddetr.data.coco_eval import CocoEvaluator
from ddetr.data.loader import build_dataloader
from ddetr.data.transforms import TransformConfig
from ddetr.train.checkpoints import (
    BEST,
    checkpoint_name,
    checkpoint_score,
    fetch_checkpoint,
    latest_intact,
    list_checkpoints,
    pointer_target,
    run_dir,
    update_pointers,
)
from ddetr.train.lease import RunLease
from ddetr.train.logbook import Logbook

log = logging.getLogger(__name__)


class LocalRuntime:
    """`fit`'s runtime for one process on one device.

    Checkpoints go to `run_dir/checkpoint_<step>`: written in a temporary folder and renamed into place, then the
    run's `best` and `latest` pointers are updated; the best `keep_checkpoints` by validation AP, the latest and the
    one `best` names are kept. A run restarted with the same storage path and
    name continues from its latest intact checkpoint; `resume` names another checkpoint to start from instead.
    """

    def __init__(self, cfg: Config, device: str | torch.device | None = None, resume: str | None = None) -> None:
        cfg = named(cfg)
        self.cfg = cfg
        self.rank, self.world_size = 0, 1
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if io.is_uri(cfg.train.storage_path):
            raise ConfigError(
                f"train.storage_path={cfg.train.storage_path}: the local engine keeps its run folder on this machine; "
                "train with --engine ray to store the run in object storage, or give a local folder"
            )
        self.dir = Path(run_dir(cfg.train.storage_path, cfg.train.name))
        self.dir.mkdir(parents=True, exist_ok=True)
        # Taken before anything is written there, held until `close`: a second live run on the folder is refused.
        self.lease = RunLease.acquire(str(self.dir))
        try:
            self.resume = resume
            self.logbook = Logbook(self.dir)
            self.transforms = TransformConfig.for_training(cfg.data)
            self._evaluator = CocoEvaluator.from_shards(cfg.data.val) if cfg.data.val else None
        except BaseException:
            self.lease.release()
            raise

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
            skip_unreadable=self.cfg.data.skip_unreadable_shards,
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
        stats = self._evaluator.evaluate(predictions)
        self.logbook.write("coco_eval", 0, {"text": self._evaluator.summary_text})
        return stats

    def log(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        self.logbook.write(kind, step, metrics)

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
        update_pointers(str(self.dir), final.name, metrics)
        self._prune()

    def _prune(self) -> None:
        checkpoints = list_checkpoints(self.dir)
        latest = checkpoints[-1] if checkpoints else None
        ranked = sorted(checkpoints, key=lambda p: (checkpoint_score(p), p.name), reverse=True)
        best = pointer_target(str(self.dir), BEST)  # what `ddetr eval/predict/serve RUN_DIR` load: never pruned
        keep = set(ranked[: self.cfg.train.keep_checkpoints]) | {latest} | ({Path(best)} if best else set())
        for p in checkpoints:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def preemption_deadline(self) -> float | None:
        return None  # one process on its own machine: nothing announces a preemption

    def latest_checkpoint(self) -> Path | None:
        if self.resume:
            self._downloads = tempfile.TemporaryDirectory(prefix="ddetr-resume-")
            return fetch_checkpoint(self.resume, self._downloads.name)
        return latest_intact(self.dir)

    def close(self) -> None:
        try:
            self.logbook.close()
        finally:
            self.lease.release()
