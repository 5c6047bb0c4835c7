"""The Ray Train adapter: `fit` as the `train_loop_per_worker` of a `TorchTrainer`. The only module that touches
Ray Train.

The touchpoints: `ray.train.get_context` (rank, world size), `ray.train.torch.prepare_model` (DDP: NCCL on GPUs,
gloo on CPUs), `ray.train.get_checkpoint` (resume after a failure), `ray.train.report` (metrics + checkpoint).

Data: each worker streams its own share of every epoch through Ray Data (`build_ray_dataset` with the worker's
rank). The epoch order is a pure function of (seed, epoch), so every epoch is reshuffled, and a run resumed from
a mid-epoch checkpoint skips exactly the images trained before it, whatever the number of workers.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ray
import ray.data
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from torch import nn

from ddetr.config import Config
from ddetr.data.coco_eval import CocoEvaluator
from ddetr.data.pipeline import DetrCollateFn, build_ray_dataset
from ddetr.train.engine import NonFiniteLossError
from ddetr.train.local import checkpoint_name, run_dir, transform_config
from ddetr.train.logbook import Logbook
from ddetr.train.loop import fit
from ddetr.train.probes import PROBE_VARS

# Metric reported instead of raising when the loss stops being finite: Ray Train would retry a worker error,
# and a retry resumes from the last checkpoint only to meet the same loss again. `train` turns it back into
# a NonFiniteLossError on the driver.
NONFINITE_KEY = "nonfinite_loss"
# Worker-group start-ups that may fail (e.g. waiting for nodes) before the run gives up; Ray's default retries
# forever, which turns an unschedulable group into a silent hang.
CONTROLLER_FAILURE_LIMIT = 10

log = logging.getLogger(__name__)


class RayRuntime:
    """`fit`'s runtime inside a Ray Train worker."""

    def __init__(self, cfg: Config, resume: str | None) -> None:
        ctx = ray.train.get_context()
        # A progress bar per epoch's dataset would interleave blank lines with the training log.
        ray.data.DataContext.get_current().enable_progress_bars = False
        self.cfg = cfg
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.resume = resume
        self.transforms = transform_config(cfg)
        local = "://" not in cfg.train.storage_path
        # Step metrics go to the run folder when storage is local; with object storage, to the node's disk.
        directory = run_dir(cfg) if local else Path(tempfile.gettempdir()) / "ddetr-runs" / cfg.train.name
        self.logbook = Logbook(directory, enabled=self.rank == 0)
        self._evaluator = CocoEvaluator.from_shards(cfg.data.val) if cfg.data.val else None
        self._restored: tempfile.TemporaryDirectory | None = None
        self._local_dir = run_dir(cfg) if local else None

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return model
        return ray.train.torch.prepare_model(model, move_to_device=False)

    def _batches(self, split: str, train: bool, epoch: int, skip: int) -> Iterable[dict]:
        ds = build_ray_dataset(
            split,
            self.transforms,
            train=train,
            seed=self.cfg.train.seed,
            epoch=epoch,
            skip=skip,
            rank=self.rank,
            world_size=self.world_size,
            num_cpus=self.cfg.data.map_cpus,
        )
        return ds.iter_torch_batches(batch_size=self.cfg.train.batch_size, collate_fn=DetrCollateFn(), drop_last=train)

    def train_batches(self, epoch: int, skip_images: int) -> Iterable[dict]:
        return self._batches(self.cfg.data.train, True, epoch, skip_images)

    def val_batches(self) -> Iterable[dict] | None:
        return self._batches(self.cfg.data.val, False, 0, 0) if self.cfg.data.val else None

    def evaluate(self, predictions: dict[int, dict[str, torch.Tensor]]) -> dict[str, float]:
        return self._evaluator.evaluate(predictions)

    def log_step(self, step: int, metrics: dict[str, Any]) -> None:
        self.logbook.write("step", step, metrics)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if not metrics.get("mid_epoch"):
            self.logbook.write("epoch", int(metrics.get("step", 0)), metrics)
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        # Named by step as in the single-process runtime, so `local.list_checkpoints` reads either run folder.
        name = checkpoint_name(int(metrics.get("step", 0)))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def latest_checkpoint(self) -> Path | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return Path(self.resume) if self.resume else None
        self._restored = tempfile.TemporaryDirectory(prefix="ddetr-restore-")
        return Path(checkpoint.to_directory(self._restored.name))

    def local_run_dir(self) -> Path | None:
        return self._local_dir


def set_torch_threads(cpus_per_worker: float) -> None:
    """One intra-op thread per CPU the worker holds (at least one).

    Ray sets OMP_NUM_THREADS the same way when it starts a worker, but only if the variable is unset, and torch
    reads it once, at import: set the thread count explicitly, so that N workers on N * cpus_per_worker cores
    never run more threads than cores (oversubscribed threads spin in every barrier of every op).
    """
    torch.set_num_threads(max(1, math.floor(cpus_per_worker)))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker: `config` is `Config.to_dict()` plus an optional "resume" path."""
    config = dict(config)
    resume = config.pop("resume", None)
    os.environ.update(config.pop("probes", {}))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = Config.from_dict(config)
    if cfg.train.num_workers > 0:  # with none, this runs in the driver: leave its threads alone
        set_torch_threads(cfg.train.cpus_per_worker)
    runtime = RayRuntime(cfg, resume)
    try:
        fit(cfg, runtime)
    except NonFiniteLossError as err:
        # Every rank raises at the same step (the loss is averaged over workers first), so all of them report.
        ray.train.report({NONFINITE_KEY: str(err)})
    finally:
        runtime.logbook.close()


def build_trainer(
    cfg: Config,
    resume: str | None = None,
    callbacks: list | None = None,
    controller_failure_limit: int = CONTROLLER_FAILURE_LIMIT,
) -> ray.train.torch.TorchTrainer:
    """A `TorchTrainer` for `cfg`: workers, checkpoint retention, failure recovery and the run's storage.

    Running it again with the same `train.storage_path` and `train.name` continues the run from its latest
    checkpoint (Ray Train restores by name); `resume` starts a new run from a checkpoint folder instead.
    `callbacks` go to the `RunConfig` (e.g. Tune's `TuneReportCallback` when the run is a Tune trial).

    A worker that dies or raises costs one of `train.max_failures`; the run then restarts every worker from the
    latest checkpoint Ray registered (a worker killed right after reporting one may leave it unregistered, and
    the run resumes from the one before). `controller_failure_limit` bounds failed worker-group start-ups.
    Test probes (`probes.py`) set in this process's environment are passed on to the workers.
    """
    t = cfg.train
    workers: int | tuple[int, int] = (t.min_workers, t.num_workers) if t.min_workers > 0 else t.num_workers
    # Workers run in a directory of Ray's choosing: relative paths are resolved here, against the caller's.
    config = cfg.to_dict()
    config["data"] = {**config["data"], "train": _absolute(cfg.data.train), "val": _absolute(cfg.data.val)}
    config["train"] = {**config["train"], "storage_path": _absolute(t.storage_path)}
    if resume:
        config["resume"] = str(Path(resume).resolve())
    probes = {k: os.environ[k] for k in PROBE_VARS if os.environ.get(k)}
    if probes:
        config["probes"] = probes
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker},
            elastic_resize_monitor_interval_s=t.elastic_resize_interval_s,
        ),
        run_config=RunConfig(
            name=t.name,
            storage_path=config["train"]["storage_path"],
            checkpoint_config=CheckpointConfig(
                num_to_keep=t.keep_checkpoints, checkpoint_score_attribute="val/AP", checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(
                max_failures=t.max_failures, controller_failure_limit=controller_failure_limit
            ),
            callbacks=callbacks,
        ),
    )


def _absolute(path: str) -> str:
    """A local path made absolute (empty stays empty); URIs as they are."""
    return path if not path or "://" in path else str(Path(path).expanduser().resolve())


def init_local_ray(num_cpus: int | None = None) -> None:
    """Start a quiet local Ray when none is running (the demo and tests); a cluster's address is used if set."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # The dashboard serves the State API that Ray Train's placement-group cleaner polls: without it the cleaner
    # takes a live run for dead, removes its placement group and so kills the workers.
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=True,
        configure_logging=False,
    )
