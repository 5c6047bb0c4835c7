"""The training run: build, resume, then train / evaluate / checkpoint epoch after epoch.

`fit` is plain PyTorch. Where the batches come from, how the model is wrapped for data parallelism and where
metrics and checkpoints go is the `Runtime`'s business: `LocalRuntime` (one process, a torch DataLoader,
checkpoints in a run folder) here, and the Ray Train runtime in `ray_train.py`.
"""

from __future__ import annotations

import logging
import random
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ddetr.config import Config
from ddetr.models import build_model
from ddetr.train.engine import NonFiniteLossError, predict_batches, train_one_epoch
from ddetr.train.optim import build_optimizer, build_scheduler
from ddetr.train.probes import StepProbe
from ddetr.train.state import TrainState, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


class Runtime(Protocol):
    """What `fit` needs from the world around it."""

    rank: int
    world_size: int
    device: torch.device

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model as trained (e.g. DistributedDataParallel); `fit` keeps the unwrapped one for saving."""

    def train_batches(self, epoch: int, skip_images: int) -> Iterable[dict]:
        """This worker's training batches of `epoch`, leaving out the first `skip_images` of the whole epoch."""

    def val_batches(self) -> Iterable[dict] | None:
        """This worker's validation batches, or None when there is no validation split."""

    def evaluate(self, predictions: dict[int, dict[str, torch.Tensor]]) -> dict[str, float]:
        """COCO metrics of this worker's predictions gathered with every other worker's."""

    def log_step(self, step: int, metrics: dict[str, Any]) -> None:
        """Record one optimizer step's metrics (rank 0's are kept)."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """Publish metrics and, when given, the checkpoint written into `checkpoint_dir` (rank 0 only)."""

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint to resume from after a restart, or None for a fresh run."""

    def local_run_dir(self) -> Path | None:
        """The run folder when it is on this machine's file system (test probes write there), else None."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed every generator for the optimizer step after `step` from (seed, rank, step).

    The model's randomness (dropout) is then a pure function of where the run is, like the data order: a run
    resumed from a checkpoint draws exactly what the uninterrupted run drew, without saving generator states.
    """
    seed_everything(int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1))


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `train.amp`: "auto" is bf16 on CUDA and none on CPU; "bf16" / "fp16" / "off" force it."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[setting]


def accumulation_steps(cfg: Config, world_size: int) -> int:
    """Micro-batches per optimizer step so that one step sees `train.total_batch_size` images (0: one).

    A fixed-size run must divide the total exactly. An elastic run (`train.min_workers > 0`) cannot know its
    worker count in advance: it takes the nearest achievable total and says so when that differs.
    """
    per_step = cfg.train.batch_size * world_size
    total = cfg.train.total_batch_size
    if total <= 0:
        return 1
    if total % per_step == 0:
        return total // per_step
    if cfg.train.min_workers <= 0:
        raise ValueError(
            f"train.total_batch_size ({total}) must be a multiple of train.batch_size x "
            f"workers ({cfg.train.batch_size} x {world_size} = {per_step})"
        )
    accum = max(1, round(total / per_step))
    log.warning(
        "%d workers x batch %d cannot make a total batch of %d: training with %d (%d micro-batches)",
        world_size,
        cfg.train.batch_size,
        total,
        accum * per_step,
        accum,
    )
    return accum


def fit(cfg: Config, runtime: Runtime) -> dict[str, Any]:
    """Train `cfg` to `cfg.train.epochs`, resuming from the runtime's latest checkpoint if there is one.

    Returns:
        The metrics of the last epoch (training means, plus COCO metrics when evaluated).
    """
    device = runtime.device
    seed_everything(cfg.train.seed + runtime.rank)
    model, criterion, postprocessors = build_model(cfg)
    model.to(device)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    dtype = amp_dtype(cfg.train.amp, device)
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    state = TrainState()
    resume = runtime.latest_checkpoint()
    if resume is not None:
        payload = load_checkpoint(resume, map_location=device)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if scaler is not None and payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
        state = payload["state"]
        log.info(
            "resumed from %s at epoch %d, step %d, image %d of the epoch",
            resume,
            state.epoch,
            state.step,
            state.images_done,
        )
    trained = runtime.wrap(model)
    accum = accumulation_steps(cfg, runtime.world_size)
    images_per_step = cfg.train.batch_size * runtime.world_size * accum
    metrics: dict[str, Any] = dict(state.metrics)
    max_steps = cfg.train.max_steps_per_epoch or None
    probe = StepProbe(runtime.rank, runtime.world_size, runtime.local_run_dir(), state.step)

    def checkpoint(metrics: dict[str, Any]) -> None:
        # Checkpoints are ranked by val/AP: one taken before any evaluation carries the last known value.
        metrics.setdefault("val/AP", state.metrics.get("val/AP", -1.0))
        state.metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        with tempfile.TemporaryDirectory(prefix="ddetr-ckpt-") as tmp:
            directory = None
            if runtime.rank == 0:
                directory = Path(tmp)
                save_checkpoint(
                    directory,
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    scaler=scaler,
                    state=state,
                    config=cfg.to_dict(),
                )
            runtime.report(metrics, directory)

    def on_step(state: TrainState, step_metrics: dict[str, float]) -> None:
        state.images_done += images_per_step
        if runtime.rank == 0:
            runtime.log_step(state.step, {**step_metrics, "epoch": state.epoch})
            if state.step % cfg.train.log_every == 0:
                log.info(
                    "epoch %d step %d (%d in epoch): %s",
                    state.epoch,
                    state.step,
                    state.batches_done,
                    _summary(step_metrics),
                )
        if probe.enabled:
            probe.after_step(state.epoch, state.step)
        every = cfg.train.checkpoint_every_steps
        # The last step of a cut-short epoch is followed by the epoch's own checkpoint: no mid-epoch one.
        if every > 0 and state.batches_done % every == 0 and state.batches_done != max_steps:
            checkpoint({**step_metrics, "epoch": state.epoch, "step": state.step, "mid_epoch": True})

    def before_step(state: TrainState) -> None:
        # After the batches are loaded: creating a data iterator draws from the global generator too.
        seed_step(cfg.train.seed, runtime.rank, state.step)

    while state.epoch < cfg.train.epochs:
        epoch = state.epoch
        batches = runtime.train_batches(epoch, skip_images=state.images_done)
        if probe.enabled:
            batches = probe.watch(batches)
        try:
            epoch_metrics = train_one_epoch(
                trained,
                criterion,
                batches,
                optimizer,
                state,
                device=device,
                accum_steps=accum,
                max_norm=cfg.train.clip_max_norm,
                amp_dtype=dtype,
                max_steps=max_steps,
                on_step=on_step,
                before_step=before_step,
                scaler=scaler,
            )
        except NonFiniteLossError:
            log.error("stopping: the loss is not finite; the last good checkpoint is kept")
            raise
        scheduler.step()
        state.epoch, state.batches_done, state.images_done = epoch + 1, 0, 0
        metrics = {f"train/{k}": v for k, v in epoch_metrics.items()}
        metrics.update(epoch=state.epoch, step=state.step)
        val = runtime.val_batches()
        if val is not None and (state.epoch % cfg.train.eval_every == 0 or state.epoch == cfg.train.epochs):
            predictions = predict_batches(model, postprocessors["bbox"], val, device=device, amp_dtype=dtype)
            metrics.update({f"val/{k}": v for k, v in runtime.evaluate(predictions).items()})
        if runtime.rank == 0:
            log.info("epoch %d done: %s", epoch, _summary(metrics))
        checkpoint(metrics)
    return metrics


def _summary(metrics: dict[str, Any]) -> str:
    keys = ("loss", "train/loss", "loss_ce", "loss_bbox", "loss_giou", "val/AP", "val/AP50", "step_s", "train/step_s")
    return ", ".join(f"{k.removeprefix('train/')}={metrics[k]:.4g}" for k in keys if k in metrics)
