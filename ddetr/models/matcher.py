"""Hungarian matching of predictions to ground-truth boxes (the bipartite matching of DETR)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ddetr.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """Assign each target box to exactly one query, minimising a weighted sum of three costs.

    The cost of predicting target j with query i is

        cost_class * focal(i, label_j) + cost_bbox * |box_i - box_j|_1 - cost_giou * GIoU(box_i, box_j)

    where the class cost is the focal loss of predicting the class minus that of not predicting it
    (alpha 0.25, gamma 2), so it is on the same scale as the training loss. Queries left unmatched are
    trained as background by the criterion.

    Args:
        cost_class, cost_bbox, cost_giou: weights of the three costs (official: 2, 5, 2).
        focal_alpha, focal_gamma: parameters of the class cost. The official matcher fixes alpha at 0.25 even
            when the loss uses another, so it is `loss.matcher_focal_alpha`, apart from `loss.focal_alpha`.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0, nothing to match on")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def cost_matrix(self, outputs: dict, targets: list[dict]) -> torch.Tensor:
        """(B, Q, T) cost of every query against every target of the batch (T = all targets, concatenated)."""
        B, Q = outputs["pred_logits"].shape[:2]
        out_prob = outputs["pred_logits"].flatten(0, 1).sigmoid()  # (B*Q, K)
        out_bbox = outputs["pred_boxes"].flatten(0, 1)  # (B*Q, 4)
        tgt_ids = torch.cat([t["labels"] for t in targets]).long()
        tgt_bbox = torch.cat([t["boxes"] for t in targets]).to(out_bbox.dtype)
        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg_cost = (1 - alpha) * out_prob**gamma * -(1 - out_prob + 1e-8).log()
        pos_cost = alpha * (1 - out_prob) ** gamma * -(out_prob + 1e-8).log()
        cost_class = pos_cost[:, tgt_ids] - neg_cost[:, tgt_ids]  # (B*Q, T)
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))
        C = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        return C.view(B, Q, -1)

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            outputs: "pred_logits" (B, Q, K) and "pred_boxes" (B, Q, 4) cxcywh in [0, 1].
            targets: B dicts with "labels" (T_b,) int64 and "boxes" (T_b, 4) cxcywh in [0, 1]; T_b may be 0.

        Returns:
            B pairs (index_i, index_j) of int64 tensors of length min(Q, T_b): query index_i[k] predicts
            target index_j[k]; index_i is sorted.
        """
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [(empty, empty) for _ in targets]
        C = self.cost_matrix(outputs, targets).float().cpu()
        indices = [linear_sum_assignment(c[b].numpy()) for b, c in enumerate(C.split(sizes, -1))]
        return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]


def build_matcher(cost_class: float, cost_bbox: float, cost_giou: float, focal_alpha: float = 0.25) -> HungarianMatcher:
    return HungarianMatcher(cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou, focal_alpha=focal_alpha)
