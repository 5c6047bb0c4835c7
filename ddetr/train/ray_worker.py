"""The worker side of the Ray Train adapter: `fit` as the `train_loop_per_worker` of a `TorchTrainer`.

The touchpoints: `ray.train.get_context` (rank, world size), `ray.train.torch.prepare_model` (DDP: NCCL on GPUs,
gloo on CPUs), `ray.train.get_checkpoint` (resume after a failure), `ray.train.report` (metrics + checkpoint).
The driver side (resources, the `TorchTrainer`, the result) is `ray_train.py`.

Data: each worker streams its own share of every epoch through Ray Data (`build_ray_dataset` with the worker's
rank). The epoch order is a pure function of (seed, epoch), so every epoch is reshuffled, and a run resumed from
a mid-epoch checkpoint skips exactly the images trained before it, whatever the number of workers.

Step callbacks (`callbacks.py`) given to `build_trainer` are pickled to every worker and called by `fit` there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import posixpath
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
from torch import nn

from ddetr import io
from ddetr.config import Config, ConfigError
from ddetr.data.coco_eval import CocoEvaluator
from ddetr.data.pipeline import DetrCollateFn, build_ray_dataset, hide_starvation_notice
from ddetr.data.shards import DataError
from ddetr.data.transforms import TransformConfig
from ddetr.train.callbacks import StepCallback
from ddetr.train.checkpoints import (
    MANIFEST_FILE,
    CorruptCheckpointError,
    checkpoint_names,
    checkpoint_order,
    free_checkpoint_name,
    latest_intact,
    run_dir,
    verify_checkpoint,
)
from ddetr.train.console import same_on_every_rank_once
from ddetr.train.engine import NonFiniteLossError
from ddetr.train.lease import HEARTBEAT_S, STALE_AFTER, RunLease, new_owner
from ddetr.train.logbook import Logbook
from ddetr.train.loop import fit
from ddetr.train.preflight import check_evaluation
from ddetr.train.results import RunResults
from ddetr.train.run_files import rank_zero_log

# Metrics reported instead of raising when the loss stops being finite or the data cannot be read: Ray Train
# would retry a worker error, and a retry resumes from the last checkpoint only to meet the same error again.
# `check_result` turns them back into a NonFiniteLossError / DataError on the driver.
NONFINITE_KEY = "nonfinite_loss"
DATA_ERROR_KEY = "data_error"
SETUP_ERROR_KEY = "setup_error"  # the worker cannot train as configured (a GPU torch cannot see): a ConfigError
# Ray Train keeps in its Result only the metrics of reports that carry a checkpoint: rank 0 also writes the
# error into the run folder, where `check_result` finds it whether or not a checkpoint came before.
RUN_ERROR_FILE = "error.json"

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
        self.transforms = TransformConfig.for_training(cfg.data)
        self.logbook = Logbook(run_dir(cfg.train.storage_path, cfg.train.name), enabled=self.rank == 0)
        self._evaluator = CocoEvaluator.from_shards(cfg.data.val) if cfg.data.val else None
        run = run_dir(cfg.train.storage_path, cfg.train.name)
        self.results = RunResults(cfg, run, self.logbook, self._evaluator, enabled=self.rank == 0)
        self._restored: list[Path] = []  # node copies of checkpoints in object storage, removed at the end
        # Names Ray Train may still hold after a fallback (`_intact_or_older`): new checkpoints go under others.
        self._taken: set[str] = set()

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
            deal_size=self.cfg.train.batch_size,  # each rank reads whole row groups: every image read once
            skip_unreadable=self.cfg.data.skip_unreadable_shards,
        )
        gpu = self.device.type == "cuda"
        return ds.iter_torch_batches(
            batch_size=self.cfg.train.batch_size,
            collate_fn=DetrCollateFn(pin_memory=gpu),
            drop_last=train,
            prefetch_batches=4 if gpu else 1,
        )

    def train_batches(self, epoch: int, skip_images: int) -> Iterable[dict]:
        return self._batches(self.cfg.data.train, True, epoch, skip_images)

    def val_batches(self) -> Iterable[dict] | None:
        return self._batches(self.cfg.data.val, False, 0, 0) if self.cfg.data.val else None

    def evaluate(self, predictions: dict[int, dict[str, torch.Tensor]]) -> dict[str, float]:
        stats = self._evaluator.evaluate(predictions)
        if self.rank == 0:
            self.logbook.write("coco_eval", 0, {"text": self._evaluator.summary_text})
        self.results.evaluated()
        return stats

    def log(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        self.logbook.write(kind, step, metrics)
        self.results.step(kind, step, metrics)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        # Named by step as in the single-process runtime, so `local.list_checkpoints` reads either run folder.
        name = free_checkpoint_name(int(metrics.get("step", 0)), self._taken)
        if not metrics.get("mid_epoch"):
            self.logbook.write("epoch", int(metrics.get("step", 0)), metrics)
            self.results.epoch(metrics, name)  # the evaluation's table and pictures, the tracker (rank 0)
        elif checkpoint_dir is not None:
            self.logbook.flush()
        mode = upload_mode(self.cfg)
        if mode == ray.train.CheckpointUploadMode.SYNC:
            checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
            return
        checkpoint = None
        if checkpoint_dir is not None:
            # The caller removes its folder when this returns, before the upload ends: the files move (a rename, no
            # copy) to a folder of this upload's own, which Ray Train deletes once they are in storage.
            staged = Path(tempfile.mkdtemp(prefix="ddetr-upload-"))
            for entry in Path(checkpoint_dir).iterdir():
                os.replace(entry, staged / entry.name)
            checkpoint = ray.train.Checkpoint.from_directory(str(staged))
        # Every rank reports in the same mode: Ray Train pairs the ranks' reports in order.
        ray.train.report(
            metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=name,
            checkpoint_upload_mode=mode,
            delete_local_checkpoint_after_upload=checkpoint is not None,
        )

    def preemption_deadline(self) -> float | None:
        # A barrier across the workers: every rank calls it once per step, and all get the same answer.
        info = ray.train.get_preemption_info()
        if info is None:
            return None
        if info.deadline_ms is None:  # Ray Train then restarts the attempt this long after it saw the notice
            from ray.train.v2._internal.constants import DEFAULT_PREEMPTION_DEADLINE_S

            return time.time() + DEFAULT_PREEMPTION_DEADLINE_S
        return info.deadline_ms / 1000.0

    def latest_checkpoint(self) -> Path | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:  # a restart, or the run's name again: its latest registered checkpoint
            return self._intact_or_older(checkpoint.path, checkpoint.filesystem)
        if self.resume:  # a new run from a checkpoint folder, local or in object storage (loading verifies it)
            filesystem, source = io.resolve(self.resume)
            return self._local(source, filesystem)
        return None

    def _local(self, path: str, filesystem: pafs.FileSystem) -> Path:
        """A checkpoint folder of `filesystem` as a local folder: itself when local (loading only reads), else the
        node's copy (`node_copy`)."""
        if isinstance(filesystem, pafs.LocalFileSystem):
            return Path(path)
        copy = node_copy(path, filesystem)
        self._restored.append(copy)
        return copy

    def _intact_or_older(self, path: str, filesystem: pafs.FileSystem) -> Path | None:
        """The checkpoint Ray Train registered last when it verifies; else, as the single-process runtime does, the
        newest checkpoint of the run folder that verifies (`latest_intact`), named in the log and the logbook.

        Ray Train would otherwise load the corrupt one on every retry until `max_failures` ends the run. Every rank
        takes the same decision: all verify the same bytes (the run folder, or their node's copy of its objects).
        """
        local = self._local(path, filesystem)
        try:
            verify_checkpoint(local)
            return local
        except CorruptCheckpointError as err:
            reason = str(err)
        failed = posixpath.basename(path.rstrip("/"))
        run = run_dir(self.cfg.train.storage_path, self.cfg.train.name)
        log.warning("%s: the latest checkpoint Ray Train registered cannot be used; looking in %s", reason, run)

        def fetch(uri: str) -> Path:
            fs, inner = io.resolve(uri)
            return self._local(inner, fs)

        chosen = latest_intact(run, fetch=fetch, skip={failed})
        if chosen is None:
            log.warning("%s holds no intact checkpoint besides %s: the run starts from the beginning", run, failed)
        else:
            log.warning("resuming from %s instead of %s, which cannot be used", chosen.name, failed)
        step = checkpoint_order(chosen.name)[0] if chosen is not None else 0
        # Ray Train holds `failed` (and may hold others past `chosen`) and deletes each by its path when it prunes
        # it: the steps this run takes again are written under names of their own (`checkpoints.checkpoint_name`).
        since = checkpoint_order(chosen.name) if chosen is not None else (-1, 0)
        self._taken.update([failed, *(n for n in checkpoint_names(run) if checkpoint_order(n) > since)])
        self.logbook.write("checkpoint_fallback", step, {
            "skipped": failed, "reason": reason, "checkpoint": chosen.name if chosen is not None else ""
        })  # fmt: skip
        return chosen

    def close(self) -> None:
        self.results.close()
        self.logbook.close()
        # The node's copies go with its local rank 0 (every rank of the node loaded them when it started).
        if ray.train.get_context().get_local_rank() == 0:
            for copy in self._restored:
                shutil.rmtree(copy.parent, ignore_errors=True)


def node_copy(path: str, filesystem: pafs.FileSystem) -> Path:
    """A local copy of the checkpoint folder `path` of `filesystem`, downloaded once per node.

    The ranks of a node share it: the first to take the node's lock downloads into a temporary name (in large
    pieces: each piece is a request to the store; transient errors retried, `io.retried`) and renames it into
    place; the others find it there. The copy is known by the folder's path and its manifest, so a checkpoint
    written again under the same name (a run resumed from an older one reaches that step again) is downloaded again.

    Returns:
        `<temp>/ddetr-restore/<key>/<the folder's name>` (remove its parent when done).
    """

    def read_manifest() -> bytes:
        try:
            with filesystem.open_input_stream(posixpath.join(path, MANIFEST_FILE)) as f:
                return f.read()
        except FileNotFoundError:  # verify_checkpoint names what is missing
            return b""

    manifest = io.retried(f"reading {path}/{MANIFEST_FILE}", read_manifest)
    key = hashlib.sha1(f"{filesystem.type_name}:{path}:".encode() + manifest).hexdigest()[:16]
    folder = Path(tempfile.gettempdir(), "ddetr-restore", key)
    name = posixpath.basename(path.rstrip("/"))  # kept, so that logs and fallbacks name the checkpoint
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / name).is_dir():  # (a folder left without it: its copy was removed)
            tmp = folder.with_name(f"{key}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / name).mkdir(parents=True)
            log.info("downloading checkpoint %s", path)
            io.retried(
                f"downloading checkpoint {path}",
                lambda: pafs.copy_files(path, str(tmp / name), source_filesystem=filesystem, chunk_size=io.COPY_CHUNK),
            )
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
    return folder / name


def upload_mode(cfg: Config) -> ray.train.CheckpointUploadMode:
    """How checkpoints go to the run's storage (`train.checkpoint_upload`; "auto": asynchronous to object storage,
    where rank 0's upload would otherwise hold every rank for seconds, synchronous to a local folder)."""
    mode = cfg.train.checkpoint_upload
    if mode == "async" or (mode == "auto" and io.is_uri(cfg.train.storage_path)):
        return ray.train.CheckpointUploadMode.ASYNC
    return ray.train.CheckpointUploadMode.SYNC


def verbose() -> bool:
    """Whether Ray's own progress and reports reach the console (`ddetr -v` sets DDETR_VERBOSE=1)."""
    return os.environ.get("DDETR_VERBOSE", "0") not in ("", "0")


def quiet_worker_logs(rank: int, watchdog: bool = True) -> None:
    """Rank 0 tells the run's progress; the other ranks, and libraries printing to stdout, speak only in warnings.

    Ray Train turns a worker's `print` into an INFO record of the root logger: with the root at WARNING, what
    pycocotools and others print is dropped, while the "ddetr" loggers keep their INFO on rank 0. At the default
    verbosity, warnings every rank makes alike are said by rank 0 alone, and, when the data `watchdog` is on, Ray
    Data's "may hang forever" notice stays off the console (`console.py`).
    """
    logging.basicConfig(level=logging.INFO if verbose() else logging.WARNING, format="%(message)s", force=True)
    logging.getLogger("ddetr").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if not verbose():
        # Ray Data announces every epoch's dataset, and warns that its progress bars are off, as we asked.
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        same_on_every_rank_once(rank)
        if watchdog:
            hide_starvation_notice()


def set_torch_threads(cpus_per_worker: float) -> None:
    """One intra-op thread per CPU the worker holds (at least one).

    Ray sets OMP_NUM_THREADS the same way when it starts a worker, but only if the variable is unset, and torch
    reads it once, at import: set the thread count explicitly, so that N workers on N * cpus_per_worker cores
    never run more threads than cores (oversubscribed threads spin in every barrier of every op).
    """
    torch.set_num_threads(max(1, math.floor(cpus_per_worker)))


class WorkerLoop:
    """Ray Train's entry point on every worker, called with `Config.to_dict()` plus an optional "resume" path.

    It holds the step callbacks, which reach the workers pickled with it, and the owner id of the run folder's lease,
    made once on the driver: every attempt of the run carries the same one, so a restarted attempt's rank 0 takes the
    lease back (`lease.py`).
    """

    def __init__(self, callbacks: Sequence[StepCallback] = ()) -> None:
        self.callbacks = tuple(callbacks)
        self.lease_owner = new_owner()

    def __call__(self, config: dict[str, Any]) -> None:
        config = dict(config)
        resume = config.pop("resume", None)
        cfg = Config.from_dict(config)
        ctx = ray.train.get_context()
        quiet_worker_logs(ctx.get_world_rank(), watchdog=cfg.data.watchdog_s > 0)
        if cfg.train.num_workers > 0:  # with none, this runs in the driver: leave its threads alone
            set_torch_threads(cfg.train.cpus_per_worker)
        run = run_dir(cfg.train.storage_path, cfg.train.name)
        error_file = io.join(run, RUN_ERROR_FILE)
        lease = None
        run_log = contextlib.ExitStack()
        if ctx.get_world_rank() == 0:
            # Rank 0's console lines also go to the run folder's log.txt, which the driver's logging cannot fill on
            # its own (run_files.py). After quiet_worker_logs, which replaces the root logger's handlers.
            run_log.enter_context(rank_zero_log(run))
            # Before rank 0 writes in the run folder. Another launch's lease is waited for until it is stale (a
            # sweep's trial restarted while its last attempt's rank 0, on another node, was just lost), then refused.
            # The refusal is raised, not reported: it must not write its error into another run's folder.
            lease = RunLease.acquire(run, self.lease_owner, wait_s=STALE_AFTER * HEARTBEAT_S)
            if io.exists(error_file):
                io.remove(error_file)  # an earlier attempt's: this one starts afresh
        runtime = None
        try:
            check_cuda(cfg)
            # The driver's preflight checked its own installation; a worker on another image may lack pycocotools.
            # Every rank checks before its first collective, and the run ends instead of being retried.
            check_evaluation(cfg)
            runtime = RayRuntime(cfg, resume)
            fit(cfg, runtime, self.callbacks)
        except (NonFiniteLossError, DataError, ConfigError) as err:
            # Deterministic, so a restart would only meet it again: end the run instead of raising. A non-finite
            # loss is met by every rank at the same step (it is averaged over the workers first); a data error by
            # every rank at the same collective (`loop.py`); a worker without CUDA by every worker of its node type.
            key = SETUP_ERROR_KEY
            if isinstance(err, DataError):
                key = DATA_ERROR_KEY
            elif isinstance(err, NonFiniteLossError):
                key = NONFINITE_KEY
            if ctx.get_world_rank() == 0:
                io.atomic_write(error_file, json.dumps({key: str(err)}))
            ray.train.report({key: str(err)})
        finally:
            if runtime is not None:
                runtime.close()
            run_log.close()
            if lease is not None:
                lease.release()


def check_cuda(cfg: Config) -> None:
    """Refuse to train on the CPUs of a worker that Ray gave a GPU (a CPU-only torch on GPU nodes, a broken driver):
    the run would look healthy and be ten times slower."""
    if cfg.train.use_gpu == "true" and not torch.cuda.is_available():
        raise ConfigError(
            no_cuda_message(torch.__version__, torch.version.cuda, os.environ.get("CUDA_VISIBLE_DEVICES"))
        )


def no_cuda_message(torch_version: str, cuda_version: str | None, visible: str | None) -> str:
    """The one line for a worker given a GPU whose torch sees no CUDA device (also used by the driver's probe)."""
    build = f"a CUDA {cuda_version} build" if cuda_version else "a CPU-only build"
    return (
        f"a training worker was given a GPU, but torch sees no CUDA device (torch {torch_version}, {build}; "
        f"CUDA_VISIBLE_DEVICES={visible or ''}): install a CUDA build of torch on the GPU nodes (make TORCH=torch), "
        "or train on CPUs with train.use_gpu=false"
    )
