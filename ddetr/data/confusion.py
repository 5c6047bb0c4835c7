"""The confusion matrix of a detector at one IoU and score threshold, with a background class (COCOeval has none).

It answers what AP does not: which classes the model mistakes for which, and how many objects it misses or invents.
Boxes are COCO's (xywh); the IoU is pycocotools' own `maskUtils.iou`, the one COCOeval uses, imported on first use
(as `coco_eval` does) so that importing this module needs no pycocotools.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ddetr.data.coco_eval import category_names

if TYPE_CHECKING:
    from pycocotools.coco import COCO

BACKGROUND = "background"


def confusion_matrix(
    coco_gt: COCO,
    detections: list[dict[str, Any]],
    image_ids: list[int],
    iou_threshold: float = 0.5,
    score_threshold: float = 0.3,
) -> tuple[np.ndarray, list[str]]:
    """Counts of true class against predicted class at one IoU and score threshold, with a background class.

    In each image, the detections scoring at least `score_threshold` are taken best first; each is matched to the
    unmatched ground-truth box (not crowd) of its own class with the highest IoU of at least `iou_threshold`, else to
    the unmatched one of any class with the highest such IoU (a confusion), else it is a false positive (true class:
    background) unless it overlaps a crowd region that much (then it is left out, as COCOeval ignores it). A
    ground-truth box left unmatched is a miss (predicted class: background). Detections of a category the ground
    truth does not have are left out.

    Returns:
        ((K + 1, K + 1) int64 counts, rows the true class and columns the predicted one, index K the background;
        the K class names in category id order, then "background").
    """
    names = category_names(coco_gt)
    index = {cat_id: i for i, cat_id in enumerate(names)}
    k = len(names)
    matrix = np.zeros((k + 1, k + 1), dtype=np.int64)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for d in detections:
        if d["score"] >= score_threshold and int(d["category_id"]) in index:
            by_image.setdefault(int(d["image_id"]), []).append(d)
    for image_id in image_ids:
        anns = [a for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id])) if int(a["category_id"]) in index]
        truth = [a for a in anns if not a.get("iscrowd", 0)]
        crowd = [a for a in anns if a.get("iscrowd", 0)]
        dets = sorted(by_image.get(int(image_id), []), key=lambda d: -d["score"])
        true_cls = np.array([index[int(a["category_id"])] for a in truth], dtype=np.int64)
        matched = np.zeros(len(truth), dtype=bool)
        boxes = [d["bbox"] for d in dets]
        ious = _iou(boxes, [a["bbox"] for a in truth], crowd=False)  # (D, G)
        crowd_ious = _iou(boxes, [a["bbox"] for a in crowd], crowd=True)  # (D, C): the share of a det in the region
        for i, d in enumerate(dets):
            cls = index[int(d["category_id"])]
            free = ious[i] * ~matched
            same = np.where(true_cls == cls, free, 0.0)
            j = int(np.argmax(same)) if same.size and same.max() >= iou_threshold else -1
            if j < 0 and free.size and free.max() >= iou_threshold:
                j = int(np.argmax(free))
            if j >= 0:
                matched[j] = True
                matrix[true_cls[j], cls] += 1
            elif not (crowd_ious.size and crowd_ious[i].max() >= iou_threshold):
                matrix[k, cls] += 1
        for j in np.flatnonzero(~matched):
            matrix[true_cls[j], k] += 1
    return matrix, [*names.values(), BACKGROUND]


def _iou(dets: list[list[float]], truth: list[list[float]], crowd: bool) -> np.ndarray:
    """(D, G) IoU of xywh boxes by pycocotools' own `maskUtils.iou` (for a crowd region: the share of the detection
    inside it, as COCOeval counts it)."""
    if not dets or not truth:
        return np.zeros((len(dets), len(truth)))
    from pycocotools import mask as mask_utils  # here, not at the top: see coco_eval.coco_api

    return np.asarray(mask_utils.iou(dets, truth, [int(crowd)] * len(truth))).reshape(len(dets), len(truth))
