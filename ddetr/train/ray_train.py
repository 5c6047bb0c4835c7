"""The driver side of the Ray Train adapter: the resources a run asks for, its `TorchTrainer`, its result.

`build_trainer` decides GPUs, workers and CPUs from what the cluster can become (`resources.py`), checks on one GPU
node that torch sees a CUDA device there before any training worker starts, and runs `ray_worker.WorkerLoop` on
every worker; `check_result` turns what a run reported into the driver's error or metrics.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from collections.abc import Sequence
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

from ddetr import io, ray_session
from ddetr.cluster import Capacity, capacity
from ddetr.config import Config, ConfigError, named
from ddetr.data.shards import DataError
from ddetr.train.callbacks import StepCallback
from ddetr.train.checkpoints import run_dir, update_pointers
from ddetr.train.console import quiet_forwarded_lines
from ddetr.train.engine import NonFiniteLossError
from ddetr.train.ray_worker import (  # noqa: F401 - re-exported: the adapter's public names live here
    DATA_ERROR_KEY,
    NONFINITE_KEY,
    RUN_ERROR_FILE,
    SETUP_ERROR_KEY,
    WorkerLoop,
    no_cuda_message,
    node_copy,
    upload_mode,
    verbose,
)
from ddetr.train.resources import check_fits, describe, resolve_resources

log = logging.getLogger(__name__)


def plan_run(cfg: Config, cap: Capacity | None = None) -> Config:
    """`cfg` with its resources decided for the connected cluster (`resources.py`), checked to fit, and, for GPU
    workers, checked on one GPU node that torch sees a CUDA device: every mistake found before a worker starts.

    Raises:
        ConfigError: the run cannot fit the cluster, or a GPU node's torch sees no CUDA device.
    """
    cap = capacity() if cap is None else cap
    cfg = resolve_resources(named(cfg), cap)
    check_fits(cfg, cap)
    log.info("resources: %s", describe(cfg, cap))
    if cfg.train.use_gpu == "true" and cfg.train.num_workers > 0:
        probe_cuda(cfg.train.worker_start_timeout_s * max(1, cfg.train.controller_failure_limit))
    return cfg


@ray.remote(num_cpus=0, num_gpus=1, max_retries=0)
def _cuda_on_gpu_node() -> tuple[bool, str, str | None, str | None]:
    import torch

    return torch.cuda.is_available(), torch.__version__, torch.version.cuda, os.environ.get("CUDA_VISIBLE_DEVICES")


def probe_cuda(timeout_s: float) -> None:
    """Run a task holding one GPU (an autoscaler adds a GPU node for it) and refuse the run when torch sees no CUDA
    device there: the training workers would otherwise fail to set up NCCL, and be retried, or train on CPUs."""
    ref = _cuda_on_gpu_node.remote()
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        ray.cancel(ref, force=True)
        raise ConfigError(
            f"no GPU became available within {timeout_s:g} s (train.worker_start_timeout_s x "
            "train.controller_failure_limit): check the cluster's GPU node types and quotas, or train.use_gpu=false"
        )
    available, version, cuda, visible = ray.get(ref)
    if not available:
        raise ConfigError(no_cuda_message(version, cuda, visible))


class RunPointers(ray.train.UserCallback):
    """Keep the run folder's `best` and `latest` pointers (`checkpoints.update_pointers`) on Ray Train's controller,
    after each checkpoint is in storage (also when rank 0 uploads it asynchronously)."""

    def __init__(self, run: str) -> None:
        self.run = run

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if checkpoint is not None:
            update_pointers(self.run, posixpath.basename(checkpoint.path.rstrip("/")), metrics[0])


def pin_data_stats_actor() -> None:
    """Create Ray Data's stats actor on this (the driver's) node before any training worker reads data.

    The actor is detached and lives on the node of the process that first runs a dataset: made by a training
    worker, it keeps that worker node busy for as long as the cluster lives, so the autoscaler never removes the
    node when the run ends. Made here (the head, for a submitted job or a sweep trial), the workers find it by name.
    """
    try:
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:  # a Ray that moved it: its node then outlives the run, as without this
        log.debug("Ray Data's stats actor is not where this Ray version was expected to keep it")
        return
    get_or_create_stats_actor()


def build_trainer(
    cfg: Config,
    resume: str | None = None,
    run_callbacks: list | None = None,
    step_callbacks: Sequence[StepCallback] = (),
) -> ray.train.torch.TorchTrainer:
    """A `TorchTrainer` for `cfg`: workers, checkpoint retention, failure recovery and the run's storage.

    Running it again with the same `train.storage_path` and `train.name` continues the run from its latest
    checkpoint (Ray Train restores by name); `resume` starts a new run from a checkpoint folder instead.
    `run_callbacks` go to the `RunConfig` (e.g. Tune's `TuneReportCallback` when the run is a Tune trial);
    `step_callbacks` to `fit` on every worker. GPUs, workers and CPUs per worker are resolved against what the
    connected cluster can become (`resources.resolve_resources`; `plan_run` also checks them, before this).

    A worker that dies or raises costs one of `train.max_failures`; a node preemption (spot reclaim, drain) one
    of `train.max_preemption_failures` instead. The run then restarts every worker from the latest checkpoint Ray
    registered (a worker killed right after reporting one may leave it unregistered, and the run resumes from the
    one before). `train.controller_failure_limit` bounds failed worker-group start-ups, each waiting
    `train.worker_start_timeout_s` for its resources.
    """
    cfg = resolve_resources(named(cfg), capacity())
    t = cfg.train
    workers: int | tuple[int, int] = (t.min_workers, t.num_workers) if t.min_workers > 0 else t.num_workers
    # Workers run in a directory of Ray's choosing: relative paths are resolved here, against the caller's.
    config = cfg.to_dict()
    config["data"] = {**config["data"], "train": io.absolute(cfg.data.train), "val": io.absolute(cfg.data.val)}
    config["train"] = {**config["train"], "storage_path": io.absolute(t.storage_path)}
    if resume:
        config["resume"] = io.absolute(resume)
    # Read by Ray Train's controller from the driver's environment when the run starts.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(t.worker_start_timeout_s)
    pin_data_stats_actor()
    if not verbose():
        quiet_forwarded_lines()  # Ray's harmless error lines stay off this driver's console (console.py)
    return ray.train.torch.TorchTrainer(
        WorkerLoop(step_callbacks),
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=t.use_gpu == "true",
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
                max_failures=t.max_failures,
                controller_failure_limit=t.controller_failure_limit,
                max_preemption_failures=t.max_preemption_failures,
            ),
            callbacks=[RunPointers(run_dir(config["train"]["storage_path"], t.name)), *(run_callbacks or [])],
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
    )


def check_result(result: ray.train.Result) -> dict[str, Any]:
    """The metrics of a finished `TorchTrainer.fit()`; its error raised: a non-finite loss as NonFiniteLossError,
    unreadable data as DataError, a worker that cannot train as configured as ConfigError."""
    if result.error is not None:
        raise result.error
    metrics = dict(result.metrics or {})
    error_file = io.join(str(result.path), RUN_ERROR_FILE) if result.path else ""
    if error_file and io.exists(error_file):
        metrics.update(json.loads(io.read_text(error_file)))
    if NONFINITE_KEY in metrics:
        raise NonFiniteLossError(
            f"{metrics[NONFINITE_KEY]}; the run stopped, its last good checkpoint is {result.checkpoint}"
        )
    if DATA_ERROR_KEY in metrics:
        raise DataError(metrics[DATA_ERROR_KEY])
    if SETUP_ERROR_KEY in metrics:
        raise ConfigError(metrics[SETUP_ERROR_KEY])
    return metrics


def init_local_ray(num_cpus: int | None = None) -> bool:
    """Start a quiet local Ray when none is running (the demo and tests); a cluster's address is used if set.

    Returns True when this call started a local Ray (one that cannot add nodes). `ddetr.ray_session.start_or_join`
    with the workers' output forwarded to the driver's console (`console.quiet_forwarded_lines` filters it).
    """
    return ray_session.start_or_join(num_cpus, log_to_driver=True)
