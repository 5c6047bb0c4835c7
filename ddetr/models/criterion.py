"""Set-prediction losses: sigmoid focal loss for classes, L1 and GIoU for boxes, on Hungarian-matched pairs."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ddetr.models import box_ops
from ddetr.models.hybrid import repeat_targets
from ddetr.models.matcher import HungarianMatcher


def sigmoid_focal_loss(
    inputs: torch.Tensor, targets: torch.Tensor, num_boxes: float, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) of independent sigmoid logits, averaged over queries, summed over the rest.

    Args:
        inputs: (B, Q, K) logits; targets: (B, Q, K) 0/1 of the same dtype.
        num_boxes: normaliser (number of target boxes).
        alpha: weight of positives (negatives get 1 - alpha); negative disables weighting.
        gamma: focusing exponent: the (1 - p_t)^gamma factor down-weights easy examples.

    Returns:
        scalar: sum over B and K of the mean over Q, divided by num_boxes.
    """
    prob = inputs.sigmoid()
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce_loss * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_boxes


class SetCriterion(nn.Module):
    """Match predictions to targets, then compute the losses of every output (final, auxiliary, encoder).

    Args:
        num_classes: K.
        matcher: the Hungarian matcher.
        weight_dict: loss name -> weight, for `total_loss` (see `build_weight_dict`).
        focal_alpha: alpha of the focal loss.
        one_to_many_repeat: K, how many times hybrid matching's one-to-many group sees each target (0: the model
            has no such group).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        focal_alpha: float = 0.25,
        one_to_many_repeat: int = 0,
    ) -> None:
        super().__init__()
        self.num_classes, self.matcher, self.weight_dict = num_classes, matcher, weight_dict
        self.focal_alpha, self.one_to_many_repeat = focal_alpha, one_to_many_repeat

    @staticmethod
    def _src_permutation_idx(indices: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch index, query index) of every matched pair, for advanced indexing into (B, Q, ...)."""
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    def loss_labels(
        self, outputs: dict, targets: list[dict], indices: list, num_boxes: float, log: bool = True
    ) -> dict[str, torch.Tensor]:
        """ "loss_ce": focal loss against one-hot targets (all-zero rows for unmatched queries), times Q as in
        the official release; "class_error" (log only): 100 - top-1 accuracy of the matched queries, in %."""
        src_logits = outputs["pred_logits"]  # (B, Q, K)
        idx = self._src_permutation_idx(indices)
        target_classes_o = torch.cat([t["labels"][J] for t, (_, J) in zip(targets, indices, strict=True)])
        target_classes_o = target_classes_o.to(src_logits.device)
        onehot = torch.zeros_like(src_logits)
        onehot[idx[0], idx[1], target_classes_o] = 1.0
        loss_ce = sigmoid_focal_loss(src_logits, onehot, num_boxes, alpha=self.focal_alpha, gamma=2.0)
        losses = {"loss_ce": loss_ce * src_logits.shape[1]}
        if log:
            if len(target_classes_o) == 0:
                losses["class_error"] = src_logits.new_zeros(())
            else:
                correct = (src_logits[idx].argmax(-1) == target_classes_o).float().mean()
                losses["class_error"] = 100.0 - 100.0 * correct
        return losses

    @torch.no_grad()
    def loss_cardinality(
        self, outputs: dict, targets: list[dict], indices: list, num_boxes: float
    ) -> dict[str, torch.Tensor]:
        """ "cardinality_error": L1 between the target count and the count of queries whose top class is not
        the last one. A logging aid inherited from DETR (the official release logs it the same way), no gradient."""
        logits = outputs["pred_logits"]
        tgt_lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device, dtype=torch.float)
        card_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
        return {"cardinality_error": F.l1_loss(card_pred, tgt_lengths)}

    def loss_boxes(
        self, outputs: dict, targets: list[dict], indices: list, num_boxes: float
    ) -> dict[str, torch.Tensor]:
        """ "loss_bbox": L1 of matched cxcywh boxes; "loss_giou": 1 - GIoU; both summed and divided by num_boxes."""
        idx = self._src_permutation_idx(indices)
        src_boxes = outputs["pred_boxes"][idx]  # (N, 4)
        target_boxes = torch.cat([t["boxes"][J] for t, (_, J) in zip(targets, indices, strict=True)]).to(src_boxes)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none").sum() / num_boxes
        giou = torch.diag(
            box_ops.generalized_box_iou(box_ops.box_cxcywh_to_xyxy(src_boxes), box_ops.box_cxcywh_to_xyxy(target_boxes))
        )
        return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}

    @staticmethod
    def count_boxes(targets: list[dict], device: torch.device) -> float:
        """Target boxes averaged over workers (at least 1), so every worker's gradient has one scale."""
        num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)
            world_size = dist.get_world_size()
        return torch.clamp(num_boxes / world_size, min=1).item()

    def _losses(self, outputs: dict, targets: list[dict], num_boxes: float, log: bool) -> dict[str, torch.Tensor]:
        indices = self.matcher(outputs, targets)
        losses = self.loss_labels(outputs, targets, indices, num_boxes, log=log)
        losses.update(self.loss_cardinality(outputs, targets, indices, num_boxes))
        losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        return losses

    def forward(self, outputs: dict, targets: list[dict], num_boxes: float | None = None) -> dict[str, torch.Tensor]:
        """
        Args:
            outputs: the model's dict ("pred_logits", "pred_boxes", optional "aux_outputs", "enc_outputs").
            targets: B dicts with "labels" (T_b,) int64 and "boxes" (T_b, 4) normalised cxcywh.
            num_boxes: the normaliser; None counts the targets (averaged over workers). Gradient accumulation
                passes the count of the whole accumulated batch, so that the summed micro-batch losses equal
                the loss of that batch.

        Returns:
            "loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error"; the same with suffix `_i`
            per auxiliary output (no class_error) and `_enc` for the two-stage encoder proposals; with a
            "one_to_many" output (hybrid matching), the final and auxiliary ones again with suffix `_one2many`.
        """
        if num_boxes is None:
            num_boxes = self.count_boxes(targets, outputs["pred_logits"].device)

        losses = self._layer_losses(outputs, targets, num_boxes, log=True)
        if "enc_outputs" in outputs:
            # The first stage is class-agnostic: every target is "object" (class 0).
            bin_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            enc = self._losses(outputs["enc_outputs"], bin_targets, num_boxes, log=False)
            losses.update({f"{k}_enc": v for k, v in enc.items()})
        if "one_to_many" in outputs:
            if self.one_to_many_repeat < 1:
                raise ValueError(
                    "the model has a one-to-many group but the criterion repeats no targets for it: build both from "
                    "one config (loss.one_to_many_queries and loss.one_to_many_repeat)"
                )
            # Each target K times, normalised by the K-fold count (as H-DETR's separate criterion call does). The
            # encoder's proposals are left out, as in H-DETR: they are trained once, one-to-one.
            many = self._layer_losses(
                outputs["one_to_many"],
                repeat_targets(targets, self.one_to_many_repeat),
                num_boxes * self.one_to_many_repeat,
                log=False,
            )
            losses.update({f"{k}_one2many": v for k, v in many.items()})
        return losses

    def _layer_losses(self, outputs: dict, targets: list[dict], num_boxes: float, log: bool) -> dict[str, torch.Tensor]:
        """The losses of the last decoder layer's outputs, and those of `outputs["aux_outputs"]` with suffix `_i`."""
        losses = self._losses(outputs, targets, num_boxes, log=log)
        for i, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            aux = self._losses(aux_outputs, targets, num_boxes, log=False)
            losses.update({f"{k}_{i}": v for k, v in aux.items()})
        return losses

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the losses named in `weight_dict` (the logged metrics are not in it)."""
        return sum(losses[k] * w for k, w in self.weight_dict.items() if k in losses)


def build_weight_dict(
    cls_loss_coef: float,
    bbox_loss_coef: float,
    giou_loss_coef: float,
    dec_layers: int,
    aux_loss: bool = True,
    two_stage: bool = False,
    one_to_many_weight: float = 0.0,
) -> dict[str, float]:
    """Loss weights: the final layer's, the same for aux outputs `_0`..`_{dec_layers-2}`, and `_enc` (two-stage);
    with `one_to_many_weight` > 0 (hybrid matching), the final and aux ones again with suffix `_one2many`, times it."""
    base = {"loss_ce": cls_loss_coef, "loss_bbox": bbox_loss_coef, "loss_giou": giou_loss_coef}
    layers = dict(base)
    if aux_loss:
        for i in range(dec_layers - 1):
            layers.update({f"{k}_{i}": v for k, v in base.items()})
    weight_dict = dict(layers)
    if two_stage:
        weight_dict.update({f"{k}_enc": v for k, v in base.items()})
    if one_to_many_weight > 0:
        weight_dict.update({f"{k}_one2many": v * one_to_many_weight for k, v in layers.items()})
    return weight_dict
