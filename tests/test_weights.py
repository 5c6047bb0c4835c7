"""Where weights come from: pretrained backbones and what they freeze, `lr_backbone=0`, the matcher's alpha,
and fine-tuning (`init_from`) from ddetr, official and Hugging Face checkpoints."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from ddetr.config import Config, ConfigError, apply_overrides, get_preset
from ddetr.models import build_model
from ddetr.models.backbone import Backbone, FrozenBatchNorm2d
from ddetr.models.checkpoint import write_manifest
from ddetr.models.hf import read_hf, write_hf
from ddetr.models.weights import export_hf, init_from, load_detector, read_weights
from ddetr.train.optim import build_optimizer


def small(name: str, *overrides: str) -> Config:
    """A paper preset at a CPU size (ResNet-18, d_model 64, 1 + 1 layers), with `overrides` applied."""
    base = ["model.backbone=resnet18", "model.d_model=64", "model.nheads=4", "model.enc_layers=1"]
    base += ["model.dec_layers=1", "model.dim_feedforward=64", "model.num_queries=10", "model.num_classes=5"]
    return apply_overrides(get_preset(name), [*base, *overrides])


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    """A torchvision-format ResNet-18 file (classifier and BN step counters included) and its body weights."""
    torch.manual_seed(1)
    body = dict(Backbone("resnet18", True, False).body.state_dict())
    body = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in body.items()}
    state = {**body, "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    state["layer1.0.bn1.num_batches_tracked"] = torch.tensor(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18-f37072fd.pth"
    torch.save(state, path)
    return str(path), body


def backbone_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {k.removeprefix("backbone.0.body."): p for k, p in model.named_parameters() if k.startswith("backbone.0.")}


def test_paper_presets_default_to_imagenet_and_tiny_to_none():
    for name in ("single_scale", "single_scale_dc5", "deformable_detr", "box_refine", "two_stage"):
        assert get_preset(name).model.pretrained_backbone == "imagenet", name
    assert get_preset("tiny").model.pretrained_backbone == "none"
    assert get_preset("deformable_detr").model.init_from == ""


def test_a_local_weights_file_is_loaded_and_freezes_the_stem_and_layer1(resnet18_file):
    path, body = resnet18_file
    model = build_model(small("deformable_detr", f"model.pretrained_backbone={path}"))[0]
    loaded = model.backbone[0].body.state_dict()
    for k, v in body.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0, msg=k)
    params = backbone_params(model)
    frozen = sorted(k for k, p in params.items() if not p.requires_grad)
    assert frozen == sorted(k for k in params if k.startswith(("conv1.", "layer1.")))
    assert "conv1.weight" in frozen and "layer1.1.conv2.weight" in frozen
    assert all(params[k].requires_grad for k in params if k.startswith(("layer2.", "layer3.", "layer4.")))


def test_without_pretrained_weights_nothing_is_frozen_and_a_warning_says_why(caplog):
    for value in ("none", "None", None):
        cfg = small("deformable_detr")
        cfg.model = dataclasses.replace(cfg.model, pretrained_backbone=value)
        with caplog.at_level("WARNING", logger="ddetr.models.build"):
            model = build_model(cfg)[0]
        assert all(p.requires_grad for p in backbone_params(model).values()), value
        assert "paper's numbers assume ImageNet weights" in caplog.text
        caplog.clear()


def test_a_group_norm_backbone_trains_every_norm_and_starts_each_block_as_the_identity():
    model = build_model(small("deformable_detr", "model.pretrained_backbone=none", "model.backbone_norm=group_norm"))[0]
    body = model.backbone[0].body
    norms = [m for m in body.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 20 and not any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())  # ResNet-18
    assert all(p.requires_grad for p in backbone_params(model).values())
    block = body.layer3[1]  # no downsample: the block's input passes through unchanged at init
    x = torch.randn(2, 256, 6, 8).relu()
    torch.testing.assert_close(block(x), x)
    assert not block.bn2.weight.any() and block.bn1.weight.all()
    with pytest.raises(ConfigError, match="model.pretrained_backbone=none"):
        small("deformable_detr", "model.backbone_norm=group_norm")  # "imagenet" comes with batch-norm statistics
    with pytest.raises(ConfigError, match="frozen_bn"):
        small("tiny", "model.backbone_norm=batch")


def test_lr_backbone_zero_leaves_no_backbone_parameter_trainable(resnet18_file):
    path, _ = resnet18_file
    for pretrained in (path, "none"):
        cfg = small("box_refine", f"model.pretrained_backbone={pretrained}", "train.lr_backbone=0")
        model, criterion, _ = build_model(cfg)
        params = backbone_params(model)
        assert params and not any(p.requires_grad for p in params.values())
        optimizer = build_optimizer(model, cfg.train)
        assert [g["name"] for g in optimizer.param_groups] == ["main", "linear_proj"]
        # The frozen backbone gets no gradient, so it cannot enter the clipping norm.
        images = torch.randn(1, 3, 64, 64)
        targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}]
        criterion.total_loss(criterion(model(images), targets)).backward()
        assert all(p.grad is None for p in params.values())
        assert model.input_proj[0][0].weight.grad is not None


def test_load_backbone_weights_false_fetches_nothing_and_freezes_the_same(monkeypatch):
    def no_fetch(*args, **kwargs):
        raise AssertionError("ImageNet weights were fetched")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_fetch)
    cfg = small("two_stage")  # "imagenet"
    model = build_model(cfg, load_backbone_weights=False)[0]
    params = backbone_params(model)
    assert sorted(k for k, p in params.items() if not p.requires_grad) == sorted(
        k for k in params if k.startswith(("conv1.", "layer1."))
    )


def test_unreachable_imagenet_weights_give_one_line_saying_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    cfg = small("deformable_detr", "model.pretrained_backbone=https://127.0.0.1:9/resnet18-f37072fd.pth")
    with pytest.raises(RuntimeError, match="could not download") as e:
        build_model(cfg)
    message = str(e.value)
    assert "\n" not in message
    assert "model.pretrained_backbone=/path/to/resnet18-f37072fd.pth" in message
    assert "model.pretrained_backbone=none" in message


def test_matcher_alpha_is_separate_from_the_loss_alpha():
    cfg = apply_overrides(get_preset("tiny"), ["loss.focal_alpha=0.5"])
    criterion = build_model(cfg)[1]
    assert criterion.focal_alpha == 0.5 and criterion.matcher.focal_alpha == 0.25
    cfg = apply_overrides(cfg, ["loss.matcher_focal_alpha=0.4"])
    assert build_model(cfg)[1].matcher.focal_alpha == 0.4


# --- init_from: fine-tuning from a ddetr checkpoint, an official .pth or a Hugging Face folder -------------------


def tiny(*overrides: str) -> Config:
    return apply_overrides(get_preset("tiny"), ["model.num_queries=10", *overrides])


def perturbed_tiny(cfg: Config) -> torch.nn.Module:
    """A tiny detector whose class heads are far from their init, so that kept rows are recognisable."""
    model = build_model(cfg)[0]
    with torch.no_grad():
        for head in model.class_embed:
            head.weight.normal_()
            head.bias.normal_()
    return model


def save_ddetr_checkpoint(folder, model: torch.nn.Module, cfg: Config, categories: list[dict] | None) -> str:
    """The payload ddetr.train writes (model, config, and the dataset's categories), optimizer left out."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"model": model.state_dict(), "config": cfg.to_dict()}
    if categories is not None:
        payload["categories"] = categories
    torch.save(payload, folder / "state.pt")
    write_manifest(folder)
    return str(folder)


def cats(**ids: int) -> list[dict]:
    return [{"id": i, "name": name.replace("_", " "), "supercategory": "thing"} for name, i in ids.items()]


def assert_body_equal(model: torch.nn.Module, source: torch.nn.Module) -> None:
    theirs = source.state_dict()
    for k, v in model.state_dict().items():
        if "class_embed" not in k:
            torch.testing.assert_close(v, theirs[k], rtol=0, atol=0, msg=k)


def test_init_from_a_ddetr_checkpoint_keeps_the_rows_of_matching_category_names(tmp_path, caplog):
    src_cfg = tiny("model.num_classes=8")
    source = perturbed_tiny(src_cfg)
    path = save_ddetr_checkpoint(tmp_path / "ckpt", source, src_cfg, cats(cat=2, dog=5, bird=7))
    cfg = tiny("model.num_classes=5")
    model = build_model(cfg)[0]
    with caplog.at_level("WARNING", logger="ddetr.models.weights"):
        reinit = init_from(model, path, cfg.model, cats(Cat=1, dog=3, zebra=4))
    assert reinit and all("class_embed" in k for k in reinit)
    assert "checkpoint 8 classes, dataset 5" in caplog.text and "2 classes kept" in caplog.text
    assert_body_equal(model, source)
    for i, head in enumerate(model.class_embed):
        src = source.class_embed[i]
        # Names match case-insensitively: Cat (row 1) <- cat (row 2), dog (row 3) <- dog (row 5).
        torch.testing.assert_close(head.weight[1], src.weight[2], rtol=0, atol=0)
        torch.testing.assert_close(head.bias[[1, 3]], src.bias[[2, 5]], rtol=0, atol=0)
        # zebra and the unnamed rows start from the focal prior.
        torch.testing.assert_close(head.bias[[0, 2, 4]].sigmoid(), torch.full((3,), 0.01))


def test_init_from_with_the_same_classes_loads_every_weight(tmp_path):
    cfg = tiny("model.num_classes=6")
    source = perturbed_tiny(cfg)
    categories = cats(cat=1, dog=5)
    path = save_ddetr_checkpoint(tmp_path / "ckpt", source, cfg, categories)
    model = build_model(cfg)[0]
    assert init_from(model, path, cfg.model, categories) == []
    assert_body_equal(model, source)
    torch.testing.assert_close(model.class_embed[0].weight, source.class_embed[0].weight, rtol=0, atol=0)
    # Without names on either side, an equal class count loads as it is too.
    model = build_model(cfg)[0]
    assert init_from(model, str(tmp_path / "ckpt" / "state.pt"), cfg.model, None) == []
    torch.testing.assert_close(model.class_embed[1].bias, source.class_embed[1].bias, rtol=0, atol=0)


def test_init_from_another_variant_is_one_error_listing_the_differences(tmp_path):
    src_cfg = tiny()
    path = save_ddetr_checkpoint(tmp_path / "ckpt", build_model(src_cfg)[0], src_cfg, None)
    cfg = tiny("model.with_box_refine=true", "model.dec_layers=3")
    with pytest.raises(ValueError, match="different variant") as e:
        init_from(build_model(cfg)[0], path, cfg.model, None)
    assert "model.with_box_refine: checkpoint False, config True" in str(e.value)
    assert "model.dec_layers: checkpoint 2, config 3" in str(e.value)
    with pytest.raises(FileNotFoundError, match="neither a ddetr checkpoint"):
        init_from(build_model(cfg)[0], str(tmp_path), cfg.model, None)


def official_args(**changes) -> argparse.Namespace:
    args = dict(
        backbone="resnet18", dilation=False, position_embedding="sine", num_feature_levels=4, hidden_dim=64,
        enc_layers=2, dec_layers=2, dim_feedforward=256, dropout=0.0, nheads=4, dec_n_points=4, enc_n_points=4,
        num_queries=10, with_box_refine=False, two_stage=False, aux_loss=True, masks=False, dataset_file="coco",
    )  # fmt: skip
    args.update(changes)
    return argparse.Namespace(**args)


def test_init_from_an_official_coco_checkpoint_maps_coco_names(tmp_path):
    source = perturbed_tiny(tiny("model.num_classes=91"))
    path = tmp_path / "r50_deformable_detr.pth"
    torch.save({"model": source.state_dict(), "args": official_args()}, path)
    cfg = tiny("model.num_classes=3")
    model = build_model(cfg)[0]
    init_from(model, str(path), cfg.model, cats(dog=1, person=2))
    head, src = model.class_embed[0], source.class_embed[0]
    torch.testing.assert_close(head.weight[1], src.weight[18], rtol=0, atol=0)  # COCO dog is id 18
    torch.testing.assert_close(head.weight[2], src.weight[1], rtol=0, atol=0)  # COCO person is id 1
    assert_body_equal(model, source)


def test_init_from_a_hf_folder_uses_its_id2label_and_fetches_nothing(tmp_path, monkeypatch):
    src_cfg = tiny("model.num_classes=4", "model.two_stage=true", "model.with_box_refine=true")
    source = perturbed_tiny(src_cfg)
    write_hf(source, src_cfg.model, tmp_path / "hf", {0: "N/A", 1: "apple", 2: "pear", 3: "plum"})

    def no_fetch(*args, **kwargs):
        raise AssertionError("ImageNet weights were fetched")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_fetch)
    cfg = apply_overrides(src_cfg, ["model.num_classes=3", "model.pretrained_backbone=imagenet"])
    model = build_model(cfg, load_backbone_weights=False)[0]
    init_from(model, str(tmp_path / "hf"), cfg.model, cats(plum=1, kiwi=2))
    for i, head in enumerate(model.class_embed):  # two-stage: the encoder's proposal head too
        torch.testing.assert_close(head.weight[1], source.class_embed[i].weight[3], rtol=0, atol=0)
    assert model.transformer.decoder.class_embed is model.class_embed
    assert_body_equal(model, source)


def test_export_hf_of_ddetr_and_official_checkpoints(tmp_path):
    cfg = tiny("model.num_classes=6")
    source = perturbed_tiny(cfg).eval()
    path = save_ddetr_checkpoint(tmp_path / "ckpt", source, cfg, cats(cat=1, dog=5))
    export_hf(path, tmp_path / "hf")
    model, m, id2label = read_hf(tmp_path / "hf")
    assert id2label == {0: "N/A", 1: "cat", 2: "N/A", 3: "N/A", 4: "N/A", 5: "dog"}
    assert dataclasses.replace(m, pretrained_backbone="none") == cfg.model
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images)["pred_logits"], source(images)["pred_logits"], rtol=0, atol=0)
    official = tmp_path / "official.pth"
    torch.save({"model": perturbed_tiny(tiny("model.num_classes=91")).state_dict(), "args": official_args()}, official)
    export_hf(official, tmp_path / "hf_official")
    _, m, id2label = read_hf(tmp_path / "hf_official")
    assert m.num_classes == 91 and id2label[1] == "person" and id2label[90] == "toothbrush" and id2label[0] == "N/A"
    detector, m2, names = load_detector(tmp_path / "hf_official")
    assert m2 == m and names == id2label
    src = read_weights(path)
    assert src.kind == "ddetr" and src.run_config == cfg and src.class_names == {1: "cat", 5: "dog"}


def test_training_with_init_from_keeps_the_rows_of_matching_category_names(tmp_path):
    """`ddetr.train.train(engine="local")` with `model.init_from` = a ddetr checkpoint of other classes."""
    from ddetr.data.synthetic import make_synthetic_coco
    from ddetr.train import train
    from ddetr.train.checkpoints import list_checkpoints, load_checkpoint, run_dir

    data = make_synthetic_coco(str(tmp_path / "syn"), 4, 0, seed=0, image_size=(64, 96))  # ids 1-4: shapes
    src_cfg = tiny("model.num_classes=9")
    source = perturbed_tiny(src_cfg)
    path = save_ddetr_checkpoint(tmp_path / "src", source, src_cfg, cats(ellipse=7, star=3, triangle=8))
    # lr 0 (and so a frozen backbone): the checkpoint after one step holds the initial weights.
    cfg = tiny(
        f"data.train={data.train_shards}", "data.scale=0.1", "data.loader_workers=0", "train.epochs=1",
        "train.max_steps_per_epoch=1", "train.lr=0", "train.lr_backbone=0", f"train.storage_path={tmp_path / 'runs'}",
        "train.name=ft", "model.num_classes=5", f"model.init_from={path}",
    )  # fmt: skip
    train(cfg, engine="local")
    payload = load_checkpoint(list_checkpoints(run_dir(cfg.train.storage_path, cfg.train.name))[-1])
    trained = payload["model"]
    for i in range(len(source.class_embed)):
        w, b = trained[f"class_embed.{i}.weight"], trained[f"class_embed.{i}.bias"]
        torch.testing.assert_close(w[2], source.class_embed[i].weight[7], rtol=0, atol=0)  # ellipse: 7 -> 2
        torch.testing.assert_close(w[3], source.class_embed[i].weight[8], rtol=0, atol=0)  # triangle: 8 -> 3
        torch.testing.assert_close(b[[0, 1, 4]].sigmoid(), torch.full((3,), 0.01))  # rectangle, diamond: prior
    torch.testing.assert_close(
        trained["transformer.encoder.layers.0.linear1.weight"], source.transformer.encoder.layers[0].linear1.weight
    )
    assert [c["name"] for c in payload["categories"]] == ["rectangle", "ellipse", "triangle", "diamond"]
