"""What `ddetr predict` and `ddetr eval` take, as users of other detectors expect: image files, folders, globs and
`s3://` prefixes (moto's server on loopback, `s3_server.py`), detected a batch at a time into detections.json with
category names and one drawing per image; batch inference over an image folder without shards; and `--data` as a
split folder or a dataset folder alike."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddetr import io
from ddetr.cli import main
from ddetr.config import apply_overrides, build_config, data_split, get_preset
from ddetr.data.shards import read_metadata
from ddetr.data.synthetic import make_synthetic_coco
from ddetr.image_sources import list_images
from ddetr.inference import Detector, draw_detections, read_image
from ddetr.train.checkpoints import save_checkpoint
from ddetr.train.loop import Training
from tests.s3_server import s3_dir, s3_server  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # One image size: batches need no padding, so an image's detections do not depend on its batch.
    return make_synthetic_coco(str(tmp_path_factory.mktemp("syn")), 4, 6, seed=3, image_size=(72, 72), shard_size=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, dataset) -> Path:
    """A freshly initialised tiny model saved as `ddetr train` saves it, with the dataset's categories (its class
    names)."""
    torch.manual_seed(0)
    meta = read_metadata(dataset.train_shards)
    overrides = ["data.scale=0.1", f"data.train={dataset.train_shards}", f"model.num_classes={meta.num_classes}"]
    cfg = apply_overrides(get_preset("tiny"), overrides)
    run = Training(cfg, torch.device("cpu"), load_backbone_weights=False, categories=meta.categories)
    directory = tmp_path_factory.mktemp("ckpt") / "checkpoint_00000000"
    save_checkpoint(directory, run.payload(cfg.to_dict()), {})
    return directory


@pytest.fixture(scope="module")
def names(dataset) -> dict[int, str]:
    return {c["id"]: c["name"] for c in read_metadata(dataset.val_shards).categories}


def image_folder(root: Path, dataset) -> list[Path]:
    """The val images in a tree as a user keeps photos: two subfolders, with a text file and a hidden file beside."""
    jpgs = sorted(Path(dataset.val_images).glob("*.jpg"))
    placed = []
    for i, jpg in enumerate(jpgs):
        target = root / ("day" if i % 2 else "night") / jpg.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(jpg.read_bytes())
        placed.append(target)
    (root / "day" / "notes.txt").write_text("not an image")
    (root / "night" / ".partial.jpg").write_bytes(b"a writer's temporary file")
    return sorted(placed)


def test_inputs_are_files_folders_and_globs(tmp_path, dataset):
    placed = image_folder(tmp_path / "photos", dataset)
    given = list_images([str(tmp_path / "photos")])
    assert [i.path for i in given] == [str(p) for p in placed]  # recursive, sorted, images only, hidden left out
    assert [i.name for i in given] == [f"{p.parent.name}/{p.stem}" for p in placed]
    day = sorted(p for p in placed if p.parent.name == "day")
    assert [i.path for i in list_images([str(tmp_path / "photos" / "d*" / "*.jpg")])] == list(map(str, day))
    assert [i.path for i in list_images([str(tmp_path / "photos" / "**" / "*.jpg")])] == list(map(str, placed))
    first_two = sorted(p for p in placed if p.name in ("00000001.jpg", "00000002.jpg"))
    assert sorted(i.path for i in list_images([f"{tmp_path}/photos/*/0000000[1-2].jpg"])) == list(map(str, first_two))
    # An explicit file is taken whatever it is (its reader names it if it does not decode), each path once, and two
    # files of the same name in different folders get different drawings.
    notes = str(tmp_path / "photos" / "day" / "notes.txt")
    mixed = list_images([notes, str(placed[0]), str(tmp_path / "photos"), str(tmp_path / "missing.jpg")])
    assert [i.path for i in mixed] == [notes, str(placed[0])] + [str(p) for p in placed[1:]] + [
        str(tmp_path / "missing.jpg")
    ]
    twins = list_images([str(placed[0]), str(tmp_path / "photos" / "*" / placed[0].name)])
    assert len({i.name for i in twins}) == len(twins)


def test_a_folder_without_images_is_one_line(tmp_path, checkpoint, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no pictures here")
    argv = ["predict", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), str(tmp_path / "empty")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ddetr predict: no image file in") and err.count("\n") == 1, err


def test_predict_on_a_folder_writes_category_names_and_one_drawing_per_image(
    tmp_path, dataset, checkpoint, names, caplog
):
    placed = image_folder(tmp_path / "photos", dataset)
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(checkpoint), "--out", str(out), "--threshold", "0.02", "--batch-size", "1",
            str(tmp_path / "photos")]  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    assert any("6 images from 1 folder" in r.getMessage() for r in caplog.records)
    records = json.loads((out / "detections.json").read_text())
    assert {r["file_name"] for r in records} == {str(p) for p in placed}
    assert {r["image_id"] for r in records} == set(range(len(placed)))  # places in the listing
    known = [r for r in records if r["category_id"] in names]
    assert known and all(r["category_name"] == names[r["category_id"]] for r in known)
    assert all("category_name" not in r for r in records if r["category_id"] not in names)
    drawings = sorted(out.rglob("*.png"))
    assert [p.relative_to(out).with_suffix("").as_posix() for p in drawings] == sorted(
        f"{p.parent.name}/{p.stem}" for p in placed
    )
    # The drawing carries the names: it is what draw_detections draws with the class names, not with the ids.
    detector = Detector.from_checkpoint(checkpoint, device="cpu")
    first = placed[0]
    pixels, size = detector.decode(first.read_bytes())
    found = detector.predict([pixels], [size])[0]
    drawn = Image.open(out / first.parent.name / f"{first.stem}.png")
    with_names = draw_detections(read_image(first), found, tmp_path / "names.png", names=names, threshold=0.02)
    with_ids = draw_detections(read_image(first), found, tmp_path / "ids.png", threshold=0.02)
    assert any(int(label) in names for label in found["labels"][found["scores"] >= 0.02])  # a name to draw
    np.testing.assert_array_equal(np.asarray(drawn), np.asarray(Image.open(with_names)))
    assert not np.array_equal(np.asarray(drawn), np.asarray(Image.open(with_ids)))


def test_predict_expands_a_quoted_glob_and_skips_an_unreadable_file(tmp_path, dataset, checkpoint, caplog):
    placed = image_folder(tmp_path / "photos", dataset)
    broken = tmp_path / "photos" / "day" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a JPEG")
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(checkpoint), "--out", str(out), "--threshold", "0",
            str(tmp_path / "photos" / "day" / "*.jpg")]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    day = {str(p) for p in placed if p.parent.name == "day"}
    assert {r["file_name"] for r in json.loads((out / "detections.json").read_text())} == day
    assert any(str(broken) in r.getMessage() and "not a readable image" in r.getMessage() for r in caplog.records)
    assert len(list(out.glob("*.png"))) == len(day)


def test_predict_lists_an_s3_prefix_and_a_glob_in_the_bucket(s3_dir, tmp_path, dataset, checkpoint):  # noqa: F811
    jpgs = sorted(Path(dataset.val_images).glob("*.jpg"))[:3]
    for i, jpg in enumerate(jpgs):
        io.atomic_write(f"{s3_dir}/cameras/cam{i % 2}_{jpg.name}", jpg.read_bytes())
    io.atomic_write(f"{s3_dir}/cameras/index.json", "{}")
    every = [f"{s3_dir}/cameras/cam{i % 2}_{jpg.name}" for i, jpg in enumerate(jpgs)]
    assert [i.path for i in list_images([f"{s3_dir}/cameras/"])] == sorted(every)
    assert [i.path for i in list_images([f"{s3_dir}/cameras/cam1_"])] == [every[1]]  # a key prefix
    assert [i.path for i in list_images([f"{s3_dir}/cam*/cam0_*.jpg"])] == [every[0], every[2]]
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(checkpoint), "--out", str(out), "--threshold", "0", f"{s3_dir}/cameras"]
    assert main(argv) == 0
    assert {r["file_name"] for r in json.loads((out / "detections.json").read_text())} == set(every)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"cam{i % 2}_{j.stem}.png" for i, j in enumerate(jpgs))


def test_data_is_a_split_folder_or_a_dataset_folder(dataset, tmp_path):
    assert data_split(dataset.root) == data_split(dataset.val_shards) == dataset.val_shards
    assert data_split(dataset.root, "train") == dataset.train_shards
    whole = build_config("tiny", dataset.root, name_run=False)
    assert (whole.data.train, whole.data.val) == (dataset.train_shards, dataset.val_shards)
    split = build_config("tiny", dataset.train_shards, name_run=False)  # a split folder: trained on, no validation
    assert (split.data.train, split.data.val) == (dataset.train_shards, "")
    assert split.model.num_classes == whole.model.num_classes


def test_eval_takes_the_dataset_folder_and_its_val_split_alike(dataset, checkpoint, capsys, caplog, tmp_path):
    results = {}
    for data in (dataset.root, dataset.val_shards):
        with caplog.at_level(logging.INFO):
            assert main(["eval", "--checkpoint", str(checkpoint), "--data", data]) == 0
        results[data] = json.loads(capsys.readouterr().out)
    assert results[dataset.root] == results[dataset.val_shards] and "AP50" in results[dataset.root]
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--data ")]
    assert said == [f"--data {dataset.root}: a dataset folder: val {dataset.val_shards}",
                    f"--data {dataset.val_shards}: a split folder"]  # fmt: skip
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --data {tmp_path}: neither a split folder") and err.count("\n") == 1, err


@pytest.mark.ray
@pytest.mark.slow
def test_batch_inference_over_an_image_folder_and_over_a_dataset_folders_shards(
    ray_local, hard_timeout, dataset, checkpoint, names, tmp_path, caplog
):
    placed = image_folder(tmp_path / "photos", dataset)
    broken = tmp_path / "photos" / "day" / "zz-broken.png"
    broken.write_bytes(b"\x89PNG cut short")
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(checkpoint), "--out", str(out), "--threshold", "0", "--batch",
            "--actors", "1", "--draw", "2", "--batch-size", "4", str(tmp_path / "photos")]  # fmt: skip
    with hard_timeout(180), caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    assert any(str(broken) in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    records = json.loads((out / "detections.json").read_text())
    assert {r["file_name"] for r in records} == {str(p) for p in placed}
    known = [r for r in records if r["category_id"] in names]
    assert known and all(r["category_name"] == names[r["category_id"]] for r in known)
    # The same detections as the detector called here on the same files.
    detector = Detector.from_checkpoint(checkpoint, device="cpu")
    for path in placed[:2]:
        direct = detector.predict_files([str(path)])[str(path)]
        mine = sorted((r for r in records if r["file_name"] == str(path)), key=lambda r: -r["score"])
        np.testing.assert_allclose([r["score"] for r in mine], direct["scores"].sort(descending=True).values, atol=1e-5)
    assert len(list(out.rglob("*.png"))) == 2
    # --shards (or --data) takes the dataset folder as eval does: its val split.
    argv = ["predict", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "shards-out"), "--threshold", "0",
            "--data", dataset.root, "--actors", "1", "--draw", "1"]  # fmt: skip
    with hard_timeout(180):
        assert main(argv) == 0
    records = json.loads((tmp_path / "shards-out" / "detections.json").read_text())
    assert {r["image_id"] for r in records} == {int(p.stem) for p in Path(dataset.val_images).glob("*.jpg")}
    assert all(r["category_name"] == names[r["category_id"]] for r in records if r["category_id"] in names)
