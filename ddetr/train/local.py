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
    CorruptCheckpointError,
    checkpoint_name,
    checkpoint_score,
    fetch_checkpoint,
    latest_intact,
    list_checkpoints,
    pointer_target,
    run_dir,
    update_pointers,
    verify_local,
)
from ddetr.train.lease import RunLease
from ddetr.train.logbook import Logbook
from ddetr.train.results import RunResults

log = logging.getLogger(__name__)


class LocalRuntime:
    """`fit`'s runtime for one process on one device.

    Checkpoints go to `run_dir/checkpoint_<step>` (`place_checkpoint`: durably, and verified in place), then the
    run's `best` and `latest` pointers are updated and older checkpoints pruned (`prune_checkpoints`: the best
    `keep_checkpoints` by validation AP, the newest intact one and the one `best` names are kept). A run restarted
    with the same storage path and name continues from its latest intact checkpoint; `resume` names another
    checkpoint to start from instead.
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
            self.results = RunResults(cfg, str(self.dir), self.logbook, self._evaluator, enabled=True)
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
        self.results.evaluated()
        return stats

    def log(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        self.logbook.write(kind, step, metrics)
        self.results.step(kind, step, metrics)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if not metrics.get("mid_epoch"):  # a mid-epoch checkpoint's metrics are its step's, logged already
            self.logbook.write("epoch", int(metrics.get("step", 0)), metrics)
            self.results.epoch(metrics)  # the evaluation's table and pictures, the tracker
        if checkpoint_dir is None:
            return
        final = place_checkpoint(checkpoint_dir, self.dir, checkpoint_name(int(metrics.get("step", 0))))
        update_pointers(str(self.dir), final.name, metrics)
        prune_checkpoints(self.dir, self.cfg.train.keep_checkpoints, fresh=final)

    def preemption_deadline(self) -> float | None:
        return None  # one process on its own machine: nothing announces a preemption

    def latest_checkpoint(self) -> Path | None:
        if self.resume:
            self._downloads = tempfile.TemporaryDirectory(prefix="ddetr-resume-")
            return fetch_checkpoint(self.resume, self._downloads.name)
        return latest_intact(self.dir)

    def close(self) -> None:
        try:
            self.results.close()
            self.logbook.close()
        finally:
            self.lease.release()


def place_checkpoint(source: str | os.PathLike, run_dir: str | os.PathLike, name: str) -> Path:
    """Copy the checkpoint folder `source` into a local run folder as `name`, durably, and check it there.

    The copy goes to `name.tmp`; its files and folder are fsync'ed, it is renamed to `name` and the run folder is
    fsync'ed, so that after a power loss the run folder holds the whole new checkpoint under its name or none of it.
    Only then may older checkpoints be pruned (`prune_checkpoints`).

    Raises:
        CorruptCheckpointError: the copy in place does not match its manifest (a failing disk).
    """
    final = Path(run_dir, name)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    io.fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)  # the same step written again (e.g. after a fallback resume)
    os.replace(tmp, final)
    io.fsync_dir(final.parent)
    try:
        verify_local(final)
    except CorruptCheckpointError as err:
        raise CorruptCheckpointError(f"{err}, right after it was copied there from {source}: check that disk") from err
    return final


def prune_checkpoints(run_dir: str | os.PathLike, keep: int, fresh: Path | None = None) -> list[Path]:
    """Delete the checkpoints of a local run folder that it need not keep; returns those deleted.

    Kept: `fresh` (the checkpoint just written: a run resumed from an older checkpoint writes below newer ones), the
    newest intact checkpoint, the `keep` intact ones of the highest val/AP (ties: the newer), and the one the run's
    `best` pointer names (what `ddetr eval/predict/serve RUN_DIR` load). "Intact" is `verify_local`: a
    checkpoint that fails it is neither the latest nor ranked, and it is not deleted either: the prune deletes only
    checkpoints it has verified. A corrupt one newer than the newest intact is replaced when the resumed run writes
    that step again.
    """
    checkpoints = list_checkpoints(run_dir)
    intact = []
    for p in checkpoints:
        try:
            verify_local(p)
        except CorruptCheckpointError:
            continue
        intact.append(p)
    if not intact:
        return []
    ranked = sorted(intact, key=lambda p: (checkpoint_score(p), p.name), reverse=True)
    best = pointer_target(str(run_dir), BEST)
    kept = set(ranked[:keep]) | {intact[-1], fresh} | ({Path(best)} if best else set())
    pruned = [p for p in intact if p not in kept]
    for p in pruned:
        shutil.rmtree(p, ignore_errors=True)
    return pruned
