"""Box conversions and (generalized) IoU for boxes in (cx, cy, w, h) or (x0, y0, x1, y1) form."""

from __future__ import annotations

import torch


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre, width, height -> (..., 4) corners."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) corners -> (..., 4) centre, width, height."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(..., N, 4) xyxy -> (..., N) areas."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU of (..., N, 4) and (..., M, 4) xyxy boxes (the same leading dims, e.g. a batch).

    Returns:
        iou (..., N, M) and union (..., N, M); the union is reused by `generalized_box_iou`.
    """
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.max(boxes1[..., :, None, :2], boxes2[..., None, :, :2])  # (..., N, M, 2)
    rb = torch.min(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])  # (..., N, M, 2)
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of (N, 4) and (M, 4) xyxy boxes -> (N, M) in [-1, 1].

    Degenerate boxes (x1 < x0 or y1 < y0) would give meaningless values and raise a ValueError.
    """
    if not torch.compiler.is_compiling():
        # A diverged model shows up here first: say so instead of returning NaNs downstream.
        if not (boxes1[:, 2:] >= boxes1[:, :2]).all():
            raise ValueError("generalized_box_iou: boxes1 has degenerate boxes (x1 < x0 or y1 < y0; NaN?)")
        if not (boxes2[:, 2:] >= boxes2[:, :2]).all():
            raise ValueError("generalized_box_iou: boxes2 has degenerate boxes (x1 < x0 or y1 < y0; NaN?)")
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing
