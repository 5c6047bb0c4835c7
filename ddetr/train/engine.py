"""The plain PyTorch engine: one training epoch and one evaluation pass. No Ray here.

A batch is the data pipeline's dict (`ddetr.data.collate`): "images" (B, 3, H, W) float, "mask" (B, H, W)
bool True at padding, "targets" a list of B dicts with "boxes" (n, 4) normalised cxcywh, "labels" (n,),
"image_id" and "orig_size" (h, w).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ddetr.data.collate import batch_to
from ddetr.train.state import TrainState

log = logging.getLogger(__name__)

Batch = dict[str, Any]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message carries every loss term of the offending step."""


def _world_mean(value: float, device: torch.device) -> float:
    """Mean of a float over all workers (itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def _chunks(it: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    iterator = iter(it)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    *,
    device: torch.device,
    accum_steps: int = 1,
    max_norm: float = 0.1,
    amp_dtype: torch.dtype | None = None,
    max_steps: int | None = None,
    on_step: Callable[[TrainState, dict[str, float]], None] | None = None,
    before_step: Callable[[TrainState], None] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """Train over `batches`, one optimizer step per `accum_steps` micro-batches.

    The loss of every micro-batch is normalised by the number of target boxes of the whole accumulation group
    (averaged over workers), so an accumulated step has the gradient of one large batch. `state.step` and
    `state.batches_done` count optimizer steps; `on_step(state, metrics)` is called after each, and
    `before_step(state)` once its micro-batches are loaded, before the first forward (e.g. to seed dropout).
    With a `scaler` (fp16 autocast), the loss is scaled before backward and the gradients unscaled before
    clipping; a step whose gradients overflowed is skipped by the scaler, which then lowers its scale.

    Returns:
        Mean of every logged metric over the epoch ("loss", each weighted loss term, "class_error", ...), plus
        "data_wait_s" and "step_s" (mean seconds per optimizer step waiting for data, and in total).
    """
    model.train()
    criterion.train()
    sums: dict[str, float] = {}
    count = 0
    if max_steps is not None and state.batches_done >= max_steps:
        return {}  # resumed from the checkpoint of this epoch's last step: nothing left to train
    tick = time.perf_counter()
    for group in _chunks(batches, accum_steps):
        data_wait = time.perf_counter() - tick
        group = [batch_to(b, device) for b in group]
        if before_step is not None:
            before_step(state)
        num_boxes = criterion.count_boxes([t for b in group for t in b["targets"]], device)
        logged: dict[str, float] = {}
        for i, batch in enumerate(group):
            # DDP all-reduces gradients on every backward unless told not to: only the last micro-batch syncs.
            sync = i == len(group) - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    outputs = model(batch["images"], batch["mask"])
                    losses = criterion(outputs, batch["targets"], num_boxes=num_boxes)
                loss = criterion.total_loss(losses)
                (scaler.scale(loss) if scaler is not None else loss).backward()
            for k, v in losses.items():
                logged[k] = logged.get(k, 0.0) + v.detach().item()
            logged["loss"] = logged.get("loss", 0.0) + loss.detach().item()
        if not math.isfinite(_world_mean(logged["loss"], device)):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"non-finite loss at epoch {state.epoch}, optimizer step {state.step + 1} (step "
                f"{state.batches_done + 1} of the epoch), which was not taken; check the data, or resume from the "
                "last checkpoint with a lower train.lr or train.clip_max_norm. Loss terms: "
                + ", ".join(f"{k}={v:.4g}" for k, v in sorted(logged.items()))
            )
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm) if max_norm > 0 else None
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.batches_done += 1
        metrics = {k: v / len(group) if k in ("class_error", "cardinality_error") else v for k, v in logged.items()}
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        metrics["data_wait_s"] = data_wait
        metrics["step_s"] = time.perf_counter() - tick
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
        if on_step is not None:
            on_step(state, metrics)
        tick = time.perf_counter()
        if max_steps is not None and state.batches_done >= max_steps:
            break
    return {k: v / max(count, 1) for k, v in sums.items()}


@torch.no_grad()
def predict_batches(
    model: nn.Module,
    postprocess: nn.Module,
    batches: Iterable[Batch],
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> dict[int, dict[str, torch.Tensor]]:
    """Run the model over `batches` and post-process to each image's original size.

    Returns:
        image_id -> {"scores" (K,), "labels" (K,), "boxes" (K, 4) absolute xyxy}, on the CPU.
    """
    model.eval()
    predictions: dict[int, dict[str, torch.Tensor]] = {}
    for batch in batches:
        batch = batch_to(batch, device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(batch["images"], batch["mask"])
        sizes = torch.stack([t["orig_size"] for t in batch["targets"]])
        results = postprocess({k: v.float() for k, v in outputs.items() if torch.is_tensor(v)}, sizes)
        for t, r in zip(batch["targets"], results, strict=True):
            predictions[int(t["image_id"])] = {k: v.cpu() for k, v in r.items()}
    return predictions
