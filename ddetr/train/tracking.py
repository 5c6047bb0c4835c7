"""Experiment tracking: a run's config, metrics, pictures and best checkpoint sent to MLflow or Weights & Biases.

`train.tracker=mlflow|wandb` (`train.tracker_uri`, `train.tracker_project`); the tracked run is named `train.name`
(a sweep's trials are named by trial id, so a sweep makes one tracked run per trial). Only rank 0 tracks, through
the plain clients (`mlflow.MlflowClient`, `wandb.init`), on both engines: the single-process engine runs without Ray,
and inside Ray Train the clients are what Ray's `setup_mlflow` / `setup_wandb` would hand rank 0 anyway.

A run folder remembers its tracked run in `tracking.json`, so a run restarted or resumed under the same name (a Ray
worker failure, `ddetr train` again) continues the same tracked run instead of starting a second one.

A tracker that cannot start (client missing, bad URI, no login) stops the run before training, as a ConfigError;
once started, a failing call is logged as a warning and training goes on: the run folder holds the record anyway.
"""

from __future__ import annotations

import io as _io
import json
import logging
import math
import os
import re
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ddetr import io
from ddetr.config import Config, ConfigError

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"  # in the run folder: {"tracker", "uri", "run_id"} of the tracked run
DEFAULT_PROJECT = "ddetr"
_MLFLOW_BATCH = 100  # MLflow takes at most 100 params per log_batch request
_MLFLOW_NAME = re.compile(r"[^\w\-. :/]")  # what MLflow refuses in a metric name (a class name may hold it)


def flat_config(cfg: Config) -> dict[str, Any]:
    """{"section.key": value} of every config key: the params of the tracked run."""
    return {f"{section}.{key}": value for section, values in cfg.to_dict().items() for key, value in values.items()}


class Tracker(ABC):
    """A tracked run (`start_tracker` makes one). Its methods log a failure as a warning instead of raising.

    Attributes:
        name: "mlflow" or "wandb".
        run_id: the tracked run's id in its tracker.
    """

    name = ""
    run_id = ""

    @abstractmethod
    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Scalars at an optimizer step (non-finite and non-numeric values are left out)."""

    @abstractmethod
    def log_files(self, files: dict[str, bytes], folder: str, step: int) -> None:
        """Files ({name: bytes}: PNGs, the per-class table) under `folder` of the tracked run."""

    @abstractmethod
    def set_best(self, location: str) -> None:
        """Record where the run's best checkpoint is (a path or URI)."""

    @abstractmethod
    def close(self, finished: bool) -> None:
        """End the tracked run: finished, or cut short (a failure; a restart continues it)."""

    def _guarded(self, what: str, action: Callable[[], object]) -> None:
        try:
            action()
        except Exception as err:  # the run folder holds the record: a tracker that fails never ends the run
            log.warning("%s: %s failed (%s: %s); training goes on", self.name, what, type(err).__name__, err)


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of `metrics` (a bool, a text, a NaN left out)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}  # fmt: skip


def start_tracker(cfg: Config, run_dir: str) -> Tracker | None:
    """The tracked run of `cfg`'s run folder `run_dir`, continued when `tracking.json` there names one of the same
    tracker and URI; None for `train.tracker=none`. Call on rank 0 only.

    Raises:
        ConfigError: the tracker's client is not installed, or the tracked run cannot be created (naming the URI).
    """
    kind = cfg.train.tracker
    if kind == "none":
        return None
    saved = _read_saved(run_dir, kind, cfg.train.tracker_uri)
    tracker: Tracker = (MlflowTracker if kind == "mlflow" else WandbTracker)(cfg, run_dir, saved)
    if tracker.run_id != saved:
        entry = {"tracker": kind, "uri": cfg.train.tracker_uri, "run_id": tracker.run_id}
        io.atomic_write(io.join(run_dir, TRACKING_FILE), json.dumps(entry))
    log.info(
        "tracking the run with %s: run %s%s", kind, tracker.run_id, " (continued)" if saved == tracker.run_id else ""
    )
    return tracker


def _read_saved(run_dir: str, kind: str, uri: str) -> str | None:
    path = io.join(run_dir, TRACKING_FILE)
    if not io.exists(path):
        return None
    try:
        entry = json.loads(io.read_text(path))
    except ValueError:
        log.warning("%s is not JSON: a new tracked run starts", path)
        return None
    same = entry.get("tracker") == kind and entry.get("uri") == uri
    return str(entry["run_id"]) if same and entry.get("run_id") else None


class MlflowTracker(Tracker):
    """A run of an MLflow experiment (`train.tracker_project`, default "ddetr") at `train.tracker_uri`."""

    name = "mlflow"

    def __init__(self, cfg: Config, run_dir: str, saved: str | None) -> None:
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise ConfigError(
                "train.tracker=mlflow needs the MLflow client: pip install 'ddetr[track]' (or mlflow-skinny)"
            ) from None
        uri = cfg.train.tracker_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri:
            raise ConfigError("train.tracker=mlflow needs train.tracker_uri (http://host:5000, or file:///folder) "
                              "or MLFLOW_TRACKING_URI")  # fmt: skip
        if "://" not in uri or uri.startswith("file:"):
            # MLflow 3 refuses its file store unless told; a file URI given here is the user's explicit choice.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._pending: list[Any] = []
        try:
            self.client = MlflowClient(tracking_uri=uri)
            if saved and self._continue(saved):
                self.run_id = saved
                return
            run = self.client.create_run(
                self._experiment(cfg.train.tracker_project or DEFAULT_PROJECT),
                run_name=cfg.train.name,
                tags={"ddetr.run_dir": run_dir},
            )
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            params = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in flat_config(cfg).items()]
            for i in range(0, len(params), _MLFLOW_BATCH):
                self.client.log_batch(self.run_id, params=params[i : i + _MLFLOW_BATCH])
        except ConfigError:
            raise
        except Exception as err:
            raise ConfigError(f"train.tracker_uri={uri}: cannot create an MLflow run there ({err})") from err

    def _continue(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except Exception:  # deleted, or another store: a new run
            return False
        self.client.update_run(run_id, status="RUNNING")
        return True

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another trial of a sweep created it just now
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_MLFLOW_NAME.sub("_", k), v, now, step) for k, v in _numbers(metrics).items()]

        def send() -> None:
            # Asynchronous: a remote server's round trip does not hold every step of training.
            self._pending.append(self.client.log_batch(self.run_id, metrics=batch, synchronous=False))

        if batch:
            self._guarded(f"logging the metrics of step {step}", send)

    def _wait(self) -> None:
        pending, self._pending = self._pending, []
        for operation in pending:
            operation.wait()

    def log_files(self, files: dict[str, bytes], folder: str, step: int) -> None:
        def send() -> None:
            with tempfile.TemporaryDirectory(prefix="ddetr-track-") as tmp:
                for name, data in files.items():
                    Path(tmp, name).write_bytes(data)
                self.client.log_artifacts(self.run_id, tmp, artifact_path=folder)

        self._guarded(f"uploading {folder}", send)
        self._guarded("logging metrics", self._wait)  # an epoch boundary: the step metrics are in by now

    def set_best(self, location: str) -> None:
        self._guarded("recording the best checkpoint", lambda: self.client.set_tag(self.run_id, "best_checkpoint",
                                                                                    location))  # fmt: skip

    def close(self, finished: bool) -> None:
        self._guarded("logging metrics", self._wait)
        status = "FINISHED" if finished else "FAILED"
        self._guarded("ending the run", lambda: self.client.set_terminated(self.run_id, status=status))


class WandbTracker(Tracker):
    """A run of a W&B project (`train.tracker_project`, default "ddetr"); `train.tracker_uri`: "offline" (files in
    the run folder's `wandb/`, for `wandb sync`), a W&B server's URL, or "" (W&B's own settings and login)."""

    name = "wandb"

    def __init__(self, cfg: Config, run_dir: str, saved: str | None) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "train.tracker=wandb needs the W&B client: pip install 'ddetr[track]' (or wandb)"
            ) from None
        self._wandb = wandb
        uri = cfg.train.tracker_uri
        settings: dict[str, Any] = {"silent": True}
        if uri.startswith(("http://", "https://")):
            settings["base_url"] = uri
        elif uri not in ("", "offline"):
            raise ConfigError(f"train.tracker_uri={uri}: for W&B give offline, a server URL (https://...) or nothing")
        local = not io.is_uri(run_dir)
        try:
            self.run = wandb.init(
                project=cfg.train.tracker_project or DEFAULT_PROJECT,
                name=cfg.train.name,
                id=saved or uuid.uuid4().hex[:12],
                resume="allow",
                config=cfg.to_dict(),
                dir=run_dir if local else None,  # offline files kept beside the run's (a bucket: the worker's folder)
                mode="offline" if uri == "offline" else None,
                reinit="create_new",  # a process may train several runs (tests, a notebook)
                settings=wandb.Settings(**settings),
            )
        except Exception as err:
            raise ConfigError(f"train.tracker=wandb: cannot start a W&B run ({err})") from err
        self.run_id = self.run.id

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        numbers = _numbers(metrics)
        if numbers:
            self._guarded(f"logging the metrics of step {step}", lambda: self.run.log(numbers, step=step))

    def log_files(self, files: dict[str, bytes], folder: str, step: int) -> None:
        def send() -> None:
            from PIL import Image

            images = {}
            for name, data in files.items():
                if name.endswith(".png"):
                    images[f"{folder}/{name.removesuffix('.png')}"] = self._wandb.Image(Image.open(_io.BytesIO(data)))
            if images:
                self.run.log(images, step=step)

        self._guarded(f"logging {folder}", send)

    def set_best(self, location: str) -> None:
        self._guarded("recording the best checkpoint", lambda: self.run.summary.update({"best_checkpoint": location}))

    def close(self, finished: bool) -> None:
        self._guarded("ending the run", lambda: self.run.finish(exit_code=0 if finished else 1))
