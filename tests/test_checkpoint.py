"""Official checkpoint compatibility: state-dict keys and shapes per variant, and the safe loader."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from pathlib import Path

import pytest
import torch

from ddetr.config import ModelConfig, get_preset
from ddetr.models import build_detector, config_from_official_args, load_official_checkpoint, read_checkpoint

KEYS_FILE = Path(__file__).parent / "data" / "official_state_dict_keys.txt"
# Variant names in the reference file -> our presets.
VARIANTS = {
    "base": "deformable_detr",
    "refine": "box_refine",
    "two_stage": "two_stage",
    "single_scale": "single_scale",
    "dc5": "single_scale_dc5",
}


def parse_official_keys(path: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """The file lists the base variant in full, then each variant as `+ key shape`, `- key`, `~ key shape`."""
    variants: dict[str, dict[str, tuple[int, ...]]] = {}
    current = None
    for line in path.read_text().splitlines():
        m = re.match(r"# variant: (\w+)", line)
        if m:
            current = m.group(1)
            variants[current] = dict(variants["base"]) if current != "base" else {}
            continue
        if not line.strip() or line.startswith("#"):
            continue
        op, rest = (line[0], line[2:]) if line[:2] in ("+ ", "- ", "~ ") else ("", line)
        key, _, shape = rest.partition("\t")
        if op == "-":
            del variants[current][key.strip()]
        else:
            variants[current][key] = tuple(int(s) for s in re.findall(r"\d+", shape))
    return variants


def test_reference_file_parses():
    variants = parse_official_keys(KEYS_FILE)
    assert set(variants) == set(VARIANTS)
    # Counts stated in the file's headers: refine +36, two_stage +72 -3, single scale -12.
    base = len(variants["base"])
    assert len(variants["refine"]) == base + 36 and len(variants["two_stage"]) == base + 69
    assert len(variants["single_scale"]) == base - 12 and variants["dc5"] == variants["single_scale"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_state_dict_matches_the_official_release(variant):
    official = parse_official_keys(KEYS_FILE)[variant]
    # Built on the meta device: shapes without allocating or initialising ResNet-50 weights.
    with torch.device("meta"):
        model = build_detector(get_preset(VARIANTS[variant]).model, load_backbone_weights=False)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(ours) - set(official)) == [], "keys we have that the official release does not"
    assert sorted(set(official) - set(ours)) == [], "official keys we lack"
    assert {k: v for k, v in ours.items() if official[k] != v} == {}, "shape mismatches"


def tiny_model(**changes) -> torch.nn.Module:
    cfg = get_preset("tiny").model
    return build_detector(dataclasses.replace(cfg, num_queries=10, **changes))


def official_args(**changes) -> argparse.Namespace:
    """The argument Namespace an official run pickles into its checkpoints (a representative subset)."""
    args = dict(
        lr=2e-4,
        backbone="resnet18",
        dilation=False,
        position_embedding="sine",
        num_feature_levels=4,
        enc_layers=2,
        dec_layers=2,
        dim_feedforward=256,
        hidden_dim=64,
        dropout=0.0,
        nheads=4,
        num_queries=10,
        dec_n_points=4,
        enc_n_points=4,
        masks=False,
        aux_loss=True,
        with_box_refine=False,
        two_stage=False,
        dataset_file="coco",
        coco_path="/data/coco",
        device="cuda",
        frozen_weights=None,
    )
    args.update(changes)
    return argparse.Namespace(**args)


def save_fake_official(path: Path, model: torch.nn.Module, **arg_changes) -> None:
    torch.save(
        {
            "model": model.state_dict(),
            "args": official_args(**arg_changes),
            "epoch": 49,
            "lr_scheduler": {"milestones": __import__("collections").Counter({40: 1})},
        },
        path,
    )


def test_round_trip_of_an_official_style_checkpoint(tmp_path):
    source = tiny_model()
    path = tmp_path / "official.pth"
    save_fake_official(path, source)
    args = read_checkpoint(path)["args"]
    cfg = config_from_official_args(args)
    # The official runs start from ImageNet, so the config read back says so (and loading it fetches nothing).
    tiny = get_preset("tiny").model
    assert cfg == dataclasses.replace(tiny, num_queries=10, dropout=0.0, pretrained_backbone="imagenet")
    target = build_detector(cfg, load_backbone_weights=False)
    report = load_official_checkpoint(target, path)
    assert report.reinitialized == [] and report.args.hidden_dim == 64
    for k, v in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[k], v, msg=k)


def test_other_num_classes_reinitialises_the_class_heads(tmp_path, caplog):
    path = tmp_path / "official.pth"
    source = tiny_model(with_box_refine=True)
    save_fake_official(path, source, with_box_refine=True)
    target = tiny_model(with_box_refine=True, num_classes=3)
    with caplog.at_level(logging.WARNING):
        report = load_official_checkpoint(target, path)
    assert "re-initialising" in caplog.text and "91 classes" in caplog.text
    assert all(k.startswith("class_embed.") for k in report.reinitialized) and len(report.reinitialized) == 4
    torch.testing.assert_close(target.class_embed[1].bias.sigmoid(), torch.full((3,), 0.01))
    torch.testing.assert_close(target.bbox_embed[1].layers[0].weight, source.bbox_embed[1].layers[0].weight)
    with pytest.raises(RuntimeError, match="shape mismatch class_embed.0.weight"):
        load_official_checkpoint(tiny_model(with_box_refine=True, num_classes=3), path, allow_num_classes_change=False)


def test_mismatches_are_reported_by_key(tmp_path):
    path = tmp_path / "official.pth"
    save_fake_official(path, tiny_model(with_box_refine=True))
    with pytest.raises(RuntimeError) as e:
        load_official_checkpoint(tiny_model(num_feature_levels=1), path)
    msg = str(e.value)
    assert "unexpected in checkpoint" in msg and "transformer.decoder.bbox_embed.0.layers.0.weight" in msg
    assert "input_proj.3.0.weight" in msg
    assert "shape mismatch transformer.level_embed: checkpoint (4, 64), model (1, 64)" in msg
    with pytest.raises(RuntimeError, match="missing in checkpoint .*transformer.pos_trans.weight"):
        load_official_checkpoint(tiny_model(with_box_refine=True, two_stage=True), path)


class Payload:
    """Stands for an arbitrary pickled object, e.g. one whose __reduce__ would run code."""


def test_arbitrary_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "args": Payload()}, path)
    with pytest.raises(RuntimeError, match="refusing to load"):
        read_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "absent.pth")


def test_a_cut_short_file_is_named_and_an_official_file_needs_no_manifest(tmp_path):
    """Official `.pth` files are files, not checkpoint folders: they load as they are, without a manifest; a copy cut
    short is one line naming it, whoever reads it (`read_checkpoint` is the one reader of checkpoint files)."""
    from ddetr.models.checkpoint import CorruptCheckpointError, state_file

    path = tmp_path / "official.pth"
    save_fake_official(path, tiny_model())
    assert state_file(path) == path and "model" in read_checkpoint(state_file(path))
    path.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(CorruptCheckpointError, match=f"checkpoint {path} cannot be read") as e:
        read_checkpoint(path)
    assert "\n" not in str(e.value)


def test_config_from_official_args_maps_variants():
    cfg = config_from_official_args(
        official_args(
            backbone="resnet50",
            hidden_dim=256,
            with_box_refine=True,
            two_stage=True,
            num_feature_levels=4,
            num_queries=300,
        )
    )
    assert cfg.two_stage and cfg.with_box_refine and cfg.d_model == 256 and cfg.num_classes == 91
    assert config_from_official_args(official_args(dataset_file="coco_panoptic")).num_classes == 250
    assert config_from_official_args({"dilation": True}, base=ModelConfig(num_feature_levels=1)).dilation
    with pytest.raises(ValueError, match="masks"):
        config_from_official_args(official_args(masks=True))
