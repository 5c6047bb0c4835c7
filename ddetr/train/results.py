"""What a run shows beyond its scalars, written by rank 0 at each evaluation: the per-class AP table, the PR curves,
the confusion matrix and a few validation images with their detections drawn; and the run's experiment tracker.

In the run folder (a local folder or a URI, through `ddetr.io`), overwritten at each evaluation so that they are the
last one's at the end of training:

    per_class.md            the per-class table (`Evaluation.table`); also a "per_class" record in metrics.jsonl
    pr_curves.png           precision-recall per class at IoU 0.5 (`plots.pr_curves_png`)
    confusion_matrix.png    at IoU 0.5, with a background row and column (`plots.confusion_matrix_png`)
    images/epoch_003/<image id>.png   the first `train.draw_images` validation images that hold objects, the same
                                      ones at every epoch, so that epochs compare (kept for every evaluated epoch)

The pictures also go to TensorBoard (beside the logbook's scalars) and, with `train.tracker`, to the tracked run.
A picture that cannot be made or written is logged as a warning: it never ends a run.
"""

from __future__ import annotations

import io as _io
import logging
import math
import os
import uuid
from typing import Any

import numpy as np

from ddetr import io
from ddetr.config import Config
from ddetr.data.coco_eval import CocoEvaluator, Evaluation
from ddetr.train.checkpoints import BEST, checkpoint_name, read_pointer
from ddetr.train.logbook import TENSORBOARD_DIR, Logbook
from ddetr.train.plots import IMAGES_DIR, PER_CLASS, drawn_images_png, evaluation_files, first_images_with_objects
from ddetr.train.tracking import Tracker, start_tracker

log = logging.getLogger("ddetr.train")

PER_CLASS_RECORD = "per_class"  # the logbook kind of the per-class numbers ("AP/<class>", "AP50/<class>", ...)


def write_files(folder: str, files: dict[str, bytes]) -> list[str]:
    """Write {relative path: bytes} under a local folder or URI, each under a temporary name renamed into place."""
    paths = []
    for name, data in files.items():
        path = io.join(folder, name)
        io.atomic_write(path, data)
        paths.append(path)
    return paths


def write_evaluation(evaluation: Evaluation, coco_gt: Any, folder: str, split_dir: str, draw: int = 8) -> list[str]:
    """An evaluation's table, PR curves and confusion matrix in `folder` (a local folder or URI), and the first `draw`
    images of the split `split_dir` that hold objects with their detections drawn, in `folder/images/`
    (`ddetr eval --plots`). Returns the paths written."""
    paths = write_files(folder, evaluation_files(evaluation, coco_gt))
    if draw > 0:
        drawn = drawn_images_png(first_images_with_objects(split_dir, draw), evaluation, coco_gt)
        paths += write_files(io.join(folder, IMAGES_DIR), {f"{i}.png": data for i, data in drawn.items()})
    return paths


def epoch_images_dir(epoch: int) -> str:
    """The run folder's subfolder of the images drawn after `epoch` epochs: `images/epoch_003`."""
    return f"{IMAGES_DIR}/epoch_{epoch:03d}"


class RunResults:
    """A runtime's hooks for the results of its evaluations and its tracker; on ranks other than 0 they do nothing.

    Call `evaluated` after each `CocoEvaluator.evaluate` (with the EMA on, validation evaluates the raw weights, then
    the shipped ones: the last one of an epoch is written), `step` from the runtime's `log`, `epoch` from its
    `report` for an epoch's record (not a mid-epoch checkpoint's), and `close` before the logbook closes.

    Raises (from the constructor, rank 0):
        ConfigError: the tracker cannot start (`tracking.start_tracker`).
    """

    def __init__(
        self, cfg: Config, run_dir: str, logbook: Logbook, evaluator: CocoEvaluator | None, enabled: bool
    ) -> None:
        self.cfg, self.run_dir, self.logbook, self.evaluator = cfg, run_dir, logbook, evaluator
        self.enabled = enabled
        self.tracker: Tracker | None = start_tracker(cfg, run_dir) if enabled else None
        self._pending: Evaluation | None = None  # evaluated, not yet written (its epoch's number comes with `epoch`)
        self._last: tuple[int, Evaluation] | None = None  # the latest written, printed at `close`
        self._images: list[tuple[int, np.ndarray]] | None = None  # the validation images drawn, read once
        self._writer: Any = None  # TensorBoard, opened at the first pictures
        self._completed = False
        best = read_pointer(io.join(run_dir, BEST)) if enabled else None  # a continued run's best so far
        self._best_ap = float(best.get("val/AP", -math.inf)) if best else -math.inf

    def evaluated(self) -> None:
        if self.enabled and self.evaluator is not None and self.evaluator.last is not None:
            self._pending = self.evaluator.last

    def step(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        if self.tracker is not None and kind == "step":
            self.tracker.log_metrics(metrics, step)

    def epoch(self, metrics: dict[str, Any], checkpoint: str | None = None) -> None:
        """An epoch's metrics: to the tracker; the pending evaluation's table and pictures to the run folder.

        `checkpoint`: the name of the epoch's checkpoint folder, when not `checkpoint_name(step)` (a rewrite)."""
        if not self.enabled:
            return
        step, epoch = int(metrics.get("step", 0)), int(metrics.get("epoch", 0))
        evaluation, self._pending = self._pending, None
        if evaluation is not None:
            try:
                self._write(evaluation, epoch, step)
            except Exception as err:  # pictures are a convenience: the run and its numbers go on
                log.warning("the results of epoch %d could not be written to %s: %s: %s",
                            epoch, self.run_dir, type(err).__name__, err)  # fmt: skip
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step)
            ap = metrics.get("val/AP")
            if evaluation is not None and isinstance(ap, (int, float)) and ap > self._best_ap:
                self._best_ap = float(ap)
                self.tracker.set_best(io.join(self.run_dir, checkpoint or checkpoint_name(step)))
        self._completed = epoch >= self.cfg.train.epochs

    def _write(self, evaluation: Evaluation, epoch: int, step: int) -> None:
        self._last = (epoch, evaluation)
        per_class = evaluation.metrics()
        self.logbook.write(PER_CLASS_RECORD, step, {"epoch": epoch, **per_class})
        files = evaluation_files(evaluation, self.evaluator.coco_gt)
        write_files(self.run_dir, files)
        drawn = {}
        if self.cfg.train.draw_images > 0:
            if self._images is None:
                self._images = first_images_with_objects(self.cfg.data.val, self.cfg.train.draw_images)
            pictures = drawn_images_png(self._images, evaluation, self.evaluator.coco_gt)
            drawn = {f"{image_id}.png": data for image_id, data in pictures.items()}
            write_files(io.join(self.run_dir, epoch_images_dir(epoch)), drawn)
        pngs = {name: data for name, data in files.items() if name.endswith(".png")}
        self._tensorboard({**{f"evaluation/{k}": v for k, v in pngs.items()},
                           **{f"images/{k}": v for k, v in drawn.items()}}, step)  # fmt: skip
        if self.tracker is not None:
            # Not "val/AP/<class>": MLflow's file store keeps "val/AP" as a file, which cannot also be a folder.
            self.tracker.log_metrics({f"{PER_CLASS_RECORD}/{k}": v for k, v in per_class.items()}, step)
            self.tracker.log_files(files, "evaluation", step)
            if drawn:
                self.tracker.log_files(drawn, epoch_images_dir(epoch), step)

    def _tensorboard(self, pictures: dict[str, bytes], step: int) -> None:
        """PNGs as TensorBoard images, in an event file of their own beside the logbook's (its local folder: the run
        folder, or the one it mirrors into object storage)."""
        if self._writer is None:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                return
            suffix = f".results.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            self._writer = SummaryWriter(str(self.logbook.local_dir / TENSORBOARD_DIR), filename_suffix=suffix)
        from PIL import Image

        for tag, data in pictures.items():
            pixels = np.asarray(Image.open(_io.BytesIO(data)).convert("RGB"))
            self._writer.add_image(tag.removesuffix(".png"), pixels, step, dataformats="HWC")
        self._writer.flush()

    def close(self) -> None:
        """Print the last per-class table, close the TensorBoard file and end the tracked run."""
        if self._last is not None:
            epoch, evaluation = self._last
            log.info("per-class AP of the last evaluation (epoch %d), also in %s:\n%s",
                     epoch, io.join(self.run_dir, PER_CLASS), evaluation.table())  # fmt: skip
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.tracker is not None:
            self.tracker.close(finished=self._completed)
            self.tracker = None
