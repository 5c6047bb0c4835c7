"""Inference from a checkpoint: `ddetr predict` on image files, and batch inference over shards with a Ray Data
actor pool, each checked against the detector called directly on the same pixels."""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddetr.cli import main
from ddetr.config import apply_overrides, get_preset
from ddetr.data.shards import read_metadata, read_shard, shard_uris
from ddetr.data.synthetic import make_synthetic_coco
from ddetr.inference import Detector
from ddetr.train.checkpoints import save_checkpoint
from ddetr.train.loop import Training


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # One image size: batches need no padding, so an image's detections do not depend on its batch.
    return make_synthetic_coco(str(tmp_path_factory.mktemp("syn")), 4, 10, seed=1, image_size=(80, 80), shard_size=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, dataset) -> Path:
    """A freshly initialised tiny model saved as a training checkpoint (what `ddetr train` writes)."""
    torch.manual_seed(0)
    cfg = apply_overrides(get_preset("tiny"), ["data.scale=0.1", f"data.train={dataset.train_shards}"])
    run = Training(cfg, torch.device("cpu"))
    directory = tmp_path_factory.mktemp("ckpt") / "checkpoint_00000000"
    save_checkpoint(directory, run.payload(cfg.to_dict()), {})
    return directory


def val_images(dataset) -> dict[int, np.ndarray]:
    meta = read_metadata(dataset.val_shards)
    images = {}
    for uri in shard_uris(dataset.val_shards, meta):
        table = read_shard(uri, ["image_id", "image"])
        for image_id, data in zip(table.column("image_id").to_pylist(), table.column("image").to_pylist(), strict=True):
            images[image_id] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return images


def by_image(records: list[dict]) -> dict[int, list[dict]]:
    grouped = defaultdict(list)
    for r in records:
        grouped[r["image_id"]].append(r)
    return {k: sorted(v, key=lambda r: -r["score"]) for k, v in grouped.items()}


def assert_same_detections(records: list[dict], direct: dict[str, torch.Tensor]) -> None:
    order = torch.argsort(direct["scores"], descending=True)
    assert len(records) == len(order)
    np.testing.assert_allclose([r["score"] for r in records], direct["scores"][order].numpy(), atol=1e-5)
    assert [r["category_id"] for r in records] == direct["labels"][order].tolist()
    x0, y0, x1, y1 = direct["boxes"][order].unbind(1)
    xywh = torch.stack([x0, y0, x1 - x0, y1 - y0], dim=1).numpy()
    np.testing.assert_allclose([r["bbox"] for r in records], xywh, atol=1e-3)


def test_predict_on_image_files_writes_coco_results_and_drawings(checkpoint, dataset, tmp_path):
    images = val_images(dataset)
    paths = []
    for image_id, pixels in list(images.items())[:3]:
        paths.append(tmp_path / f"img{image_id}.png")
        Image.fromarray(pixels).save(paths[-1])
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), "--out", str(out), "--threshold", "0",
                 *map(str, paths)]) == 0  # fmt: skip
    records = by_image(json.loads((out / "detections.json").read_text()))
    direct = Detector.from_checkpoint(checkpoint, device="cpu").predict([images[i] for i in list(images)[:3]])
    assert sorted(records) == [0, 1, 2]  # numbered in the order given
    for i in range(3):
        assert_same_detections(records[i], direct[i])
        assert all(r["file_name"] == str(paths[i]) for r in records[i])
        assert (out / f"{paths[i].stem}.png").stat().st_size > 500
    assert not list(out.glob("*.tmp"))


def test_predict_without_images_or_shards_says_what_is_missing(checkpoint, tmp_path, capsys):
    assert main(["predict", "--checkpoint", str(checkpoint), "--out", str(tmp_path)]) == 2
    assert "give image files, or a shard folder with --shards" in capsys.readouterr().err


def test_predict_skips_a_file_that_is_not_an_image_and_detects_the_rest(checkpoint, dataset, tmp_path, caplog):
    image_id, pixels = next(iter(val_images(dataset).items()))
    good, bad = tmp_path / "good.png", tmp_path / "notanimage.jpg"
    Image.fromarray(pixels).save(good)
    bad.write_text("this is not a JPEG")
    out = tmp_path / "out"
    args = ["predict", "--checkpoint", str(checkpoint), "--out", str(out), "--threshold", "0", str(good), str(bad)]
    with caplog.at_level("WARNING"):
        assert main(args) == 0
    assert any(str(bad) in r.getMessage() and "not a readable image" in r.getMessage() for r in caplog.records)
    records = json.loads((out / "detections.json").read_text())
    assert records and {r["file_name"] for r in records} == {str(good)}
    direct = Detector.from_checkpoint(checkpoint, device="cpu").predict([pixels])[0]
    assert_same_detections(sorted(records, key=lambda r: -r["score"]), direct)
    assert (out / "good.png").exists() and not (out / "notanimage.png").exists()


@pytest.mark.ray
def test_batch_inference_over_shards_with_an_actor_pool(ray_local, hard_timeout, checkpoint, dataset, tmp_path):
    from ddetr.batch_inference import predict_shards

    with hard_timeout(180):
        summary = predict_shards(checkpoint, dataset.val_shards, tmp_path, batch_size=4, max_actors=2,
                                 cpus_per_actor=0.5, draw=2, threshold=0.0)  # fmt: skip
    images = val_images(dataset)
    assert summary["images"] == len(images) == 10 and summary["max_actors"] == 2
    records = by_image(json.loads((tmp_path / "detections.json").read_text()))
    assert sorted(records) == sorted(images)  # every image once, across 3 shards and several actors
    assert summary["detections"] == sum(len(v) for v in records.values())
    detector = Detector.from_checkpoint(checkpoint, device="cpu")
    ids = sorted(images)
    for image_id, direct in zip(ids, detector.predict([images[i] for i in ids]), strict=True):
        assert_same_detections(records[image_id], direct)
    assert len(list(tmp_path.glob("*.png"))) == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_export_hf_then_predict_from_the_folder_gives_the_same_detections(checkpoint, dataset, tmp_path):
    image_id, pixels = next(iter(val_images(dataset).items()))
    image = tmp_path / "image.png"
    Image.fromarray(pixels).save(image)
    assert main(["export", "--format", "hf", str(checkpoint), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "model.safetensors").exists()
    for source, out in ((checkpoint, "from-ddetr"), (tmp_path / "hf", "from-hf")):
        args = ["predict", "--checkpoint", str(source), "--out", str(tmp_path / out), "--threshold", "0", str(image)]
        assert main(args) == 0
    ours = json.loads((tmp_path / "from-ddetr" / "detections.json").read_text())
    theirs = json.loads((tmp_path / "from-hf" / "detections.json").read_text())
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs, strict=True):
        assert a["category_id"] == b["category_id"]
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=1e-3)
        assert abs(a["score"] - b["score"]) < 1e-5


def test_batch_inference_skips_an_image_that_does_not_decode_and_detects_the_rest(checkpoint, dataset, caplog):
    from ddetr.batch_inference import DetectBatch

    images = val_images(dataset)
    ids = sorted(images)[:2]
    encoded = []
    for image_id in ids:
        buffer = io.BytesIO()
        Image.fromarray(images[image_id]).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    batch = {"image_id": np.asarray([ids[0], 99, ids[1]]),
             "image": np.asarray([encoded[0], encoded[0][:200], encoded[1]], dtype=object)}  # fmt: skip
    with caplog.at_level("WARNING"):
        out = DetectBatch(str(checkpoint), device="cpu")(batch)
    assert out["image_id"].tolist() == ids  # the truncated image is left out, its batch still detected
    assert any("image_id 99" in r.getMessage() and "failed to decode" in r.getMessage() for r in caplog.records)
    direct = Detector.from_checkpoint(checkpoint, device="cpu").predict([images[i] for i in ids])
    for scores, boxes, det in zip(out["scores"], out["boxes"], direct, strict=True):
        np.testing.assert_allclose(scores, det["scores"].numpy(), atol=1e-5)
        np.testing.assert_allclose(boxes.reshape(-1, 4), det["boxes"].numpy(), atol=1e-3)
