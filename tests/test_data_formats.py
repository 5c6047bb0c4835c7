"""Your own data: YOLO and Pascal VOC folders to shards, their bad lines named, `ddetr data check`, and a run on each.

The fixtures draw small images (96x64) with PIL and write the label files a YOLO or a VOC export would hold, so the
boxes the shards must hold are known in pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from ddetr import io
from ddetr.cli import main
from ddetr.data.check import check
from ddetr.data.folders import image_size
from ddetr.data.shards import read_metadata, read_shard, shard_uris
from ddetr.data.validate import BadRecordError
from ddetr.data.voc import convert_voc
from ddetr.data.yolo import convert_yolo
from ddetr.inference import Detector
from tests.s3_server import s3_dir, s3_server  # noqa: F401  (fixtures)

W, H = 96, 64
NAMES = ["disc", "square"]  # class 0 and 1: category ids 1 and 2
COLOURS = [(220, 40, 40), (40, 80, 230)]
# Per split: image stem -> boxes (class, x0, y0, x1, y1) in pixels. "e" has no objects and no label file.
SCENES = {
    "train": {
        "a": [(0, 4, 6, 30, 32), (1, 50, 10, 90, 50)],
        "b": [(1, 10, 20, 40, 60)],
        "c": [(0, 60, 2, 94, 30), (0, 8, 36, 28, 58)],
        "d": [(1, 30, 8, 70, 40)],
        "e": [],
        "f": [(0, 40, 30, 64, 62)],
    },
    "val": {"g": [(0, 6, 6, 36, 40), (1, 52, 20, 90, 60)], "h": [(1, 20, 10, 60, 50)]},
}


def _draw(path: Path, boxes: list[tuple[int, int, int, int, int]]) -> None:
    img = Image.new("RGB", (W, H), (235, 235, 225))
    draw = ImageDraw.Draw(img)
    for c, x0, y0, x1, y1 in boxes:
        (draw.ellipse if c == 0 else draw.rectangle)((x0, y0, x1 - 1, y1 - 1), fill=COLOURS[c])
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=95)


def _yolo_line(c: int, x0: float, y0: float, x1: float, y1: float) -> str:
    return f"{c} {(x0 + x1) / 2 / W:.6f} {(y0 + y1) / 2 / H:.6f} {(x1 - x0) / W:.6f} {(y1 - y0) / H:.6f}"


def make_yolo(root: Path, names_file: str = "data.yaml") -> Path:
    """Ultralytics' layout: images/<split>, labels/<split>, class names in `names_file`."""
    for split, scenes in SCENES.items():
        for stem, boxes in scenes.items():
            _draw(root / "images" / split / f"{stem}.jpg", boxes)
            if boxes:
                label = root / "labels" / split / f"{stem}.txt"
                label.parent.mkdir(parents=True, exist_ok=True)
                label.write_text("".join(_yolo_line(*b) + "\n" for b in boxes))
    if names_file.endswith(".yaml"):
        (root / names_file).write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "names": NAMES}))
    else:
        (root / names_file).write_text("\n".join(NAMES) + "\n")
    return root


def _voc_xml(stem: str, boxes: list[tuple[int, ...]], difficult: set[int] = frozenset()) -> str:
    objects = "".join(
        f"<object><name>{NAMES[c]}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{int(k in difficult)}</difficult><bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for k, (c, x0, y0, x1, y1) in enumerate(boxes)
    )
    return (
        f"<annotation><folder>VOC</folder><filename>{stem}.jpg</filename><size><width>{W}</width>"
        f"<height>{H}</height><depth>3</depth></size><segmented>0</segmented>{objects}</annotation>"
    )


def make_voc(root: Path) -> Path:
    """VOC's layout: Annotations/, JPEGImages/, ImageSets/Main/{train,val}.txt; the second box of "c" is difficult."""
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for split, scenes in SCENES.items():
        for stem, boxes in scenes.items():
            _draw(root / "JPEGImages" / f"{stem}.jpg", boxes)
            (root / "Annotations" / f"{stem}.xml").write_text(_voc_xml(stem, boxes, {1} if stem == "c" else set()))
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{s}\n" for s in scenes))
    (root / "ImageSets" / "Main" / "disc_train.txt").write_text("a  1\nb -1\n")  # a per-class list: not a split
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("".join(f"{s}\n" for v in SCENES.values() for s in v))
    return root


def _rows(split_dir: Path | str) -> dict[str, dict]:
    """file name -> {"boxes" [(x0, y0, x1, y1)], "category_id", "iscrowd", "size" (w, h)} of a converted split."""
    meta = read_metadata(str(split_dir))
    out = {}
    for uri in shard_uris(str(split_dir), meta):
        t = read_shard(uri, ["file_name", "width", "height", "boxes", "category_id", "iscrowd"]).to_pydict()
        for i, name in enumerate(t["file_name"]):
            xywh = np.asarray(t["boxes"][i], dtype=np.float64).reshape(-1, 4)
            out[name] = {
                "boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
                "category_id": t["category_id"][i],
                "iscrowd": t["iscrowd"][i],
                "size": (t["width"][i], t["height"][i]),
            }
    return out


def _expected(scenes: dict) -> dict[str, tuple[np.ndarray, list[int]]]:
    return {
        f"{stem}.jpg": (np.asarray([b[1:] for b in boxes], dtype=np.float64).reshape(-1, 4), [b[0] + 1 for b in boxes])
        for stem, boxes in scenes.items()
    }


# --- conversion -------------------------------------------------------------------------------------------------------


def test_a_yolo_folder_becomes_a_split_folder_each_with_the_boxes_drawn(tmp_path):
    src = make_yolo(tmp_path / "yolo")
    c, x0, y0, x1, y1 = SCENES["train"]["d"][0]  # the same box as a polygon: its bounding box is taken
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    (src / "labels" / "train" / "d.txt").write_text(f"{c} " + " ".join(f"{x / W:.6f} {y / H:.6f}" for x, y in corners))
    summaries = convert_yolo(str(src), str(tmp_path / "shards"), progress=False)
    assert sorted(summaries) == [str(tmp_path / "shards" / "train"), str(tmp_path / "shards" / "val")]
    for split, scenes in SCENES.items():
        meta = read_metadata(str(tmp_path / "shards" / split))
        assert [(c["id"], c["name"]) for c in meta.categories] == [(1, "disc"), (2, "square")]
        assert meta.num_classes == 3 and meta.split == split and not meta.skips
        rows = _rows(tmp_path / "shards" / split)
        assert sorted(rows) == sorted(f"{s}.jpg" for s in scenes)
        for name, (boxes, cats) in _expected(scenes).items():
            np.testing.assert_allclose(rows[name]["boxes"], boxes, atol=1e-3)  # 6 decimals of a fraction
            assert rows[name]["category_id"] == cats and rows[name]["size"] == (W, H)
    assert _rows(tmp_path / "shards" / "train")["e.jpg"]["category_id"] == []  # no label file: no objects
    again = convert_yolo(str(src), str(tmp_path / "shards"), progress=False)  # a rerun keeps what is there
    assert [(s.shards_written, s.shards_resumed) for s in again.values()] == [(0, 1), (0, 1)]


def test_a_voc_folder_becomes_its_imagesets_splits_with_difficult_as_crowd(tmp_path):
    src = make_voc(tmp_path / "voc")
    summaries = convert_voc(str(src), str(tmp_path / "shards"), progress=False)
    assert sorted(summaries) == [str(tmp_path / "shards" / "train"), str(tmp_path / "shards" / "val")]
    for split, scenes in SCENES.items():
        meta = read_metadata(str(tmp_path / "shards" / split))
        assert [(c["id"], c["name"]) for c in meta.categories] == [(1, "disc"), (2, "square")]  # sorted names
        rows = _rows(tmp_path / "shards" / split)
        assert sorted(rows) == sorted(f"{s}.jpg" for s in scenes)
        for name, (boxes, cats) in _expected(scenes).items():
            np.testing.assert_allclose(rows[name]["boxes"], boxes)  # 1-based inclusive xmin..xmax: the pixels drawn
            assert rows[name]["category_id"] == cats
            assert rows[name]["iscrowd"] == ([0, 1] if name == "c.jpg" else [0] * len(cats))


def test_class_names_from_a_classes_file_a_yaml_dict_or_the_command_line(tmp_path):
    src = make_yolo(tmp_path / "yolo", names_file="classes.txt")
    convert_yolo(str(src), str(tmp_path / "a"), splits=["val"], progress=False)
    assert [c["name"] for c in read_metadata(str(tmp_path / "a" / "val")).categories] == NAMES
    assert not (tmp_path / "a" / "train").exists()
    (tmp_path / "names.yaml").write_text("names:\n  0: round\n  1: boxy\n")
    convert_yolo(str(src), str(tmp_path / "b"), names=str(tmp_path / "names.yaml"), splits=["val"], progress=False)
    assert [c["name"] for c in read_metadata(str(tmp_path / "b" / "val")).categories] == ["round", "boxy"]
    # A VOC list given in another order than sorted: ids follow it.
    voc = make_voc(tmp_path / "voc")
    convert_voc(str(voc), str(tmp_path / "c"), names="square,disc", splits=["val"], progress=False)
    meta = read_metadata(str(tmp_path / "c" / "val"))
    assert [(c["id"], c["name"]) for c in meta.categories] == [(1, "square"), (2, "disc")]
    assert _rows(tmp_path / "c" / "val")["g.jpg"]["category_id"] == [2, 1]


def test_a_roboflow_export_and_a_folder_without_splits(tmp_path):
    """<split>/images + <split>/labels with "valid" (written as val); images/ + labels/ alone: OUT is the split."""
    src = tmp_path / "rf"
    for split, out_split in (("train", "train"), ("valid", "val")):
        for stem, boxes in SCENES[out_split].items():
            _draw(src / split / "images" / f"{stem}.jpg", boxes)
            (src / split / "labels").mkdir(parents=True, exist_ok=True)
            (src / split / "labels" / f"{stem}.txt").write_text("\n".join(_yolo_line(*b) for b in boxes))
    (src / "data.yaml").write_text("names: [disc, square]\nnc: 2\n")
    summaries = convert_yolo(str(src), str(tmp_path / "rf_shards"), progress=False)
    assert sorted(Path(p).name for p in summaries) == ["train", "val"]
    assert read_metadata(str(tmp_path / "rf_shards" / "val")).num_images == len(SCENES["val"])

    flat = tmp_path / "flat"
    for stem, boxes in SCENES["val"].items():
        _draw(flat / "images" / f"{stem}.jpg", boxes)
        (flat / "labels").mkdir(parents=True, exist_ok=True)
        (flat / "labels" / f"{stem}.txt").write_text("\n".join(_yolo_line(*b) for b in boxes))
    convert_yolo(str(flat), str(tmp_path / "flat_val"), names="disc,square", progress=False)
    assert read_metadata(str(tmp_path / "flat_val")).num_annotations == 3


def test_image_sizes_are_those_of_the_upright_image(tmp_path):
    """A photo stored 64x96 with EXIF orientation 6 (turn a quarter) is 96x64 as label tools show it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (64, 96)).save(tmp_path / "turned.jpg", exif=exif)
    Image.new("RGB", (64, 96)).save(tmp_path / "plain.png")
    assert image_size(str(tmp_path / "turned.jpg")) == (96, 64)
    assert image_size(str(tmp_path / "plain.png")) == (64, 96)


def test_a_yolo_folder_in_object_storage_converts_there(s3_dir, tmp_path):  # noqa: F811
    src = make_yolo(tmp_path / "yolo")
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        io.atomic_write(f"{s3_dir}/src/{path.relative_to(src)}", path.read_bytes())
    convert_yolo(f"{s3_dir}/src", f"{s3_dir}/shards", progress=False, num_threads=2)
    meta = read_metadata(f"{s3_dir}/shards/train")
    assert [c["name"] for c in meta.categories] == NAMES
    rows = _rows(f"{s3_dir}/shards/train")
    assert sorted(rows) == sorted(f"{s}.jpg" for s in SCENES["train"])
    for name, (boxes, cats) in _expected(SCENES["train"]).items():
        np.testing.assert_allclose(rows[name]["boxes"], boxes, atol=1e-3)
        assert rows[name]["category_id"] == cats
    assert "   2  square        3        3" in check(f"{s3_dir}/shards")


# --- bad input --------------------------------------------------------------------------------------------------------

# (the line written as line 3 of labels/train/a.txt, the skip reason, what the message says about it)
BAD_LINES = {
    "unknown class": ("7 0.5 0.5 0.2 0.2", "label_unknown_class", "class 7 is not in data.yaml (0..1)"),
    "field count": ("1 0.5 0.5 0.2", "label_malformed", "4 fields; expected 5"),
    "not a number": ("1 0.5 half 0.2 0.2", "label_malformed", "cy 'half' is not a number"),
    "pixels": ("1 48 32 20 20", "label_not_normalised", "cx 48 lies outside 0..1"),
    "zero width": ("0 0.5 0.5 0 0.2", "box_zero_area", "w is 0"),
    "repeated line": (None, "label_duplicate", "repeats an earlier line"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_a_bad_label_line_is_named_by_file_and_line(case, tmp_path):
    src = make_yolo(tmp_path / "yolo")
    line, reason, says = BAD_LINES[case]
    label = src / "labels" / "train" / "a.txt"
    good = label.read_text().splitlines()
    label.write_text("\n".join([*good, line or good[0]]) + "\n")  # a.txt has 2 good lines: the bad one is line 3
    summaries = convert_yolo(str(src), str(tmp_path / "out"), splits=["train"], progress=False)
    summary = summaries[str(tmp_path / "out" / "train")]
    assert summary.skips == {reason: 1} and summary.num_annotations == 7  # every other box converted
    assert f"{reason}: {label} line 3: {says}" in str(summary), str(summary)
    with pytest.raises(BadRecordError) as err:
        convert_yolo(str(src), str(tmp_path / "strict"), splits=["train"], strict=True, progress=False)
    assert (err.value.reason, err.value.file, err.value.field) == (reason, str(label), "line 3")
    assert says in str(err.value)


def test_a_label_file_that_is_not_text_is_skipped_by_name_and_a_byte_order_mark_is_no_name(tmp_path):
    src = make_yolo(tmp_path / "yolo", names_file="classes.txt")
    (src / "classes.txt").write_bytes(("\ufeff" + "\n".join(NAMES) + "\n").encode())  # as Windows Notepad saves it
    (src / "labels" / "val" / "h.txt").write_bytes(b"\x00\xff\xfe binary")
    summaries = convert_yolo(str(src), str(tmp_path / "out"), splits=["val"], progress=False)
    summary = summaries[str(tmp_path / "out" / "val")]
    assert summary.skips == {"label_unreadable": 1} and summary.num_images == 2
    assert f"label_unreadable: {src / 'labels' / 'val' / 'h.txt'} text: not UTF-8 text" in str(summary)
    assert [c["name"] for c in read_metadata(str(tmp_path / "out" / "val")).categories] == NAMES


def test_bad_voc_records_are_named_by_file_object_and_field(tmp_path):
    src = make_voc(tmp_path / "voc")
    xml = src / "Annotations" / "a.xml"
    xml.write_text(xml.read_text().replace("<xmax>90</xmax>", "<xmax>ninety</xmax>"))  # object 2
    (src / "Annotations" / "b.xml").write_text("<annotation><object>")  # not XML
    summary = convert_voc(str(src), str(tmp_path / "out"), splits=["train"], progress=False)[
        str(tmp_path / "out" / "train")
    ]
    assert summary.skips == {"box_malformed": 1, "annotation_unparsable": 1}
    text = str(summary)
    assert f"box_malformed: {xml} object 2 bndbox.xmax: 'ninety' is not a number" in text, text
    assert f"annotation_unparsable: {src / 'Annotations' / 'b.xml'} xml: not valid XML" in text, text
    (src / "Annotations" / "b.xml").write_text(_voc_xml("b", SCENES["train"]["b"]))
    with pytest.raises(BadRecordError, match="ninety"):
        convert_voc(str(src), str(tmp_path / "strict"), splits=["train"], strict=True, progress=False)


def test_user_mistakes_are_one_line_at_the_command_line(tmp_path, capsys):
    src = make_yolo(tmp_path / "yolo")
    (src / "data.yaml").unlink()
    cases = [
        (["--format", "yolo", "--source", str(src)], "no class names found"),
        (["--format", "yolo", "--source", str(src), "--names", "disc,square", "--split", "test"], "no split test"),
        (["--format", "voc", "--source", str(src)], "no Annotations/ folder"),
        (["--format", "yolo", "--images", str(src)], "takes --source DIR"),
        (["--format", "yolo", "--source", str(tmp_path / "nothing")], "not found"),
    ]
    for args, says in cases:
        assert main(["data", "convert", *args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and says in err, err


# --- data check -------------------------------------------------------------------------------------------------------


def test_data_check_prints_each_class_by_name_with_its_counts(tmp_path, capsys):
    src = make_voc(tmp_path / "voc")
    assert main(["data", "convert", "--format", "voc", "--source", str(src), "--out", str(tmp_path / "shards")]) == 0
    assert (
        f"converted 6 images, 7 annotations into 1 shards at {tmp_path / 'shards' / 'train'}" in capsys.readouterr().out
    )
    assert main(["data", "check", str(tmp_path / "shards")]) == 0
    out = capsys.readouterr().out
    train, val = out.split("\n\n")
    # train: disc boxes in a, c (one of them difficult), f; squares in a, b, d.
    assert "train: 6 images, 6 boxes (and 1 crowd/difficult, not trained on), 2 classes" in train
    rows = {line.split()[1]: line.split()[2:] for line in train.splitlines() if line.strip().startswith(("1 ", "2 "))}
    assert rows == {"disc": ["3", "3", "1"], "square": ["3", "3", "0"]}, train
    assert "image width     min 96  median 96  max 96" in train
    assert "boxes/image     min 0  median 1  max 2; 1 image without boxes" in train
    assert "box sizes       small 3, medium 3, large 0" in train, train  # a, c, f's discs: 676, 952, 768 px² < 32²
    assert "val: 2 images, 3 boxes, 2 classes" in val
    # One split; a class without boxes is marked.
    assert main(["data", "check", str(tmp_path / "shards" / "val")]) == 0
    assert "<- no boxes" not in capsys.readouterr().out
    convert_voc(str(src), str(tmp_path / "more"), names="disc,square,star", splits=["val"], progress=False)
    assert main(["data", "check", str(tmp_path / "more" / "val")]) == 0
    assert "   3  star          0        0  <- no boxes" in capsys.readouterr().out


# --- a run on each ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["yolo", "voc"])
def test_train_one_epoch_and_eval_on_a_converted_folder(fmt, tmp_path, capsys):
    src = make_yolo(tmp_path / "src") if fmt == "yolo" else make_voc(tmp_path / "src")
    data = str(tmp_path / "shards")
    assert main(["data", "convert", "--format", fmt, "--source", str(src), "--out", data]) == 0
    runs = tmp_path / "runs"
    overrides = ["data.scale=0.1", "train.epochs=1", "data.loader_workers=0", "train.batch_size=2",
                 f"train.storage_path={runs}", "train.name=own", "train.log_every=1000"]  # fmt: skip
    assert main(["train", "--preset", "tiny", "--data", data, "--engine", "local", *overrides]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(runs / "own"), "--data", data]) == 0
    out = capsys.readouterr().out
    metrics = json.loads(out[out.index("{") : out.rindex("}") + 1])
    # COCOeval says -1 for an area range without ground truth: the val boxes (small and medium) arrived, none large.
    assert metrics["AP_small"] >= 0 and metrics["AP_medium"] >= 0 and metrics["AP_large"] == -1.0, metrics
    assert Detector.from_checkpoint(str(runs / "own")).cfg.model.num_classes == 3  # ids 1, 2 and "no class" 0
