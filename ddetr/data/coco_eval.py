"""COCO box evaluation (pycocotools COCOeval, iouType "bbox") over post-processed predictions.

The ground truth comes from the shards and their ``dataset.json`` (``coco_from_shards``), so a
cluster node needs no annotation json; ``coco_from_json`` reads an instances file instead. Numbers
are pycocotools' own: the evaluator only converts boxes (xyxy -> xywh), maps labels back to category
ids when the model uses contiguous labels, and gathers predictions from every rank.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ddetr.data.shards import ANNOTATION_COLUMNS, read_metadata, read_shard, shard_uris

# The order of COCOeval.stats.
STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "AP_small",
    "AP_medium",
    "AP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)


def coco_from_dict(dataset: dict[str, Any]) -> COCO:
    """A pycocotools ``COCO`` over an in-memory instances dict (keys images, annotations, categories)."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_from_json(path: str) -> COCO:
    """The ground truth of an instances json file."""
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(path)


def coco_from_shards(split_dir: str) -> COCO:
    """The ground truth of a converted split, read from its shards (image bytes are not read).

    Boxes are those stored in the shards: clipped to the image, invalid ones already removed.
    """
    meta = read_metadata(split_dir)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for uri in shard_uris(split_dir, meta):
        t = read_shard(uri, [*ANNOTATION_COLUMNS, "file_name"]).to_pydict()
        for i, image_id in enumerate(t["image_id"]):
            images.append(
                {"id": image_id, "height": t["height"][i], "width": t["width"][i], "file_name": t["file_name"][i]}
            )
            boxes = np.asarray(t["boxes"][i], dtype=np.float64).reshape(-1, 4)
            for j, ann_id in enumerate(t["ann_id"][i]):
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": t["category_id"][i][j],
                        "bbox": boxes[j].tolist(),
                        "area": float(t["area"][i][j]),
                        "iscrowd": int(t["iscrowd"][i][j]),
                    }
                )
    return coco_from_dict({"images": images, "annotations": annotations, "categories": meta.categories})


class CocoEvaluator:
    """Accumulates detections per image, then runs COCOeval on all of them.

    Args:
        coco_gt: the ground truth (``coco_from_shards`` / ``coco_from_json``).
        label_to_category: maps the model's labels to category ids; None when the model's labels
            are the category ids themselves (the official model: raw COCO ids, 91 classes).
    Usage: ``update(predictions)`` per batch on every rank, then ``summarize()`` on every rank: with a
    process group, rank 0 gathers every rank's detections, runs COCOeval once and sends the numbers to all.
    """

    def __init__(self, coco_gt: COCO, label_to_category: Mapping[int, int] | None = None) -> None:
        self.coco_gt = coco_gt
        self.label_to_category = dict(label_to_category) if label_to_category is not None else None
        self.predictions: dict[int, list[dict[str, Any]]] = {}
        self.summary_text = ""

    @classmethod
    def from_shards(cls, split_dir: str, label_to_category: Mapping[int, int] | None = None) -> CocoEvaluator:
        """An evaluator whose ground truth is a converted split (``coco_from_shards``)."""
        return cls(coco_from_shards(split_dir), label_to_category)

    def evaluate(self, predictions: Mapping[int, Mapping[str, Any]]) -> dict[str, float]:
        """One pass: forget earlier updates, add ``predictions`` (this rank's), gather, summarize."""
        self.predictions = {}
        self.update(predictions)
        return self.summarize()

    def update(self, predictions: Mapping[int, Mapping[str, Any]]) -> None:
        """Add detections: ``{image_id: {"scores": (K,), "labels": (K,), "boxes": (K, 4)}}``.

        Boxes are xyxy in pixels of the original image (tensors or arrays). An image given with
        K = 0 still counts as evaluated. A repeated image id replaces the earlier entry.
        """
        for image_id, pred in predictions.items():
            scores = _numpy(pred["scores"]).reshape(-1)
            labels = _numpy(pred["labels"]).reshape(-1).astype(np.int64)
            boxes = _numpy(pred["boxes"]).reshape(-1, 4).astype(np.float64)
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
            self.predictions[int(image_id)] = [
                {
                    "image_id": int(image_id),
                    "category_id": self._category(int(label)),
                    "bbox": [float(v) for v in box],
                    "score": float(score),
                }
                for score, label, box in zip(scores, labels, xywh, strict=True)
            ]

    def _category(self, label: int) -> int:
        if self.label_to_category is None:
            return label
        return self.label_to_category[label]

    def gather(self) -> dict[int, list[dict[str, Any]]] | None:
        """Every rank's detections merged, on rank 0 (None on the other ranks); this rank's without a group."""
        if not _distributed():
            return self.predictions
        parts: list[dict[int, list[dict[str, Any]]] | None] | None = (
            [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        )
        dist.gather_object(self.predictions, parts, dst=0)
        if parts is None:
            return None
        merged: dict[int, list[dict[str, Any]]] = {}
        for part in parts:
            for image_id, dets in (part or {}).items():
                merged.setdefault(image_id, dets)  # a sampler's padding repeats images: keep one
        return merged

    def summarize(self) -> dict[str, float]:
        """COCOeval (bbox) over the gathered detections; keys ``STAT_NAMES`` (AP, AP50, ... AR100 ...).

        Only images that received an ``update`` are evaluated (as DETR's evaluator). The table COCOeval prints
        is captured into ``self.summary_text`` instead.
        """
        predictions = self.gather()
        result: list[tuple[dict[str, float], str] | None] = [None]
        if predictions is not None:
            detections = [d for dets in predictions.values() for d in dets]
            if detections:
                result[0] = evaluate_detections(self.coco_gt, detections, sorted(predictions))
            else:
                result[0] = ({name: 0.0 for name in STAT_NAMES}, "no detections\n")
        if _distributed():
            dist.broadcast_object_list(result, src=0)
        stats, self.summary_text = result[0]
        return stats


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def evaluate_detections(
    coco_gt: COCO, detections: list[dict[str, Any]], image_ids: list[int]
) -> tuple[dict[str, float], str]:
    """COCOeval (bbox) of COCO-format detections (image_id, category_id, bbox xywh, score).

    Returns:
        ({STAT_NAMES: value}, the summary table COCOeval printed).
    """
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco_dt = coco_gt.loadRes(detections)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) for name, v in zip(STAT_NAMES, ev.stats, strict=True)}, out.getvalue()


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
