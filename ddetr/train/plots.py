"""The pictures of an evaluation: precision-recall curves, a confusion matrix, and validation images with the model's
detections drawn over the true boxes.

Each function returns PNG bytes: the caller writes them where they go (a run folder, a local or object storage path,
through `ddetr.io`; an experiment tracker; TensorBoard). The numbers come from `coco_eval.Evaluation` (COCOeval's own
arrays) and `confusion.confusion_matrix`.
"""

from __future__ import annotations

import io as _io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddetr.data.coco_eval import Evaluation
from ddetr.data.confusion import confusion_matrix

PR_CURVES = "pr_curves.png"
CONFUSION_MATRIX = "confusion_matrix.png"
PER_CLASS = "per_class.md"
IMAGES_DIR = "images"
IOU = 0.5  # of the PR curves and the confusion matrix: AP50's, where a class's curve is easiest to read
SCORE = 0.3  # lowest score counted in the confusion matrix and drawn on the images
LEGEND_CLASSES = 20  # more classes than this get no legend entry each: the mean curve and the table tell them


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    _pyplot().close(fig)
    return buffer.getvalue()


def pr_curves_png(evaluation: Evaluation) -> bytes:
    """Precision against recall at IoU 0.5 (every area, 100 detections per image) of each class with ground truth,
    labelled with its AP50, and their mean (the curve whose area is the run's AP50)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5.5))
    curves = {name: c for name, c in evaluation.precision50.items() if not np.isnan(c).all()}
    few = len(curves) <= LEGEND_CLASSES
    for name, curve in curves.items():
        ap50 = evaluation.per_class[name]["AP50"]
        ax.plot(evaluation.recall, curve, lw=1.2 if few else 0.6, alpha=0.9 if few else 0.35,
                label=f"{name} {ap50:.3f}" if few else None)  # fmt: skip
    if curves:
        mean = np.nanmean(np.stack(list(curves.values())), axis=0)
        ax.plot(evaluation.recall, mean, color="black", lw=2.5, label=f"all classes {evaluation.stats['AP50']:.3f}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=f"precision-recall at IoU {IOU} (legend: AP50)")  # fmt: skip
    ax.legend(loc="lower left", fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def confusion_matrix_png(evaluation: Evaluation, coco_gt: Any) -> bytes:
    """The confusion matrix at IoU 0.5 of the detections scoring at least `SCORE` (`confusion.confusion_matrix`):
    colour is the share of each true class's row, the numbers are counts."""
    matrix, names = confusion_matrix(coco_gt, evaluation.detections, evaluation.image_ids, IOU, SCORE)
    plt = _pyplot()
    n = len(names)
    side = min(20.0, 3.0 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= 30:  # beyond, the numbers no longer fit their cells
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                        color="white" if shares[i, j] > 0.5 else "black")  # fmt: skip
    ticks = range(n) if n <= 60 else []
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90)
    ax.set_yticks(ticks, [names[i] for i in ticks])
    ax.set(xlabel="predicted", ylabel="true", title=f"confusion matrix (IoU {IOU}, score >= {SCORE})")
    fig.tight_layout()
    return _png(fig)


def evaluation_files(evaluation: Evaluation, coco_gt: Any) -> dict[str, bytes]:
    """{file name: bytes} of an evaluation's files: `PR_CURVES`, `CONFUSION_MATRIX` and the `PER_CLASS` table."""
    return {
        PR_CURVES: pr_curves_png(evaluation),
        CONFUSION_MATRIX: confusion_matrix_png(evaluation, coco_gt),
        PER_CLASS: evaluation.table().encode(),
    }


def first_images_with_objects(split_dir: str, count: int) -> list[tuple[int, np.ndarray]]:
    """(image id, (H, W, 3) uint8 RGB pixels) of the first `count` images of a split that hold a box, in shard
    order: the same images at every epoch, so that drawings compare. Reads shards only until it has them."""
    from ddetr.data.decode import decode_rgb
    from ddetr.data.shards import read_metadata, read_shard, shard_uris

    found: list[tuple[int, np.ndarray]] = []
    if count <= 0:
        return found
    for uri in shard_uris(split_dir, read_metadata(split_dir)):
        ids = read_shard(uri, ["image_id", "boxes"]).to_pydict()
        rows = [i for i, boxes in enumerate(ids["boxes"]) if boxes][: count - len(found)]
        if rows:
            table = read_shard(uri, ["image_id", "image"]).take(rows).to_pydict()
            found += [(int(i), decode_rgb(data)) for i, data in zip(table["image_id"], table["image"], strict=True)]
        if len(found) >= count:
            break
    return found


def drawn_images_png(
    images: list[tuple[int, np.ndarray]], evaluation: Evaluation, coco_gt: Any, threshold: float = SCORE
) -> dict[int, bytes]:
    """{image id: PNG} of `images` with the evaluation's detections scoring at least `threshold` drawn by class name
    (`inference.draw_detections`), over the true boxes (thin, white)."""
    from ddetr.inference import draw_detections

    by_image: dict[int, list[dict[str, Any]]] = {}
    for d in evaluation.detections:
        by_image.setdefault(int(d["image_id"]), []).append(d)
    out = {}
    with tempfile.TemporaryDirectory(prefix="ddetr-draw-") as scratch:  # draw_detections writes a file: read back
        for image_id, pixels in images:
            dets = by_image.get(image_id, [])
            xywh = torch.tensor([d["bbox"] for d in dets], dtype=torch.float32).reshape(-1, 4)
            detections = {
                "scores": torch.tensor([d["score"] for d in dets], dtype=torch.float32),
                "labels": torch.tensor([d["category_id"] for d in dets], dtype=torch.int64),
                "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
            }
            anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id]))
            truth = [(x, y, x + w, y + h) for x, y, w, h in (a["bbox"] for a in anns)]
            path = Path(scratch, f"{image_id}.png")
            draw_detections(pixels, detections, path, names=evaluation.names, threshold=threshold, truth=truth)
            out[image_id] = path.read_bytes()
    return out
