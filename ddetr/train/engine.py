"""The plain PyTorch engine: one optimizer step and one evaluation pass. No Ray here.

A batch is the data pipeline's dict (`ddetr.data.collate`): "images" (B, 3, H, W), "mask" (B, H, W) bool True at
padding, "targets" a list of B dicts with "boxes" (n, 4) normalised cxcywh, "labels" (n,), "image_id" and
"orig_size" (h, w). `batch_to` moves one to the device (and normalises its images there).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ddetr.data.collate import batch_to

Batch = dict[str, Any]


class NonFiniteLossError(FloatingPointError):
    """The loss (or the model's outputs) became NaN or infinite, or the gradient norm stayed so; the message
    carries every loss term of the offending step."""


def world_mean(values: Sequence[float], device: torch.device) -> list[float]:
    """Means of `values` over all workers (themselves when not distributed), in one all-reduce."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def world_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Sums of `values` over all workers (themselves when not distributed), in one all-reduce."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def named_outputs(outputs: dict | Sequence, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the model's output dict, nested lists and dicts included, with its path: "pred_boxes",
    "aux_outputs[0].pred_logits", "enc_outputs.pred_boxes" (see `DeformableDETR.forward`)."""
    keyed = isinstance(outputs, dict)
    for key, value in outputs.items() if keyed else enumerate(outputs):
        name = (f"{prefix}.{key}" if prefix else str(key)) if keyed else f"{prefix}[{key}]"
        if torch.is_tensor(value):
            yield name, value
        elif isinstance(value, (dict, list, tuple)):
            yield from named_outputs(value, name)


def nonfinite_outputs(outputs: dict) -> list[str]:
    """The paths (`named_outputs`) of the floating-point outputs that hold a NaN or an infinity; [] when none do.

    One host sync for all of them, whatever their number.
    """
    named = [(name, t) for name, t in named_outputs(outputs) if t.is_floating_point()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()
    return [name for (name, _), ok in zip(named, finite, strict=True) if not ok]


def nan_losses(outputs: dict, loss_names: Iterable[str]) -> dict[str, torch.Tensor]:
    """A NaN for every loss term in `loss_names`, made as 0 x (the sum of every output tensor).

    Used instead of the criterion when the outputs are not finite (its Hungarian matcher would raise). Built
    from every output, its backward reaches every parameter that a real loss reaches, so under DDP this rank
    all-reduces the same gradients as the others and no rank waits for a collective another never starts.
    """
    total = sum(t.float().sum() for _, t in named_outputs(outputs) if t.is_floating_point())
    nan = 0.0 * total  # 0 x inf and 0 x nan are both nan
    return dict.fromkeys(loss_names, nan)


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

    A step whose total gradient norm is not finite (with a finite loss) is not taken: no parameter or optimizer
    state changes, and "skipped_step" is 1. The caller decides how many in a row to tolerate.

    Returns:
        "loss" and every weighted loss term (summed over the micro-batches), "class_error" and
        "cardinality_error" (their means), "lr" of the first group, "grad_norm" (the total norm before
        clipping, after unscaling; inf or nan on a skipped step) and "skipped_step" (1.0 or 0.0).

    Raises:
        NonFiniteLossError: the loss, or the model's outputs, are not finite on some worker; no parameter was
            changed. Every worker raises at the same step.
    """
    model.train()
    criterion.train()
    num_boxes = criterion.count_boxes([t for b in micro_batches for t in b["targets"]], device)
    logged: dict[str, float] = {}
    bad_outputs: dict[str, None] = {}  # an ordered set of output paths that were not finite, over micro-batches
    for i, batch in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync():
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs = model(batch["images"], batch["mask"])
                bad = nonfinite_outputs(outputs)
                bad_outputs.update(dict.fromkeys(bad))
                # The matcher cannot match NaN costs (scipy raises a ValueError, which Ray would retry as a worker
                # failure): a NaN loss with the same backward takes its place and the loss check below stops.
                losses = (
                    nan_losses(outputs, criterion.weight_dict)
                    if bad
                    else criterion(outputs, batch["targets"], num_boxes=num_boxes)
                )
            loss = criterion.total_loss(losses)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        for k, v in losses.items():
            logged[k] = logged.get(k, 0.0) + v.detach().item()
        logged["loss"] = logged.get("loss", 0.0) + loss.detach().item()
    # One all-reduce on every rank, every step: the mean loss, and the share of ranks whose outputs were not finite.
    mean_loss, bad_share = world_mean([logged["loss"], float(bool(bad_outputs))], device)
    if not math.isfinite(mean_loss):
        optimizer.zero_grad(set_to_none=True)
        terms = ", ".join(f"{k}={v:.4g}" for k, v in sorted(logged.items()))
        if bad_outputs:
            cause = f"the model outputs were not finite ({', '.join(bad_outputs)})"
        elif bad_share > 0:
            cause = "the model outputs were not finite on another worker"
        else:
            cause = "the loss is not finite"
        raise NonFiniteLossError(f"{cause}, so the step was not taken. Loss terms: {terms}")
    if scaler is not None:
        scaler.unscale_(optimizer)
    # Under DDP the gradients were all-reduced by the last backward, so this norm, and the decision taken on it,
    # is the same on every rank: no rank steps while another skips, and no collective is needed to agree.
    if max_norm > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    else:
        grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
    skipped = not math.isfinite(grad_norm) and scaler is None
    if scaler is not None:
        # fp16 gradients overflow routinely while the scale is still too high: the scaler skips that step and
        # halves its scale (it found the inf in `unscale_`). That is how loss scaling settles, not a divergence,
        # so it is left to the scaler and not counted as a skipped step.
        scaler.step(optimizer)
        scaler.update()
    elif not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    metrics = {k: v / len(micro_batches) if k in ("class_error", "cardinality_error") else v for k, v in logged.items()}
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    metrics["grad_norm"] = grad_norm
    metrics["skipped_step"] = float(skipped)
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
