"""Hugging Face folders: the exported keys equal transformers' own, and ddetr -> HF -> ddetr changes nothing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from ddetr.config import ModelConfig, get_preset
from ddetr.models import build_detector
from ddetr.models.hf import read_hf, to_hf_state_dict, write_hf

# Key lists as transformers 5.23 saves DeformableDetrForObjectDetection (COCO sizes), one per variant.
KEYS = Path(__file__).parent / "data" / "hf"
VARIANTS = {"base": "deformable_detr", "refine": "box_refine", "two_stage": "two_stage"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_keys(variant: str) -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in (KEYS / f"{variant}_keys.txt").read_text().splitlines():
        name, shape = line.split("\t")
        keys[name] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return keys


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_exported_keys_and_shapes_equal_transformers(variant):
    m = get_preset(VARIANTS[variant]).model
    with torch.device("meta"):
        model = build_detector(m, load_backbone_weights=False)
    ours = {k: tuple(v.shape) for k, v in to_hf_state_dict(model, m).items()}
    reference = reference_keys(variant)
    assert sorted(set(ours) - set(reference)) == [], "keys transformers does not have"
    assert sorted(set(reference) - set(ours)) == [], "transformers keys we do not write"
    assert {k: v for k, v in ours.items() if reference[k] != v} == {}, "shape mismatches"


def small(variant: str) -> ModelConfig:
    m = get_preset(VARIANTS[variant]).model
    return dataclasses.replace(
        m, backbone="resnet18", d_model=64, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=64,
        num_queries=12, dropout=0.0, num_classes=5, pretrained_backbone="none",
    )  # fmt: skip


def perturbed(m: ModelConfig) -> torch.nn.Module:
    """A model whose every tensor matters: heads off their init, BN statistics off 0 / 1."""
    torch.manual_seed(0)
    model = build_detector(m).eval()
    with torch.no_grad():
        for k, p in model.named_parameters():
            if "_embed" in k:
                p.add_(0.05 * torch.randn_like(p))
        for k, b in model.named_buffers():
            b.copy_(torch.rand_like(b) + 0.5 if "running_var" in k else 0.1 * torch.randn_like(b))
    return model


def outputs(model: torch.nn.Module) -> list[torch.Tensor]:
    torch.manual_seed(1)
    images = torch.randn(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 64:], mask[1, :, 100:] = True, True
    with torch.no_grad():
        out = model(images, mask)
    flat = [out["pred_logits"], out["pred_boxes"]]
    flat += [t for aux in out["aux_outputs"] for t in (aux["pred_logits"], aux["pred_boxes"])]
    if "enc_outputs" in out:
        flat += [out["enc_outputs"]["pred_logits"], out["enc_outputs"]["pred_boxes"]]
    return flat


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_through_a_hf_folder_gives_identical_outputs(variant, tmp_path):
    m = small(variant)
    model = perturbed(m)
    if variant == "refine":
        # The format holds one class head for box refinement (transformers ties them): use one here.
        with torch.no_grad():
            for head in model.class_embed:
                head.load_state_dict(model.class_embed[-1].state_dict())
    names = {i: f"class {i}" for i in range(m.num_classes)}
    write_hf(model, m, tmp_path, names)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["DeformableDetrForObjectDetection"]
    assert config["backbone_config"]["model_type"] == "timm_backbone"
    assert config["backbone_config"]["backbone"] == "resnet18"
    assert config["id2label"]["3"] == "class 3"
    back, m2, id2label = read_hf(tmp_path)
    assert id2label == names
    assert m2 == dataclasses.replace(m, pretrained_backbone="imagenet")
    assert not any(p.is_meta for p in back.parameters())
    for a, b in zip(outputs(model), outputs(back.eval()), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_box_refinement_export_keeps_the_last_class_head(tmp_path, caplog):
    m = small("refine")
    model = perturbed(m)
    with caplog.at_level("WARNING", logger="ddetr.models.hf"):
        write_hf(model, m, tmp_path, {i: str(i) for i in range(m.num_classes)})
    assert "stores one class head" in caplog.text
    back = read_hf(tmp_path)[0].eval()
    ours, theirs = outputs(model), outputs(back)
    # The detections (last layer's logits and every box) are unchanged.
    torch.testing.assert_close(theirs[0], ours[0], rtol=0, atol=0)
    torch.testing.assert_close(theirs[1], ours[1], rtol=0, atol=0)
    torch.testing.assert_close(theirs[3], ours[3], rtol=0, atol=0)


def test_reading_names_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="Hugging Face model folder"):
        read_hf(tmp_path)
    m = small("base")
    write_hf(perturbed(m), m, tmp_path, {i: str(i) for i in range(m.num_classes)})
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "position_embedding_type": "learned"}))
    with pytest.raises(ValueError, match="position_embedding_type"):
        read_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_queries": 7}))
    with pytest.raises(RuntimeError, match="do not fit"):
        read_hf(tmp_path)
    with pytest.raises(ValueError, match="id2label"):
        write_hf(perturbed(m), m, tmp_path, {0: "only one"})


def test_single_scale_round_trip_and_what_hf_lacks_is_refused(tmp_path):
    for name, backbone in (("single_scale", "resnet18"), ("single_scale_dc5", "resnet50")):
        m = dataclasses.replace(small("base"), num_feature_levels=1, dilation=name.endswith("dc5"), backbone=backbone)
        model = perturbed(m)
        write_hf(model, m, tmp_path / name, {i: str(i) for i in range(m.num_classes)})
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["backbone_config"]["out_indices"] == [4]
        assert config["backbone_config"]["output_stride"] == (16 if m.dilation else None)
        back = read_hf(tmp_path / name)[0].eval()
        for a, b in zip(outputs(model), outputs(back), strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    m = dataclasses.replace(small("base"), num_feature_levels=1, dilation=True)
    with pytest.raises(ValueError, match="DC5 resnet18"):
        write_hf(perturbed(m), m, tmp_path / "dc5_r18", {i: str(i) for i in range(m.num_classes)})
    assert not (tmp_path / "dc5_r18").exists()
    m = dataclasses.replace(small("base"), pretrained_backbone="none", backbone_norm="group_norm")
    with pytest.raises(ValueError, match="backbone_norm=group_norm"):
        write_hf(perturbed(m), m, tmp_path / "gn", {i: str(i) for i in range(m.num_classes)})
    assert not (tmp_path / "gn").exists()
    m = dataclasses.replace(small("two_stage"), proposal_nms=0.5)
    with pytest.raises(ValueError, match="proposal_nms=0.5"):
        write_hf(perturbed(m), m, tmp_path / "nms", {i: str(i) for i in range(m.num_classes)})
    assert not (tmp_path / "nms").exists()
