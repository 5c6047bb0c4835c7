"""Config: official defaults, JSON round trip, flat overrides and presets."""

from __future__ import annotations

import json
import math

import pytest

from ddetr.config import (
    PRESETS,
    Config,
    ConfigError,
    LossConfig,
    ModelConfig,
    apply_overrides,
    build_config,
    get_preset,
)


def test_defaults_are_the_official_main_py_defaults():
    m, loss = ModelConfig(), LossConfig()
    assert (m.backbone, m.dilation, m.num_feature_levels, m.d_model) == ("resnet50", False, 4, 256)
    assert (m.enc_layers, m.dec_layers, m.dim_feedforward, m.dropout, m.nheads) == (6, 6, 1024, 0.1, 8)
    assert (m.dec_n_points, m.enc_n_points, m.num_queries, m.num_classes) == (4, 4, 300, 91)
    assert (m.with_box_refine, m.two_stage, m.aux_loss) == (False, False, True)
    assert (loss.set_cost_class, loss.set_cost_bbox, loss.set_cost_giou) == (2, 5, 2)
    assert (loss.cls_loss_coef, loss.bbox_loss_coef, loss.giou_loss_coef, loss.focal_alpha) == (2, 5, 2, 0.25)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_round_trip_through_json(name):
    cfg = get_preset(name)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert Config.from_dict(d) == cfg
    assert json.loads(cfg.to_json()) == d


def test_from_dict_names_unknown_fields():
    d = Config().to_dict()
    d["model"]["num_querys"] = 3
    with pytest.raises(KeyError, match="num_querys"):
        Config.from_dict(d)
    with pytest.raises(KeyError, match="optim"):
        Config.from_dict({"optim": {}})


def test_overrides_convert_types_and_leave_the_input_alone():
    cfg = Config()
    new = apply_overrides(
        cfg,
        [
            "model.num_queries=100",
            "loss.cls_loss_coef=3",
            "model.two_stage=true",
            "model.with_box_refine=true",  # two-stage needs it
            "model.pretrained_backbone=/tmp/r50.pth",
            "model.dropout=0",
        ],
    )
    assert new.model.num_queries == 100 and isinstance(new.model.num_queries, int)
    assert new.loss.cls_loss_coef == 3.0 and isinstance(new.loss.cls_loss_coef, float)
    assert new.model.two_stage is True and new.model.dropout == 0.0
    assert new.model.pretrained_backbone == "/tmp/r50.pth"
    assert apply_overrides(new, ["model.pretrained_backbone=None"]).model.pretrained_backbone is None
    assert cfg == Config()  # the input is not modified


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        ("model.num_querys=3", KeyError, "model.num_querys"),
        ("modle.num_queries=3", KeyError, "modle"),
        ("model.num_queries=many", ValueError, "int"),
        ("model.two_stage=maybe", ValueError, "bool"),
        ("num_queries=3", ValueError, "section.field=value"),
        ("model.num_queries", ValueError, "section.field=value"),
        ("model.backbone=vgg16", ValueError, "resnet50"),
        ("model.num_feature_levels=2", ValueError, "num_feature_levels"),
        ("model.proposal_nms=1.5", ValueError, "proposal_nms must lie"),
        ("model.proposal_nms=0.5", ValueError, "needs model.two_stage"),
        ("train.eval_every=0", ValueError, "data.val= trains without evaluation"),
    ],
)
def test_bad_overrides_say_what_is_wrong(override, error, match):
    with pytest.raises(error, match=match):
        apply_overrides(Config(), [override])


def test_presets_are_the_paper_variants():
    assert get_preset("deformable_detr") == Config()
    assert get_preset("single_scale").model.num_feature_levels == 1
    dc5 = get_preset("single_scale_dc5").model
    assert dc5.num_feature_levels == 1 and dc5.dilation
    assert get_preset("box_refine").model.with_box_refine and not get_preset("box_refine").model.two_stage
    ts = get_preset("two_stage").model
    assert ts.with_box_refine and ts.two_stage
    tiny = get_preset("tiny").model
    assert tiny.backbone == "resnet18" and tiny.d_model <= 128 and tiny.enc_layers == tiny.dec_layers == 2
    assert get_preset("tiny") is not get_preset("tiny")  # fresh objects: mutating one preset never leaks


def test_unknown_preset_lists_the_names():
    with pytest.raises(KeyError) as e:
        get_preset("three_stage")
    for name in PRESETS:
        assert name in str(e.value)


def test_model_config_rejects_bad_sizes():
    with pytest.raises(ValueError, match="nheads"):
        ModelConfig(d_model=96, nheads=5)
    assert math.isclose(ModelConfig().dropout, 0.1)


def _write_split(split_dir, category_ids):
    """A split folder holding only its dataset.json, as `ddetr data` writes it, with these category ids."""
    from ddetr import io
    from ddetr.data.shards import ShardMetadata, write_metadata

    io.makedirs(str(split_dir))
    categories = [{"id": i, "name": f"c{i}", "supercategory": "thing"} for i in category_ids]
    write_metadata(str(split_dir), ShardMetadata(split_dir.name, categories, 0, 0, 1, []))


def test_data_gives_the_class_count_the_shards_metadata_gives(tmp_path):
    """The config reads dataset.json without ddetr.data: its count must be the one ShardMetadata computes."""
    from ddetr.data.shards import read_metadata

    _write_split(tmp_path / "shards" / "train", [1, 7, 3])
    _write_split(tmp_path / "shards" / "val", [1, 7, 3])
    cfg = build_config("tiny", str(tmp_path), ["train.epochs=1"], name_run=False)
    assert cfg.model.num_classes == read_metadata(str(tmp_path / "shards" / "train")).num_classes == 8
    assert (cfg.data.train, cfg.data.val) == (str(tmp_path / "shards" / "train"), str(tmp_path / "shards" / "val"))
    assert build_config("tiny", str(tmp_path), ["model.num_classes=3"]).model.num_classes == 3  # overrides win
    only_train = build_config("tiny", str(tmp_path / "shards" / "train"), name_run=False)  # a split folder
    assert (only_train.data.train, only_train.data.val, only_train.model.num_classes) == (
        str(tmp_path / "shards" / "train"),
        "",
        8,
    )


@pytest.mark.parametrize(
    "text, match",
    [(None, "no such file"), ("{not json", "not a split's dataset.json"), ('{"categories": []}', "no categories")],
)
def test_a_bad_dataset_json_is_a_config_error_naming_the_file(tmp_path, text, match):
    (tmp_path / "train").mkdir()
    if text is not None:
        (tmp_path / "train" / "dataset.json").write_text(text)
    with pytest.raises(ConfigError, match=match) as caught:
        build_config("tiny", str(tmp_path))
    assert str(tmp_path / "train" / "dataset.json") in str(caught.value)
