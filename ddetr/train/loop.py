"""The training run: build, resume, then for each epoch train step by step, evaluate and checkpoint.

`fit` is plain PyTorch and reads top to bottom. Where the batches come from, how the model is wrapped for data
parallelism and where metrics and checkpoints go is the `Runtime`'s business: `LocalRuntime` (one process, a
torch DataLoader, checkpoints in a run folder) in `local.py`, and the Ray Train runtime in `ray_train.py`.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ddetr.config import Config
from ddetr.data.collate import batch_to
from ddetr.models import build_model
from ddetr.models.weights import init_from
from ddetr.train.batches import DataStallError, in_step, planned_groups, watched
from ddetr.train.callbacks import StepCallback, StepInfo
from ddetr.train.checkpoints import TrainState, load_checkpoint, save_checkpoint
from ddetr.train.ema import ModelEMA
from ddetr.train.engine import NonFiniteLossError, predict_batches, train_step, world_sum
from ddetr.train.optim import build_optimizer, build_scheduler
from ddetr.train.preemption import PreemptionWatch
from ddetr.train.progress import EpochProgress

log = logging.getLogger("ddetr.train")


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

    def log(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        """Record metrics in the run's logbook: one optimizer step's ("step"), or an event (rank 0's are kept)."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """Publish metrics and, when given, the checkpoint written into `checkpoint_dir` (rank 0 only)."""

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint to resume from after a restart, or None for a fresh run."""

    def preemption_deadline(self) -> float | None:
        """The Unix time at which the node of a worker is taken away once that is announced, else None (called once
        per step on every worker)."""

    def close(self) -> None:
        """Flush the logbook and let go of what the runtime holds (downloads, files); called once `fit` returns."""


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


class Training:
    """What a checkpoint holds and a resume restores: the model, its EMA, its optimisation state and the counters.

    `load_backbone_weights=False` when full weights are loaded next (a resume, `model.init_from`): no ImageNet
    file is fetched for nothing. `categories` (the dataset's) are saved with every checkpoint, so a later
    fine-tuning can keep the rows of the classes it shares by name.
    """

    def __init__(
        self,
        cfg: Config,
        device: torch.device,
        load_backbone_weights: bool = True,
        categories: list[dict] | None = None,
    ) -> None:
        self.model, self.criterion, self.postprocessors = build_model(cfg, load_backbone_weights=load_backbone_weights)
        self.model.to(device)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.amp_dtype = amp_dtype(cfg.train.amp, device)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        self.ema = (
            ModelEMA(self.model, cfg.train.ema_decay, cfg.train.ema_warmup_steps) if cfg.train.ema_decay else None
        )
        self.state = TrainState()
        self.categories = categories

    @property
    def deployed(self) -> nn.Module:
        """The model validated and shipped: the EMA when it is on."""
        return self.ema.module if self.ema is not None else self.model

    def payload(self, config: dict) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "state": vars(self.state).copy(),
            "config": config,
            "categories": self.categories,
        }

    def restore(self, payload: dict[str, Any]) -> None:
        self.model.load_state_dict(payload["model"])
        if self.ema is not None:
            if payload.get("ema"):
                self.ema.load_state_dict(payload["ema"])
            else:  # a run that turns the EMA on when it resumes starts the average here
                self.ema = ModelEMA(self.model, self.ema.decay, self.ema.warmup_steps)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if self.scaler is not None and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        self.state = payload["state"]


def fit(cfg: Config, runtime: Runtime, callbacks: Sequence[StepCallback] = ()) -> dict[str, Any]:
    """Train `cfg` to `cfg.train.epochs`, resuming from the runtime's latest checkpoint if there is one.

    `callbacks` are called after every optimizer step (`callbacks.py`).

    Returns:
        The metrics of the last epoch (training means, plus COCO metrics when evaluated).
    """
    device, t = runtime.device, cfg.train
    seed_everything(t.seed + runtime.rank)
    resume = runtime.latest_checkpoint()
    categories = dataset_categories(cfg)
    run = Training(cfg, device, load_backbone_weights=resume is None and not cfg.model.init_from, categories=categories)
    if resume is not None:
        run.restore(load_checkpoint(resume, map_location=device))
        s = run.state
        log.info("resumed from %s at epoch %d, step %d, image %d of the epoch", resume, s.epoch, s.step, s.images_done)
    elif cfg.model.init_from:
        # Every worker loads the same file, so every rank starts from the same weights.
        heads = init_from(run.model, cfg.model.init_from, cfg.model, categories)
        if runtime.rank == 0:
            runtime.log("init_from", 0, {"source": cfg.model.init_from, "reinitialised": " ".join(heads)})
        if run.ema is not None:
            run.ema = ModelEMA(run.model, t.ema_decay, t.ema_warmup_steps)
    state, start_step = run.state, run.state.step
    trained = runtime.wrap(run.model)
    accum = accumulation_steps(cfg, runtime.world_size)
    images_per_step = t.batch_size * runtime.world_size * accum
    divergence = DivergenceGuard(runtime, t.max_nonfinite_steps)
    preemption = PreemptionWatch(runtime)
    metrics: dict[str, Any] = dict(state.metrics)

    for epoch in range(state.epoch, t.epochs):
        steps_left = remaining_steps(cfg, state, runtime.world_size, accum)
        steps_per_epoch = state.batches_done + steps_left
        progress = EpochProgress(epoch, t.epochs, steps_per_epoch, state.batches_done, runtime.rank == 0, t.log_every)
        sums: dict[str, float] = {}
        steps_here = stand_ins = 0
        batches = runtime.train_batches(epoch, skip_images=state.images_done)
        for group, data_wait, substituted in planned_groups(
            batches, accum, steps_left, epoch, device, cfg.data.watchdog_s
        ):
            tick = time.perf_counter()
            stand_ins += substituted
            group = [batch_to(b, device) for b in group]
            seed_step(t.seed, runtime.rank, state.step)  # after the batches: a data iterator draws from torch too
            where = f"epoch {epoch}, optimizer step {state.step + 1} (step {state.batches_done + 1} of the epoch)"
            try:
                step_metrics = train_step(
                    trained,
                    run.criterion,
                    group,
                    run.optimizer,
                    device=device,
                    max_norm=t.clip_max_norm,
                    amp_dtype=run.amp_dtype,
                    scaler=run.scaler,
                )
            except NonFiniteLossError as err:
                log.error("stopping at %s: the loss is not finite; the last good checkpoint is kept", where)
                hint = "check the data, or resume from the last checkpoint with a lower train.lr or clip_max_norm"
                raise NonFiniteLossError(f"non-finite loss at {where}: {err}; {hint}") from None
            if divergence.step_taken(step_metrics, where, state.step + 1, epoch) and run.ema is not None:
                run.ema.update(run.model)  # only after a step taken: a skipped one left the weights as they were
            state.step, state.batches_done, state.images_done = (
                state.step + 1,
                state.batches_done + 1,
                state.images_done + images_per_step,
            )
            step_metrics.update(data_wait_s=data_wait, step_s=data_wait + time.perf_counter() - tick)
            steps_here += 1
            for k, v in step_metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            image_ids = tuple(int(target["image_id"]) for b in group for target in b["targets"])
            info = StepInfo(runtime.rank, runtime.world_size, epoch, state.step, start_step, image_ids)
            for callback in callbacks:
                callback.after_step(info)
            if runtime.rank == 0:
                runtime.log("step", state.step, {**step_metrics, "epoch": epoch})
            progress.update(
                step_metrics["loss"], lr=step_metrics["lr"], data_wait_s=data_wait, step_s=step_metrics["step_s"]
            )
            # The last step of an epoch is followed by the epoch's own checkpoint: no mid-epoch one then.
            mid_epoch = state.batches_done < steps_per_epoch
            periodic = t.checkpoint_every_steps > 0 and state.batches_done % t.checkpoint_every_steps == 0
            notice = preemption.notice(state.step)  # a spot reclaim, a drain: checkpoint now, once
            if (periodic or notice) and mid_epoch:
                checkpoint(cfg, runtime, run, {**step_metrics, "epoch": epoch, "step": state.step, "mid_epoch": True})
            if mid_epoch:
                preemption.await_restart(state.step)
        progress.close()

        run.scheduler.step()
        state.epoch, state.batches_done, state.images_done = epoch + 1, 0, 0
        metrics = epoch_metrics(sums, steps_here)
        # Every rank adds its stand-ins (images that failed to decode), once per epoch: the same collective on each.
        metrics.update(epoch=state.epoch, step=state.step, **{"data/skipped_images": world_sum([stand_ins], device)[0]})
        if state.epoch % t.eval_every == 0 or state.epoch == t.epochs:
            metrics.update(validate(cfg, runtime, run))
        if runtime.rank == 0:
            log.info("epoch %d/%d done: %s", state.epoch, t.epochs, summary(metrics))
        checkpoint(cfg, runtime, run, metrics)
        if state.epoch < t.epochs:  # a notice that came with the epoch's last step, checkpointed just now
            preemption.await_restart(state.step)
    return metrics


def validate(cfg: Config, runtime: Runtime, run: Training) -> dict[str, float]:
    """COCO metrics of the model shipped (`run.deployed`: the EMA when it is on) as "val/<metric>", which rank the
    checkpoints; with the EMA on, the raw weights' as "val_raw/<metric>" beside them. {} without a validation split.

    The raw weights go first: the logbook's COCO summary is then the shipped model's.
    """
    dtype = run.amp_dtype if cfg.train.amp_eval else None
    models = ({"val_raw": run.model} if run.ema is not None else {}) | {"val": run.deployed}
    metrics: dict[str, float] = {}
    for prefix, model in models.items():
        val = runtime.val_batches()
        if val is None:
            return {}
        # Under the watchdog as the training batches are: a stalled validation pipeline ends the run on every rank
        # (agreed before the evaluation's gather, which the others would wait in), not a hang.
        val = watched(val, cfg.data.watchdog_s, "validation")
        try:
            postprocess = run.postprocessors["bbox"]
            predictions = predict_batches(model, postprocess, val, device=runtime.device, amp_dtype=dtype)
            stalled = False
        except DataStallError:
            predictions, stalled = {}, True
        where = f"validation after epoch {run.state.epoch}: "
        in_step(stalled, [], "validation", cfg.data.watchdog_s, runtime.device, where)  # every rank, stalled or not
        metrics.update({f"{prefix}/{k}": v for k, v in runtime.evaluate(predictions).items()})
    return metrics


class DivergenceGuard:
    """Counts the optimizer steps `train_step` skipped for a non-finite gradient norm, and ends the run after
    `limit` (`train.max_nonfinite_steps`) in a row.

    A skipped step changed nothing but still counts: the data moves on, and every rank skipped it too (the decision
    is taken on the all-reduced gradients), so the ranks stay in step.
    """

    def __init__(self, runtime: Runtime, limit: int) -> None:
        self.runtime, self.limit, self.in_a_row = runtime, limit, 0

    def step_taken(self, step_metrics: dict[str, float], where: str, step: int, epoch: int) -> bool:
        """Whether the step of `step_metrics` was taken; a skipped one is logged, and its non-finite "grad_norm" left
        out of the metrics (and so out of the epoch's mean and the checkpoints).

        Raises:
            NonFiniteLossError: the `limit`-th skipped step in a row, naming the step and the loss terms.
        """
        if not step_metrics.get("skipped_step"):
            self.in_a_row = 0
            return True
        grad_norm = step_metrics.pop("grad_norm")
        self.in_a_row += 1
        log.warning("skipped %s: the gradient norm is %s (%d in a row)", where, grad_norm, self.in_a_row)
        if self.runtime.rank == 0:
            self.runtime.log("skipped_step", step, {"grad_norm": str(grad_norm), "epoch": epoch})
        if self.in_a_row >= self.limit:
            log.error("stopping at %s: the gradients are not finite; the last good checkpoint is kept", where)
            terms = ", ".join(f"{k}={v:.4g}" for k, v in sorted(step_metrics.items()) if k != "skipped_step")
            raise NonFiniteLossError(
                f"non-finite gradients at {where}: the gradient norm was not finite for {self.in_a_row} "
                f"consecutive steps (train.max_nonfinite_steps), which were skipped. Loss terms: {terms}; "
                "check the data, or resume from the last checkpoint with a lower train.lr or clip_max_norm"
            )
        return False


def dataset_categories(cfg: Config) -> list[dict] | None:
    """The COCO categories of the run's data (training split, else validation), or None without data."""
    from ddetr.data.shards import read_metadata

    split = cfg.data.train or cfg.data.val
    return read_metadata(split).categories if split else None


def remaining_steps(cfg: Config, state: TrainState, world_size: int, accum: int) -> int:
    """Optimizer steps left in the epoch in progress.

    Each micro-batch takes `batch_size` images on every worker, and an incomplete one is dropped; the last
    step may hold fewer than `accum` micro-batches. `train.max_steps_per_epoch` caps the epoch.
    """
    from ddetr.data.shards import read_metadata

    images = read_metadata(cfg.data.train).num_images - state.images_done if cfg.data.train else 0
    micro_batches = max(0, images) // (cfg.train.batch_size * world_size)
    steps = -(-micro_batches // accum)
    cap = cfg.train.max_steps_per_epoch
    return min(steps, max(0, cap - state.batches_done)) if cap > 0 else steps


def checkpoint(cfg: Config, runtime: Runtime, run: Training, metrics: dict[str, Any]) -> None:
    """Write the run's checkpoint (rank 0) and report it with `metrics` through the runtime (every rank).

    Checkpoints are ranked by val/AP: one taken before any evaluation carries the last known value.
    """
    metrics.setdefault("val/AP", run.state.metrics.get("val/AP", -1.0))
    run.state.metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    with tempfile.TemporaryDirectory(prefix="ddetr-ckpt-") as tmp:
        directory = None
        if runtime.rank == 0:
            directory = Path(tmp)
            save_checkpoint(directory, run.payload(cfg.to_dict()), run.state.metrics)
        runtime.report(metrics, directory)


def summary(metrics: dict[str, Any]) -> str:
    keys = ("train/loss", "loss_ce", "loss_bbox", "loss_giou", "val/AP", "val/AP50", "val/AP75", "val_raw/AP",
            "train/step_s", "train/skipped_steps", "data/skipped_images")  # fmt: skip
    counts = ("train/skipped_steps", "data/skipped_images")  # shown only when some were skipped
    shown = [k for k in keys if k in metrics and (k not in counts or metrics[k])]
    return ", ".join(f"{k.removeprefix('train/')} {metrics[k]:.4g}" for k in shown)


def epoch_metrics(sums: dict[str, float], steps: int) -> dict[str, float]:
    """The epoch's "train/<key>" metrics from the sums of its `steps` step metrics: means per step, except
    "train/skipped_steps" (a count) and "train/grad_norm" (the mean over the steps taken; a skipped step has none)."""
    skipped = sums.get("skipped_step")
    metrics = {}
    for k, v in sums.items():
        if k != "skipped_step":
            taken = steps - (skipped or 0.0) if k == "grad_norm" else steps
            metrics[f"train/{k}"] = v / max(1.0, taken)
    if skipped is not None:
        metrics["train/skipped_steps"] = skipped
    return metrics
