"""The plain PyTorch engine: one optimizer step and one evaluation pass. No Ray here.

A batch is the data pipeline's dict (`ddetr.data.collate`): "images" (B, 3, H, W), "mask" (B, H, W) bool True at
padding, "targets" a list of B dicts with "boxes" (n, 4) normalised cxcywh, "labels" (n,), "image_id" and
"orig_size" (h, w). `batch_to` moves one to the device (and normalises its images there).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ddetr.data.collate import batch_to

Batch = dict[str, Any]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message carries every loss term of the offending step."""


def world_mean(value: float, device: torch.device) -> float:
    """Mean of a float over all workers (itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def train_step(
    model: nn.Module,
    criterion: nn.Module,
    micro_batches: Sequence[Batch],
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    max_norm: float = 0.1,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One optimizer step over `micro_batches` (already on `device`), accumulating their gradients.

    Every micro-batch's loss is normalised by the number of target boxes of the whole group (averaged over
    workers), so the accumulated gradient is that of one large batch; under DDP only the last backward
    all-reduces. With a `scaler` (fp16 autocast) the loss is scaled before backward and the gradients unscaled
    before clipping at `max_norm` (0: no clipping); a step whose gradients overflowed is skipped by the scaler.

    Returns:
        "loss" and every weighted loss term (summed over the micro-batches), "class_error" and
        "cardinality_error" (their means), "lr" of the first group, and "grad_norm" when clipping.

    Raises:
        NonFiniteLossError: the loss is not finite on some worker; no parameter was changed.
    """
    model.train()
    criterion.train()
    num_boxes = criterion.count_boxes([t for b in micro_batches for t in b["targets"]], device)
    logged: dict[str, float] = {}
    for i, batch in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync():
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs = model(batch["images"], batch["mask"])
                losses = criterion(outputs, batch["targets"], num_boxes=num_boxes)
            loss = criterion.total_loss(losses)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        for k, v in losses.items():
            logged[k] = logged.get(k, 0.0) + v.detach().item()
        logged["loss"] = logged.get("loss", 0.0) + loss.detach().item()
    if not math.isfinite(world_mean(logged["loss"], device)):
        optimizer.zero_grad(set_to_none=True)
        terms = ", ".join(f"{k}={v:.4g}" for k, v in sorted(logged.items()))
        raise NonFiniteLossError(f"the loss is not finite, so the step was not taken. Loss terms: {terms}")
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm) if max_norm > 0 else None
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    metrics = {k: v / len(micro_batches) if k in ("class_error", "cardinality_error") else v for k, v in logged.items()}
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    return metrics


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
