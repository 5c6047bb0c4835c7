"""Hybrid matching and the training-only refinements (look forward twice, mixed query selection): the deployed
model stays the plain one, the one-to-many targets and the attention mask do what H-DETR's do, and LFT moves only
gradients. Tiny models on random images; no Ray."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_checkpoint import KEYS_FILE, parse_official_keys

from ddetr.config import Config, ConfigError, LossConfig, apply_overrides, get_preset
from ddetr.models import build_detector, build_model
from ddetr.models.checkpoint import shipped_state_dict
from ddetr.models.criterion import SetCriterion, build_weight_dict
from ddetr.models.hf import hf_config
from ddetr.models.hybrid import TRAINING_ONLY_PREFIX, group_attention_mask, repeat_targets
from ddetr.models.matcher import HungarianMatcher


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Variants of the tiny preset with every switch on that fits them: hybrid matching (T = 24 beside 10 queries, K = 3)
# and look forward twice; "two_stage_mqs" adds mixed query selection.
VARIANTS = {
    "single_stage": ["model.with_box_refine=true"],
    "two_stage": ["model.with_box_refine=true", "model.two_stage=true"],
    "two_stage_mqs": ["model.with_box_refine=true", "model.two_stage=true", "model.mixed_query_selection=true"],
}
BRANCH = ["loss.one_to_many_queries=24", "loss.one_to_many_repeat=3", "loss.look_forward_twice=true"]
TARGETS = [
    {"labels": torch.tensor([1, 5]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.25, 0.3, 0.2, 0.2]])},
    {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.5]])},
]


def tiny(variant: str, *overrides: str) -> Config:
    base = ["model.num_queries=10", "model.num_classes=7", *VARIANTS[variant], *overrides]
    return apply_overrides(get_preset("tiny"), base)


def images(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random images, the second padded (64x96 and 48x80): 128 encoder positions, so two-stage has proposals
    beyond its 10 queries for 24 more."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 64, 96, generator=g)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, 48:, :] = mask[1, :, 80:] = True
    x[1][:, mask[1]] = 0.0
    return x, mask


def trained_once(cfg: Config) -> tuple[torch.nn.Module, SetCriterion]:
    """The model of `cfg` after one SGD step on TARGETS, so no parameter is at its initial value."""
    torch.manual_seed(0)
    model, criterion, _ = build_model(cfg, load_backbone_weights=False)
    criterion.total_loss(criterion(model(*images()), TARGETS)).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.01 * p.grad.sign())
    model.zero_grad()
    return model, criterion


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_with_the_branch_on_every_parameter_learns_and_the_eval_graph_is_the_plain_models(variant):
    cfg = tiny(variant, *BRANCH)
    model, criterion = trained_once(cfg)
    out = model(*images())
    # Training: the one-to-many group is decoded beside the 10 queries, every layer of it.
    many = out["one_to_many"]
    assert out["pred_logits"].shape == (2, 10, 7) and many["pred_logits"].shape == (2, 24, 7)
    assert len(many["aux_outputs"]) == cfg.model.dec_layers - 1
    losses = criterion(out, TARGETS)
    assert {"loss_ce_one2many", "loss_bbox_0_one2many", "loss_giou_one2many"} <= set(losses)
    assert not any(k.endswith("_enc_one2many") for k in losses), "H-DETR trains the proposals one-to-one only"
    criterion.total_loss(losses).backward()
    # DDP (find_unused_parameters=False) needs a gradient on every trainable parameter at every step.
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []

    # Evaluation: the shipped weights are the plain model's keys, and give the plain model's outputs exactly.
    shipped = shipped_state_dict(model.state_dict())
    extra = sorted(set(model.state_dict()) - set(shipped))
    assert extra == ([] if variant == "two_stage" else [f"{TRAINING_ONLY_PREFIX}query_embed.weight"])
    plain = build_detector(cfg.model, load_backbone_weights=False)
    plain.load_state_dict(shipped)  # strict
    model.eval(), plain.eval()
    with torch.no_grad():
        a, b = model(*images(1)), plain(*images(1))
    assert "one_to_many" not in a and a.keys() == b.keys()
    for k in ("pred_logits", "pred_boxes"):
        assert torch.equal(a[k], b[k]), k
    assert all(
        torch.equal(x["pred_boxes"], y["pred_boxes"]) for x, y in zip(a["aux_outputs"], b["aux_outputs"], strict=True)
    )


@pytest.mark.parametrize(("variant", "preset"), [("base", "deformable_detr"), ("two_stage", "two_stage")])
def test_shipped_keys_of_a_full_size_hybrid_model_are_the_official_ones(variant, preset):
    official = parse_official_keys(KEYS_FILE)[variant]
    loss = LossConfig(one_to_many_queries=1500, one_to_many_repeat=6)
    with torch.device("meta"):
        model = build_detector(get_preset(preset).model, load_backbone_weights=False, loss=loss)
    shipped = {k: tuple(v.shape) for k, v in shipped_state_dict(model.state_dict()).items()}
    assert shipped == official
    extra = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in shipped}
    assert extra == ({} if preset == "two_stage" else {"one_to_many.query_embed.weight": (1500, 512)})


def test_one_to_many_targets_are_the_ground_truth_repeated_k_times():
    repeated = repeat_targets([{**t, "image_id": torch.tensor(i)} for i, t in enumerate(TARGETS)], 3)
    for t, r in zip(TARGETS, repeated, strict=True):
        n = len(t["labels"])
        assert r["labels"].tolist() == t["labels"].tolist() * 3
        assert torch.equal(r["boxes"], torch.cat([t["boxes"]] * 3)) and r["boxes"].shape == (3 * n, 4)
    assert [int(r["image_id"]) for r in repeated] == [0, 1]
    with pytest.raises(ValueError, match="at least once"):
        repeat_targets(TARGETS, 0)

    # The criterion's one-to-many losses are its plain losses of the group's outputs against those targets, over
    # K times the boxes, weighted by the branch's weight.
    torch.manual_seed(0)
    outputs = {
        "pred_logits": torch.randn(2, 10, 7),
        "pred_boxes": torch.rand(2, 10, 4) * 0.5 + 0.25,
        "one_to_many": {"pred_logits": torch.randn(2, 24, 7), "pred_boxes": torch.rand(2, 24, 4) * 0.5 + 0.25},
    }
    weights = build_weight_dict(2.0, 5.0, 2.0, dec_layers=1, aux_loss=False, one_to_many_weight=0.5)
    assert weights["loss_bbox_one2many"] == 2.5 and "loss_ce_enc_one2many" not in weights
    hybrid = SetCriterion(7, HungarianMatcher(), weights, one_to_many_repeat=3)
    losses = hybrid(outputs, TARGETS, num_boxes=3.0)
    hand_made = [{"labels": torch.cat([t["labels"]] * 3), "boxes": torch.cat([t["boxes"]] * 3)} for t in TARGETS]
    plain = SetCriterion(7, HungarianMatcher(), {})(outputs["one_to_many"], hand_made, num_boxes=9.0)
    for k in ("loss_ce", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(losses[f"{k}_one2many"], plain[k], rtol=0, atol=0)
    # 24 queries, 6 and 3 targets: every copy of every box has its own query.
    assert (
        0 < float(losses["loss_bbox_one2many"]) and hybrid.matcher(outputs["one_to_many"], hand_made)[0][0].numel() == 6
    )
    with pytest.raises(ValueError, match="repeats no targets"):
        SetCriterion(7, HungarianMatcher(), weights)(outputs, TARGETS)


def test_the_self_attention_mask_keeps_the_groups_apart():
    mask = group_attention_mask(2, 3, torch.device("cpu"))
    expected = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]])
    assert torch.equal(mask, expected.bool())


@pytest.mark.parametrize("variant", ["single_stage", "two_stage_mqs"])
def test_perturbing_the_one_to_many_queries_leaves_the_one_to_one_outputs_unchanged(variant):
    model, _ = trained_once(tiny(variant, *BRANCH))
    model.train()  # dropout is 0 in the tiny preset: training mode is deterministic, and has the branch
    x, mask = images()
    with torch.no_grad():
        before = model(x, mask)
        model.one_to_many.query_embed.weight.add_(torch.randn_like(model.one_to_many.query_embed.weight))
        after = model(x, mask)
    # The perturbation reaches the one-to-many outputs (the test would see a leak) ...
    assert not torch.allclose(after["one_to_many"]["pred_logits"], before["one_to_many"]["pred_logits"])
    # ... and not one bit of the one-to-one outputs, at any layer.
    assert torch.equal(after["pred_logits"], before["pred_logits"])
    assert torch.equal(after["pred_boxes"], before["pred_boxes"])
    for a, b in zip(after["aux_outputs"], before["aux_outputs"], strict=True):
        assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])
    # Without the mask the same perturbation does reach them: the mask is what keeps them apart.
    layer = model.transformer.decoder.layers[0]
    q = torch.randn(1, 34, 64)
    unmasked = layer.self_attn(q, q, q, need_weights=False)[0]
    q2 = torch.cat([q[:, :10], q[:, 10:] + 1.0], 1)
    assert not torch.allclose(layer.self_attn(q2, q2, q2, need_weights=False)[0][:, :10], unmasked[:, :10])
    masked = layer.self_attn(q, q, q, attn_mask=group_attention_mask(10, 24, q.device), need_weights=False)[0]
    masked2 = layer.self_attn(q2, q2, q2, attn_mask=group_attention_mask(10, 24, q.device), need_weights=False)[0]
    assert torch.equal(masked[:, :10], masked2[:, :10])


def test_look_forward_twice_trains_the_previous_layers_box_head_and_changes_nothing_at_evaluation():
    plain, _ = trained_once(tiny("single_stage", "model.dec_layers=3"))
    lft = build_model(
        tiny("single_stage", "model.dec_layers=3", "loss.look_forward_twice=true"), load_backbone_weights=False
    )[0]
    lft.load_state_dict(plain.state_dict())
    grads = {}
    for name, model in (("plain", plain), ("lft", lft)):
        model.train().zero_grad()
        model(*images())["pred_boxes"].sum().backward()  # the last layer's boxes only
        grads[name] = {n: p.grad for n, p in model.named_parameters(remove_duplicate=False)}
    # Layer 1's box head (refining layer 0's box, which layer 2 starts from) gets a gradient only with LFT.
    previous = "transformer.decoder.bbox_embed.1.layers.2.weight"
    assert grads["plain"][previous] is None
    assert grads["lft"][previous] is not None and grads["lft"][previous].abs().sum() > 0
    # The last layer's own head sees the same gradient either way.
    last = "bbox_embed.2.layers.2.weight"
    torch.testing.assert_close(grads["lft"][last], grads["plain"][last])
    plain.eval(), lft.eval()
    with torch.no_grad():
        a, b = plain(*images(1)), lft(*images(1))
    assert torch.equal(a["pred_boxes"], b["pred_boxes"]) and torch.equal(a["pred_logits"], b["pred_logits"])
    with pytest.raises(ConfigError, match="with_box_refine"):
        apply_overrides(get_preset("tiny"), ["loss.look_forward_twice=true"])


def test_mixed_query_selection_is_a_named_variant_that_the_hugging_face_export_refuses():
    cfg = tiny("two_stage_mqs")
    model = build_detector(cfg.model, load_backbone_weights=False)
    # Learned content queries, one per query: a key neither the official two-stage model nor Hugging Face has.
    assert model.state_dict()["query_embed.weight"].shape == (10, 64)
    assert Config.from_dict(cfg.to_dict()).model.mixed_query_selection  # the checkpoint's config says which
    with pytest.raises(ConfigError, match="mixed_query_selection=true") as err:
        hf_config(cfg.model, {i: str(i) for i in range(7)})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="needs two_stage"):
        apply_overrides(get_preset("tiny"), ["model.mixed_query_selection=true"])
    plain = dataclasses.replace(cfg.model, mixed_query_selection=False)
    assert "query_embed.weight" not in build_detector(plain, load_backbone_weights=False).state_dict()


@pytest.mark.slow  # ~20 s: two ONNX exports
def test_the_onnx_graph_of_a_hybrid_mixed_selection_model_is_the_plain_models(tmp_path):
    """ONNX can say what mixed query selection does (learned content queries are one more initializer), so it is
    exported; the model trained with the branch exports the graph of the model built without it."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from ddetr.deploy.onnx import export_model

    cfg = tiny("two_stage_mqs", *BRANCH)
    model, _ = trained_once(cfg)
    plain = build_detector(cfg.model, load_backbone_weights=False)
    plain.load_state_dict(shipped_state_dict(model.state_dict()))
    graphs = {}
    for name, m in (("hybrid", model.eval()), ("plain", plain.eval())):
        export_model(m, tmp_path / f"{name}.onnx")
        graphs[name] = onnx.load(tmp_path / f"{name}.onnx").graph
    assert [n.op_type for n in graphs["hybrid"].node] == [n.op_type for n in graphs["plain"].node]
    assert len(graphs["hybrid"].initializer) == len(graphs["plain"].initializer)
    x, mask = images(1)
    logits = ort.InferenceSession(tmp_path / "hybrid.onnx").run(None, {"images": x.numpy(), "mask": mask.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), plain(x, mask)["pred_logits"], rtol=0, atol=1e-4)
