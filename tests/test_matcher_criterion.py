"""Matcher against brute force, focal loss against a float64 hand formula, box ops, criterion outputs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ddetr.models.box_ops import box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, generalized_box_iou
from ddetr.models.criterion import SetCriterion, build_weight_dict, sigmoid_focal_loss
from ddetr.models.matcher import HungarianMatcher


def random_boxes(n: int) -> torch.Tensor:
    """(n, 4) valid cxcywh boxes inside the unit square."""
    xy0 = torch.rand(n, 2) * 0.6
    wh = torch.rand(n, 2) * 0.35 + 0.05
    return box_xyxy_to_cxcywh(torch.cat([xy0, xy0 + wh], 1))


def hand_cost(logit: float, box: torch.Tensor, tgt_box: torch.Tensor, w=(2.0, 5.0, 2.0)) -> float:
    """The matching cost of one (query, target) pair in float64, written from the definition."""
    p = 1 / (1 + math.exp(-logit))
    pos = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8)
    neg = 0.75 * p**2 * -math.log(1 - p + 1e-8)
    l1 = float((box.double() - tgt_box.double()).abs().sum())
    a, b = box_cxcywh_to_xyxy(box.double()).tolist(), box_cxcywh_to_xyxy(tgt_box.double()).tolist()
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    giou = inter / union - (hull - union) / hull
    return w[0] * (pos - neg) + w[1] * l1 - w[2] * giou


@pytest.mark.parametrize("seed", range(4))
def test_matcher_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    B, Q, K = 2, 5, 4
    outputs = {"pred_logits": torch.randn(B, Q, K, generator=g) * 2, "pred_boxes": random_boxes(B * Q).view(B, Q, 4)}
    targets = [{"labels": torch.randint(0, K, (n,), generator=g), "boxes": random_boxes(n)} for n in (3, 2)]
    matcher = HungarianMatcher()
    indices = matcher(outputs, targets)
    for b, ((qi, tj), t) in enumerate(zip(indices, targets, strict=True)):
        n = len(t["boxes"])
        cost = torch.tensor(
            [
                [
                    hand_cost(
                        float(outputs["pred_logits"][b, q, t["labels"][j]]), outputs["pred_boxes"][b, q], t["boxes"][j]
                    )
                    for j in range(n)
                ]
                for q in range(Q)
            ],
            dtype=torch.float64,
        )
        best = min(sum(cost[q, j] for j, q in enumerate(perm)) for perm in itertools.permutations(range(Q), n))
        got = sum(cost[q, j] for q, j in zip(qi.tolist(), tj.tolist(), strict=True))
        assert len(qi) == n and sorted(tj.tolist()) == list(range(n)) and len(set(qi.tolist())) == n
        assert got == pytest.approx(float(best), abs=1e-4)
        # The matcher's own cost matrix agrees with the hand formula.
        torch.testing.assert_close(
            matcher.cost_matrix(outputs, targets)[b][:, sum(len(x["boxes"]) for x in targets[:b]) :][:, :n].double(),
            cost,
            atol=1e-4,
            rtol=1e-4,
        )


def test_matcher_with_empty_targets():
    outputs = {"pred_logits": torch.randn(2, 4, 3), "pred_boxes": random_boxes(8).view(2, 4, 4)}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    one = {"labels": torch.tensor([2]), "boxes": random_boxes(1)}
    for targets in ([empty, empty], [empty, one]):
        indices = HungarianMatcher()(outputs, targets)
        assert [len(i) for i, _ in indices] == [len(t["boxes"]) for t in targets]
        assert all(i.dtype == torch.int64 and j.dtype == torch.int64 for i, j in indices)


def test_focal_loss_equals_hand_formula():
    logits = torch.randn(2, 3, 4, dtype=torch.float64) * 3
    targets = (torch.rand(2, 3, 4) > 0.7).double()
    expected = 0.0
    for b, q, k in itertools.product(range(2), range(3), range(4)):
        x, t = float(logits[b, q, k]), float(targets[b, q, k])
        p = 1 / (1 + math.exp(-x))
        ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
        p_t = p * t + (1 - p) * (1 - t)
        alpha_t = 0.25 * t + 0.75 * (1 - t)
        expected += alpha_t * ce * (1 - p_t) ** 2 / 3  # mean over the 3 queries
    got = sigmoid_focal_loss(logits, targets, num_boxes=5.0)
    assert float(got) == pytest.approx(expected / 5.0, rel=1e-10)


def test_box_conversions_round_trip_and_giou_properties():
    boxes = random_boxes(20)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes)
    a, b = box_cxcywh_to_xyxy(random_boxes(7)), box_cxcywh_to_xyxy(random_boxes(9))
    g = generalized_box_iou(a, b)
    torch.testing.assert_close(g, generalized_box_iou(b, a).T)
    assert ((g >= -1) & (g <= 1)).all()
    torch.testing.assert_close(torch.diag(generalized_box_iou(a, a)), torch.ones(7))
    assert (g <= box_iou(a, b)[0] + 1e-6).all()  # GIoU never exceeds IoU
    # Two unit squares side by side with a gap of 1: IoU 0, hull 3, union 2 -> GIoU = -1/3.
    sq = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(generalized_box_iou(sq, sq + torch.tensor([2.0, 0, 2.0, 0])), torch.tensor([[-1 / 3]]))
    with pytest.raises(ValueError, match="degenerate"):
        generalized_box_iou(torch.tensor([[1.0, 1.0, 0.0, 0.0]]), sq)


def make_criterion(num_classes: int = 5, dec_layers: int = 3, two_stage: bool = False) -> SetCriterion:
    weights = build_weight_dict(2.0, 5.0, 2.0, dec_layers, aux_loss=True, two_stage=two_stage)
    return SetCriterion(num_classes, HungarianMatcher(), weights)


def test_criterion_keys_weights_and_perfect_boxes():
    B, Q, K = 2, 6, 5
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": random_boxes(2)},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    ]
    boxes = random_boxes(B * Q).view(B, Q, 4)
    boxes[0, 2], boxes[0, 4] = targets[0]["boxes"]
    logits = torch.full((B, Q, K), -8.0)
    logits[0, 2, 1], logits[0, 4, 3] = 8.0, 8.0
    out = {"pred_logits": logits, "pred_boxes": boxes}
    aux = [{"pred_logits": logits.clone(), "pred_boxes": boxes.clone()} for _ in range(2)]
    enc = {"pred_logits": torch.randn(B, 10, K), "pred_boxes": random_boxes(B * 10).view(B, 10, 4)}
    crit = make_criterion(K, dec_layers=3, two_stage=True)
    losses = crit({**out, "aux_outputs": aux, "enc_outputs": enc}, targets)
    assert float(losses["loss_bbox"]) == pytest.approx(0.0, abs=1e-6)
    assert float(losses["loss_giou"]) == pytest.approx(0.0, abs=1e-6)
    assert float(losses["class_error"]) == 0.0
    assert float(losses["loss_ce"]) < 1e-3
    assert {"loss_ce_0", "loss_bbox_1", "loss_giou_enc", "cardinality_error_enc"} <= set(losses)
    assert "class_error_0" not in losses
    assert set(crit.weight_dict) == {
        f"{n}{s}" for n in ("loss_ce", "loss_bbox", "loss_giou") for s in ("", "_0", "_1", "_enc")
    }
    expected = sum(losses[k] * w for k, w in crit.weight_dict.items())
    torch.testing.assert_close(crit.total_loss(losses), expected)


def test_loss_ce_is_focal_times_queries_over_num_boxes():
    B, Q, K = 1, 4, 3
    logits = torch.randn(B, Q, K)
    boxes = random_boxes(Q).view(B, Q, 4)
    targets = [{"labels": torch.tensor([2]), "boxes": boxes[0, 1:2].clone()}]
    crit = make_criterion(K)
    ((qi, tj),) = crit.matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    onehot = torch.zeros(B, Q, K)
    onehot[0, qi, 2] = 1
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, targets)
    torch.testing.assert_close(losses["loss_ce"], sigmoid_focal_loss(logits, onehot, 1.0) * Q)


def test_criterion_with_no_targets_anywhere_is_finite():
    out = {"pred_logits": torch.randn(2, 4, 3, requires_grad=True), "pred_boxes": random_boxes(8).view(2, 4, 4)}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    losses = make_criterion(3)(out, [empty, empty])
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["loss_bbox"]) == 0.0
    losses["loss_ce"].backward()
