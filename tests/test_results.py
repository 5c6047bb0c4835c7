"""Results people read and look at: the per-class table is COCOeval's own per category, the confusion matrix counts
what a hand count says, and a tiny training leaves the table, PR curves, confusion matrix and drawn validation images
in its run folder (on both engines), which `ddetr eval --plots` also writes."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.cocoeval import COCOeval

from ddetr.cli import main
from ddetr.config import Config, apply_overrides, get_preset
from ddetr.data.coco_eval import KEEP_SCORE, PER_CLASS_STATS, CocoEvaluator, category_names, coco_from_dict
from ddetr.data.confusion import confusion_matrix
from ddetr.data.synthetic import make_synthetic_coco
from ddetr.train import loop
from ddetr.train.local import LocalRuntime
from ddetr.train.logbook import read_metrics
from ddetr.train.plots import first_images_with_objects

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps on a shared 2-core machine: a second thread only competes
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_coco(str(tmp_path_factory.mktemp("syn")), 8, 12, seed=3, image_size=(64, 96))


def noisy_predictions(coco, seed: int) -> dict[int, dict[str, np.ndarray]]:
    """The ground truth jittered, a tenth of the labels swapped, some boxes missed, a few invented."""
    rng = np.random.default_rng(seed)
    cats = coco.getCatIds()
    out = {}
    for image_id in coco.getImgIds():
        boxes, labels = [], []
        for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
            if rng.random() < 0.15:
                continue
            x, y, w, h = a["bbox"]
            boxes.append(np.array([x, y, x + w, y + h]) + rng.normal(0, 0.08 * max(w, h), size=4))
            labels.append(a["category_id"] if rng.random() > 0.1 else int(rng.choice(cats)))
        for _ in range(int(rng.integers(0, 3))):
            x, y = rng.uniform(0, 50, size=2)
            boxes.append([x, y, x + rng.uniform(5, 30), y + rng.uniform(5, 30)])
            labels.append(int(rng.choice(cats)))
        out[image_id] = {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "labels": np.asarray(labels),
                         "scores": rng.uniform(0.05, 1.0, size=len(labels)).astype(np.float32)}  # fmt: skip
    return out


def test_per_class_numbers_are_cocoevals_for_each_category_alone(synth):
    evaluator = CocoEvaluator.from_shards(synth.val_shards)
    stats = evaluator.evaluate(noisy_predictions(evaluator.coco_gt, seed=0))
    evaluation = evaluator.last
    names = category_names(evaluator.coco_gt)
    assert list(evaluation.per_class) == list(names.values())
    detections = [d for dets in evaluator.predictions.values() for d in dets]
    assert [d for d in detections if d["score"] >= KEEP_SCORE] == evaluation.detections
    for cat_id, name in names.items():
        # The oracle: pycocotools itself, told to evaluate this one category.
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(evaluator.coco_gt, evaluator.coco_gt.loadRes(detections), iouType="bbox")
            ev.params.imgIds, ev.params.catIds = evaluation.image_ids, [cat_id]
            ev.evaluate(), ev.accumulate(), ev.summarize()
        expected = [v if v > -1 else math.nan for v in ev.stats[:6]]
        assert [evaluation.per_class[name][s] for s in PER_CLASS_STATS] == pytest.approx(expected, nan_ok=True)
    # Every class has ground truth here, so the mean over classes is the summary's AP.
    assert np.mean([v["AP"] for v in evaluation.per_class.values()]) == pytest.approx(stats["AP"])
    assert sum(evaluation.instances.values()) == len(evaluator.coco_gt.getAnnIds(imgIds=evaluation.image_ids))
    table = evaluation.table()
    assert all(f"| {name}" in table for name in names.values()) and f"{stats['AP50']:.3f}" in table
    assert evaluation.recall.shape == (101,) and all(c.shape == (101,) for c in evaluation.precision50.values())


def test_confusion_matrix_counts_as_by_hand():
    gt = coco_from_dict({
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [20, 20, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 4, "image_id": 1, "category_id": 2, "bbox": [70, 70, 30, 30], "area": 900, "iscrowd": 1},
        ],
    })  # fmt: skip

    def det(image_id: int, cat: int, box: list[float], score: float) -> dict:
        return {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}

    detections = [
        det(1, 1, [0, 0, 10, 10], 0.9),  # the cat: right
        det(1, 1, [21, 20, 10, 10], 0.8),  # the dog, called a cat
        det(1, 2, [0, 0, 10, 10], 0.7),  # on the cat again, which is taken: invented
        det(1, 2, [75, 75, 10, 10], 0.6),  # inside the crowd region: left out
        det(1, 1, [50, 50, 10, 10], 0.2),  # the second cat, below the score threshold: so it is missed
        det(1, 7, [50, 50, 10, 10], 0.9),  # a category the ground truth does not have: left out
        det(2, 1, [5, 5, 20, 20], 0.5),  # an image without objects: invented
    ]
    matrix, names = confusion_matrix(gt, detections, [1, 2], iou_threshold=0.5, score_threshold=0.3)
    assert names == ["cat", "dog", "background"]
    assert matrix.tolist() == [[1, 0, 1], [1, 0, 0], [1, 1, 0]]  # rows: true cat, dog, background


def tiny(synth, storage: Path, name: str, *overrides: str) -> Config:
    return apply_overrides(get_preset("tiny"), [
        f"data.train={synth.train_shards}", f"data.val={synth.val_shards}", "data.scale=0.1",
        "data.loader_workers=0", f"train.storage_path={storage}", f"train.name={name}", "train.log_every=1000",
        "train.epochs=2", "train.max_steps_per_epoch=2", "train.draw_images=2", *overrides,
    ])  # fmt: skip


def check_run_folder(run: Path, synth, epochs: int) -> None:
    names = category_names(CocoEvaluator.from_shards(synth.val_shards).coco_gt)
    table = (run / "per_class.md").read_text()
    assert all(f"| {name}" in table for name in names.values()), table
    assert (run / "pr_curves.png").read_bytes()[:8] == PNG and (run / "confusion_matrix.png").read_bytes()[:8] == PNG
    # The same images at every epoch: the first two of the validation split that hold objects.
    expected = sorted(f"{image_id}.png" for image_id, _ in first_images_with_objects(synth.val_shards, 2))
    for epoch in range(1, epochs + 1):
        folder = run / "images" / f"epoch_{epoch:03d}"
        assert sorted(p.name for p in folder.iterdir()) == expected
        assert all(p.read_bytes()[:8] == PNG for p in folder.iterdir())
    records = read_metrics(run)
    per_class = [r for r in records if r["kind"] == "per_class"]
    epoch_steps = [r["step"] for r in records if r["kind"] == "epoch"]
    assert [r["step"] for r in per_class] == epoch_steps and [r["epoch"] for r in per_class] == [1, 2][:epochs]
    assert {f"AP50/{name}" for name in names.values()} <= set(per_class[-1])
    assert any("results" in p.name for p in (run / "tensorboard").iterdir())  # the pictures' event file


@pytest.mark.slow
def test_training_writes_the_results_and_eval_prints_the_table(synth, tmp_path, capsys):
    cfg = tiny(synth, tmp_path, "local")
    runtime = LocalRuntime(cfg, device="cpu")
    try:
        loop.fit(cfg, runtime)
    finally:
        runtime.close()
    run = tmp_path / "local"
    check_run_folder(run, synth, epochs=2)

    capsys.readouterr()
    plots = tmp_path / "plots"
    data = str(Path(synth.val_shards).parent)
    assert main(["eval", "--checkpoint", str(run), "--data", data, "--plots", str(plots), "--draw", "3"]) == 0
    printed = capsys.readouterr()
    metrics = json.loads(printed.out)  # stdout is the JSON alone; the table is on stderr
    rows = [line for line in printed.err.splitlines() if line.startswith("| ")]
    names = category_names(CocoEvaluator.from_shards(synth.val_shards).coco_gt).values()
    assert [row.split("|")[1].strip() for row in rows] == ["class", *names, "all"], printed.err
    assert rows[-1].split("|")[3].strip() == f"{metrics['AP']:.3f}"  # the "all" row's AP is the summary's
    assert sorted(p.name for p in plots.iterdir()) == ["confusion_matrix.png", "images", "per_class.md",
                                                        "pr_curves.png"]  # fmt: skip
    assert len(list((plots / "images").glob("*.png"))) == 3


@pytest.mark.slow
@pytest.mark.ray
def test_ray_runtime_writes_the_results_on_rank_0(ray_local, synth, tmp_path, hard_timeout):
    from ddetr.train import train

    cfg = tiny(synth, tmp_path, "ray", "train.num_workers=0", "train.epochs=1", "train.controller_failure_limit=0")
    with hard_timeout(240):
        train(cfg, engine="ray")
    check_run_folder(tmp_path / "ray", synth, epochs=1)
