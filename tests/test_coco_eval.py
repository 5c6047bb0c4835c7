"""The evaluator returns pycocotools' own numbers; the ground truth from shards equals the json's."""

from __future__ import annotations

import contextlib
import io
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ddetr.data.coco_eval import STAT_NAMES, CocoEvaluator, coco_from_json, coco_from_shards
from ddetr.data.synthetic import make_synthetic_coco


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_coco(str(tmp_path_factory.mktemp("syn")), 4, 30, seed=2, image_size=(80, 120))


def _noisy_detections(coco: COCO, seed: int) -> dict[int, dict[str, np.ndarray]]:
    """Ground-truth boxes jittered, some labels wrong, some misses and false positives."""
    rng = np.random.default_rng(seed)
    preds = {}
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        boxes, labels = [], []
        for a in anns:
            if rng.random() < 0.15:
                continue
            x, y, w, h = a["bbox"]
            boxes.append([x, y, x + w, y + h] + rng.normal(0, 0.08 * max(w, h), size=4))
            labels.append(a["category_id"] if rng.random() > 0.1 else int(rng.integers(1, 5)))
        for _ in range(int(rng.integers(0, 3))):
            x, y = rng.uniform(0, 60, size=2)
            boxes.append([x, y, x + rng.uniform(5, 40), y + rng.uniform(5, 40)])
            labels.append(int(rng.integers(1, 5)))
        preds[image_id] = {
            "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, dtype=np.int64),
            "scores": rng.uniform(0.05, 1.0, size=len(labels)).astype(np.float32),
        }
    return preds


def _pycocotools_directly(coco_gt: COCO, preds: dict, tmp_path) -> np.ndarray:
    results = [
        {
            "image_id": i,
            "category_id": int(l),
            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
            "score": float(s),
        }
        for i, p in preds.items()
        for b, l, s in zip(p["boxes"], p["labels"], p["scores"], strict=True)
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_gt.loadRes(str(path)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_evaluator_equals_pycocotools(synth, tmp_path):
    gt = coco_from_json(synth.val_annotations)
    preds = _noisy_detections(gt, seed=0)
    evaluator = CocoEvaluator(gt)
    half = len(preds) // 2
    evaluator.update({k: {n: torch.from_numpy(v) for n, v in p.items()} for k, p in list(preds.items())[:half]})
    evaluator.update(dict(list(preds.items())[half:]))
    stats = evaluator.summarize()
    assert list(stats) == list(STAT_NAMES)
    np.testing.assert_allclose([stats[k] for k in STAT_NAMES], _pycocotools_directly(gt, preds, tmp_path))
    assert 0.2 < stats["AP50"] < 1.0


def test_contiguous_labels_map_back_to_category_ids(synth, tmp_path):
    gt = coco_from_json(synth.val_annotations)
    preds = _noisy_detections(gt, seed=1)
    to_category = {0: 1, 1: 2, 2: 3, 3: 4}
    contiguous = {k: {**p, "labels": p["labels"] - 1} for k, p in preds.items()}
    stats = CocoEvaluator(gt, label_to_category=to_category).evaluate(contiguous)
    np.testing.assert_allclose([stats[k] for k in STAT_NAMES], _pycocotools_directly(gt, preds, tmp_path))


def test_ground_truth_from_shards_equals_the_json(synth, tmp_path):
    from_json, from_shards = coco_from_json(synth.val_annotations), coco_from_shards(synth.val_shards)
    assert sorted(from_json.getImgIds()) == sorted(from_shards.getImgIds())
    assert from_json.loadCats(from_json.getCatIds()) == from_shards.loadCats(from_shards.getCatIds())
    for ann_id in from_json.getAnnIds():
        a, b = from_json.anns[ann_id], from_shards.anns[ann_id]
        assert (a["image_id"], a["category_id"], a["iscrowd"]) == (b["image_id"], b["category_id"], b["iscrowd"])
        np.testing.assert_allclose(a["bbox"], b["bbox"], rtol=1e-6)
        assert a["area"] == pytest.approx(b["area"])
    preds = _noisy_detections(from_json, seed=3)
    a = CocoEvaluator(from_json).evaluate(preds)
    b = CocoEvaluator.from_shards(synth.val_shards).evaluate(preds)
    assert a == pytest.approx(b)


def test_only_images_with_predictions_are_evaluated(synth):
    gt = coco_from_json(synth.val_annotations)
    preds = _noisy_detections(gt, seed=4)
    some = dict(list(preds.items())[:5])
    stats = CocoEvaluator(gt).evaluate(some)
    assert stats != CocoEvaluator(gt).evaluate(preds)
    assert CocoEvaluator(gt).evaluate({}) == {k: 0.0 for k in STAT_NAMES}


def _evaluate_on_rank(rank: int, port: int, gt_json: str, parts: list, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(parts))
    try:
        stats = CocoEvaluator(coco_from_json(gt_json)).evaluate(parts[rank])
        Path(f"{out}.{rank}").write_text(json.dumps(stats))
    finally:
        dist.destroy_process_group()


def test_predictions_from_all_ranks_are_gathered(synth, tmp_path):
    """Two real gloo ranks, each with part of the detections (the second repeats an image, as padding does):
    rank 0 evaluates all of them once, and both ranks return its numbers."""
    gt = coco_from_json(synth.val_annotations)
    preds = _noisy_detections(gt, seed=5)
    items = list(preds.items())
    parts = [dict(items[::2]), dict(items[1::2] + items[:1])]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "stats")
    torch.multiprocessing.spawn(_evaluate_on_rank, args=(port, synth.val_annotations, parts, out), nprocs=2)
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    np.testing.assert_allclose([ranks[0][k] for k in STAT_NAMES], _pycocotools_directly(gt, preds, tmp_path))
