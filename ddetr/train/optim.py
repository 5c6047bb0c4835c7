"""The official optimisation recipe: AdamW with three learning rates and a step decay."""

from __future__ import annotations

import torch
from torch import nn

from ddetr.config import TrainConfig

# Parameters whose names contain these get lr * linear_proj_mult: they move the sampling points, and large
# steps there throw the points off the feature map early in training.
LINEAR_PROJ_NAMES = ("reference_points", "sampling_offsets")
BACKBONE_NAMES = ("backbone.0",)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Split trainable parameters into the recipe's groups: main, backbone, and linear projections.

    Returns:
        A list of dicts with keys "params", "lr" and "name" ("main", "backbone", "linear_proj"); empty groups
        are left out.
    """
    groups: dict[str, list[nn.Parameter]] = {"main": [], "backbone": [], "linear_proj": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if any(key in name for key in BACKBONE_NAMES):
            groups["backbone"].append(p)
        elif any(key in name for key in LINEAR_PROJ_NAMES):
            groups["linear_proj"].append(p)
        else:
            groups["main"].append(p)
    lrs = {"main": cfg.lr, "backbone": cfg.lr_backbone, "linear_proj": cfg.lr * cfg.lr_linear_proj_mult}
    return [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps]


# Devices with a fused AdamW kernel: one pass over each tensor instead of a dozen elementwise ops. On a CPU it is
# 5x faster than the per-tensor loop torch picks there by default (benchmarks/optim.py).
FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg)
    fused = all(p.device.type in FUSED_DEVICES and p.dtype.is_floating_point for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.StepLR:
    """Stepped once per epoch: lr * 0.1 from epoch `lr_drop` on."""
    return torch.optim.lr_scheduler.StepLR(optimizer, cfg.lr_drop, gamma=0.1)
