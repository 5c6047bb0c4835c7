"""COCO box evaluation (pycocotools COCOeval, iouType "bbox") over post-processed predictions.

The ground truth comes from the shards and their ``dataset.json`` (``coco_from_shards``), so a
cluster node needs no annotation json; ``coco_from_json`` reads an instances file instead. Numbers
are pycocotools' own: the evaluator only converts boxes (xyxy -> xywh), maps labels back to category
ids when the model uses contiguous labels, and gathers predictions from every rank. Per-class AP and the
precision-recall curves are read from COCOeval's own accumulated ``eval["precision"]`` array (`Evaluation`); the
confusion matrix, which COCOeval has none of, is `confusion.py`'s.

pycocotools is imported when a ground truth is first built or evaluated (`coco_api`), not with this module: training
without evaluation, and everything that imports this module on the way, runs where pycocotools is not installed.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

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
# What the per-class table holds for each category: COCOeval's first six numbers, one category at a time.
PER_CLASS_STATS = STAT_NAMES[:6]
# The lowest score of the detections an `Evaluation` keeps (for the confusion matrix and the drawings, which count
# from 0.3): all of them, 100 per image, would hold hundreds of MB of a COCO-sized split until the next evaluation.
KEEP_SCORE = 0.1
MISSING_PYCOCOTOOLS = "evaluation needs pycocotools: pip install pycocotools"

if TYPE_CHECKING:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval


class MissingPycocotoolsError(ImportError):
    """pycocotools is not installed where an evaluation was asked for; the message says what to install."""


def coco_api() -> tuple[type[COCO], type[COCOeval]]:
    """pycocotools' `COCO` and `COCOeval` classes, imported on first use.

    Raises:
        MissingPycocotoolsError: pycocotools cannot be imported (`MISSING_PYCOCOTOOLS`, then why).
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as err:
        raise MissingPycocotoolsError(f"{MISSING_PYCOCOTOOLS} ({err})") from err
    return COCO, COCOeval


def coco_from_dict(dataset: dict[str, Any]) -> COCO:
    """A pycocotools ``COCO`` over an in-memory instances dict (keys images, annotations, categories)."""
    COCO, _ = coco_api()
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_from_json(path: str) -> COCO:
    """The ground truth of an instances json file."""
    COCO, _ = coco_api()
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
        self.last: Evaluation | None = None  # the latest `summarize`'s per-class results, on rank 0

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
        is captured into ``self.summary_text`` instead. On rank 0 (or without a group) ``self.last`` holds the
        pass's `Evaluation` (per-class numbers, PR curves, the gathered detections); None elsewhere, or when there
        were no detections.
        """
        predictions = self.gather()
        result: list[tuple[dict[str, float], str] | None] = [None]
        self.last = None
        if predictions is not None:
            detections = [d for dets in predictions.values() for d in dets]
            if detections:
                ev, text = run_cocoeval(self.coco_gt, detections, sorted(predictions))
                self.last = Evaluation.of(ev, self.coco_gt, detections)
                result[0] = (self.last.stats, text)
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
    ev, text = run_cocoeval(coco_gt, detections, image_ids)
    return _stats(ev), text


def run_cocoeval(coco_gt: COCO, detections: list[dict[str, Any]], image_ids: list[int]) -> tuple[COCOeval, str]:
    """COCOeval (bbox) evaluated, accumulated and summarized over `image_ids`; with the table it printed."""
    _, COCOeval = coco_api()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco_dt = coco_gt.loadRes(detections)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev, out.getvalue()


def _stats(ev: COCOeval) -> dict[str, float]:
    return {name: float(v) for name, v in zip(STAT_NAMES, ev.stats, strict=True)}


def category_names(coco_gt: COCO) -> dict[int, str]:
    """{category id: name}, in id order; a name two categories share gets its id appended, so keys stay apart."""
    cats = sorted(coco_gt.loadCats(coco_gt.getCatIds()), key=lambda c: c["id"])
    counts: dict[str, int] = {}
    for c in cats:
        counts[str(c["name"])] = counts.get(str(c["name"]), 0) + 1
    return {int(c["id"]): str(c["name"]) if counts[str(c["name"])] == 1 else f"{c['name']} ({c['id']})" for c in cats}


@dataclass
class Evaluation:
    """One COCOeval pass beyond its twelve numbers, read from COCOeval's accumulated arrays.

    Attributes:
        stats: {STAT_NAMES: value}, as `evaluate_detections` returns.
        names: {category id: name} of the ground truth (`category_names`), in id order.
        per_class: {name: {PER_CLASS_STATS: value}}: AP averaged over IoU 0.50:0.95 and the 101 recall thresholds
            (AP50 / AP75 at one IoU, AP_small... over one area range) at 100 detections per image, exactly as
            COCOeval.summarize averages, but per category. NaN where the category has no ground truth in that
            area range of the evaluated images (COCOeval's -1).
        instances: {name: number of ground-truth boxes (not crowd) in the evaluated images}.
        recall: (R,) COCOeval's recall thresholds (0, 0.01, ... 1).
        precision50: {name: (R,)} the interpolated precision at each recall threshold, IoU 0.5, every area, 100
            detections: the PR curve; NaN for a category without ground truth.
        detections: the COCO results evaluated ({"image_id", "category_id", "bbox": xywh, "score"}) that score at
            least `keep_score`.
        image_ids: the images evaluated.
    """

    stats: dict[str, float]
    names: dict[int, str]
    per_class: dict[str, dict[str, float]]
    instances: dict[str, int]
    recall: np.ndarray
    precision50: dict[str, np.ndarray]
    detections: list[dict[str, Any]]
    image_ids: list[int]

    @classmethod
    def of(
        cls, ev: COCOeval, coco_gt: COCO, detections: list[dict[str, Any]], keep_score: float = KEEP_SCORE
    ) -> Evaluation:
        """The `Evaluation` of an accumulated COCOeval (`run_cocoeval`) over `detections`."""
        p = ev.params
        precision = ev.eval["precision"]  # (T IoU thresholds, R recall thresholds, K categories, A areas, M maxDets)
        m = p.maxDets.index(100) if 100 in p.maxDets else len(p.maxDets) - 1
        t50, t75 = (int(np.argmin(np.abs(p.iouThrs - iou))) for iou in (0.5, 0.75))
        areas = {label: i for i, label in enumerate(p.areaRngLbl)}  # all, small, medium, large

        def mean(values: np.ndarray) -> float:
            valid = values[values > -1]  # -1: no ground truth there (COCOeval's own mark)
            return float(valid.mean()) if valid.size else math.nan

        names = category_names(coco_gt)
        per_class, curves = {}, {}
        for k, cat_id in enumerate(p.catIds):
            name = names[int(cat_id)]
            per_class[name] = {
                "AP": mean(precision[:, :, k, areas["all"], m]),
                "AP50": mean(precision[t50, :, k, areas["all"], m]),
                "AP75": mean(precision[t75, :, k, areas["all"], m]),
                "AP_small": mean(precision[:, :, k, areas["small"], m]),
                "AP_medium": mean(precision[:, :, k, areas["medium"], m]),
                "AP_large": mean(precision[:, :, k, areas["large"], m]),
            }
            curve = precision[t50, :, k, areas["all"], m].astype(np.float64)
            curves[name] = np.where(curve > -1, curve, np.nan)
        image_ids = [int(i) for i in p.imgIds]
        instances = dict.fromkeys(names.values(), 0)
        for ann in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=image_ids)):
            if not ann.get("iscrowd", 0) and int(ann["category_id"]) in names:
                instances[names[int(ann["category_id"])]] += 1
        kept = [d for d in detections if d["score"] >= keep_score]
        return cls(_stats(ev), names, per_class, instances, np.asarray(p.recThrs), curves, kept, image_ids)

    def table(self) -> str:
        """The per-class numbers as a Markdown table, a row per category (in id order) and one of every class."""
        head = ["class", "boxes", *PER_CLASS_STATS]
        rows = [[name, str(self.instances.get(name, 0)), *(_cell(v[s]) for s in PER_CLASS_STATS)]
                for name, v in self.per_class.items()]  # fmt: skip
        rows.append(["all", str(sum(self.instances.values())), *(_cell(self.stats[s]) for s in PER_CLASS_STATS)])
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

        def line(cells: list[str]) -> str:
            padded = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
            return "| " + " | ".join(padded) + " |"

        rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
        return "\n".join([line(head), rule, *map(line, rows)]) + "\n"

    def metrics(self) -> dict[str, float]:
        """The per-class numbers as flat metrics "<stat>/<class name>" (AP/person, AP50/person, ...); a NaN left out."""
        return {
            f"{s}/{name}": v[s] for name, v in self.per_class.items() for s in PER_CLASS_STATS if not math.isnan(v[s])
        }


def _cell(value: float) -> str:
    return "-" if math.isnan(value) or value < 0 else f"{value:.3f}"  # COCOeval's -1: nothing to measure


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
