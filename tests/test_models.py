"""The detector: shapes of every variant, padding invariance, backbone, heads, post-processing, overfitting."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ddetr.config import PRESETS, Config, get_preset
from ddetr.models import build_model
from ddetr.models.backbone import Backbone, build_backbone
from ddetr.models.box_ops import box_cxcywh_to_xyxy, box_iou
from ddetr.models.deformable_detr import PostProcess
from ddetr.models.deformable_transformer import distinct_proposals
from ddetr.models.position_encoding import PositionEmbeddingSine


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these small models gain little from two, and lose 10x when the cores are shared with
    other processes (OpenMP threads spin-waiting on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shrunk(name: str, **changes) -> Config:
    """A preset with its structure (levels, dilation, refinement, two-stage) but a small size, for CPU tests, and
    a random backbone unless `pretrained_backbone` says otherwise (tests download nothing)."""
    cfg = get_preset(name)
    small = dict(
        backbone="resnet18",
        pretrained_backbone="none",
        d_model=64,
        nheads=4,
        enc_layers=2,
        dec_layers=2,
        dim_feedforward=128,
        num_queries=20,
        dropout=0.0,
        num_classes=7,
    )
    small.update(changes)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **small))


def batch(sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images of the given (h, w) zero-padded to a common size, and the padding mask."""
    H, W = max(h for h, _ in sizes), max(w for _, w in sizes)
    images = torch.zeros(len(sizes), 3, H, W)
    mask = torch.ones(len(sizes), H, W, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w)
        mask[i, :h, :w] = False
    return images, mask


TARGETS = [
    {"labels": torch.tensor([1, 5]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.25, 0.3, 0.2, 0.2]])},
    {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.5]])},
]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_runs_forward_and_backward(name):
    # Paper presets keep their ImageNet backbone setting (so the stem and layer1 are frozen) without fetching it.
    cfg = get_preset(name) if name == "tiny" else shrunk(name, pretrained_backbone="imagenet")
    model, criterion, post = build_model(cfg, load_backbone_weights=False)
    m = cfg.model
    images, mask = batch([(64, 96), (48, 80)])
    out = model(images, mask)
    B, Q, K = 2, m.num_queries, m.num_classes
    assert out["pred_logits"].shape == (B, Q, K) and out["pred_boxes"].shape == (B, Q, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert len(out["aux_outputs"]) == m.dec_layers - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (B, Q, K) and aux["pred_boxes"].shape == (B, Q, 4)
    if m.two_stage:
        # One proposal per encoder pixel: levels of a 64x96 input at strides 8, 16, 32, 64.
        S = 8 * 12 + 4 * 6 + 2 * 3 + 1 * 2
        assert out["enc_outputs"]["pred_logits"].shape == (B, S, K)
        assert out["enc_outputs"]["pred_boxes"].shape == (B, S, 4)
    else:
        assert "enc_outputs" not in out

    losses = criterion(out, TARGETS)
    expected = {"loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error"}
    expected |= {f"loss_{n}_{i}" for n in ("ce", "bbox", "giou") for i in range(m.dec_layers - 1)}
    assert expected <= set(losses)
    assert ("loss_ce_enc" in losses) == m.two_stage
    total = criterion.total_loss(losses)
    assert torch.isfinite(total)
    total.backward()
    params = {k: model.get_parameter(k) for k, _ in model.named_parameters(remove_duplicate=False)}
    # With ImageNet weights the stem and layer1 are frozen (from random weights, as `tiny`, they train); later
    # stages, projections, transformer and heads learn.
    pretrained = name != "tiny"
    assert params["backbone.0.body.conv1.weight"].requires_grad is not pretrained
    assert params["backbone.0.body.layer1.0.conv1.weight"].requires_grad is not pretrained
    for key in (
        "backbone.0.body.layer2.0.conv1.weight",
        "input_proj.0.0.weight",
        "class_embed.0.weight",
        "transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
        "bbox_embed.0.layers.2.weight",
    ):
        assert params[key].grad is not None and params[key].grad.abs().sum() > 0, key
    results = post["bbox"](out, torch.tensor([[480, 640], [360, 600]]))
    assert len(results) == 2 and results[0]["boxes"].shape == (min(100, Q * K), 4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deformable_detr", "box_refine", "two_stage", "single_scale_dc5"])
def test_full_size_paper_variants_run_on_a_small_image(name):
    """The real sizes (ResNet-50, 6 + 6 layers, 300 queries); 128x192 gives two-stage its 300 proposals."""
    model, criterion, _ = build_model(get_preset(name), load_backbone_weights=False)
    images, mask = batch([(128, 192)])
    out = model(images, mask)
    criterion.total_loss(criterion(out, TARGETS[:1])).backward()
    assert out["pred_logits"].shape == (1, 300, 91) and len(out["aux_outputs"]) == 5
    assert model.get_parameter("backbone.0.body.layer4.0.conv2.weight").grad is not None


def _pad(x: torch.Tensor, H: int, W: int, fill: torch.Tensor) -> torch.Tensor:
    """(C, h, w) -> (C, H, W) with `fill` outside."""
    out = fill.clone()
    out[:, : x.shape[1], : x.shape[2]] = x
    return out


@pytest.mark.parametrize("name", ["deformable_detr", "box_refine", "two_stage", "single_scale"])
def test_padding_does_not_leak_into_the_transformer(name):
    """An image padded inside a batch gives the outputs it gives alone, whatever the padded values are.

    The ResNet and the input projections' GroupNorm see the padded zeros (as in DETR and the official release),
    so the property is checked from the projected maps on: encoder, decoder, proposals and heads.
    """
    cfg = shrunk(name)
    model = build_model(cfg)[0].eval()
    L = cfg.model.num_feature_levels
    shapes = [[(8, 12), (4, 6), (2, 3), (1, 2)], [(6, 8), (3, 4), (2, 2), (1, 1)]]
    shapes = [s[:L] for s in shapes]
    srcs = [[torch.randn(64, h, w) for h, w in s] for s in shapes]
    pos_enc = model.backbone[1]

    def alone(i):
        masks = [torch.zeros(1, h, w, dtype=torch.bool) for h, w in shapes[i]]
        return model.forward_transformer([x[None] for x in srcs[i]], masks, [pos_enc(m) for m in masks])

    with torch.no_grad():
        singles = [alone(0), alone(1)]
        batched_srcs, batched_masks = [], []
        for lvl in range(L):
            H, W = shapes[0][lvl]
            # Garbage (large random values) in the padding: it must not matter.
            batched_srcs.append(torch.stack([_pad(srcs[i][lvl], H, W, 100 * torch.randn(64, H, W)) for i in (0, 1)]))
            m = torch.ones(2, H, W, dtype=torch.bool)
            for i in (0, 1):
                h, w = shapes[i][lvl]
                m[i, :h, :w] = False
            batched_masks.append(m)
        both = model.forward_transformer(batched_srcs, batched_masks, [pos_enc(m) for m in batched_masks])
    for i in (0, 1):
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(both[key][i], singles[i][key][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            both["aux_outputs"][0]["pred_boxes"][i], singles[i]["aux_outputs"][0]["pred_boxes"][0], atol=1e-4, rtol=1e-4
        )


def test_position_encoding_depends_only_on_the_valid_region():
    pe = PositionEmbeddingSine(32, normalize=True)
    mask = torch.ones(1, 10, 14, dtype=torch.bool)
    mask[0, :7, :9] = False
    padded = pe(mask)[0, :, :7, :9]
    alone = pe(torch.zeros(1, 7, 9, dtype=torch.bool))[0]
    torch.testing.assert_close(padded, alone)
    assert pe(mask).shape == (1, 64, 10, 14)
    # Normalised, centred coordinates: the first pixel's x is 0.5 / 9 of 2π, its sine feature 0 is sin of that.
    torch.testing.assert_close(alone[32, 0, 0], torch.tensor(0.5 / (9 + 1e-6) * 2 * torch.pi).sin())


@pytest.mark.parametrize(("name", "channels"), [("resnet18", [128, 256, 512]), ("resnet50", [512, 1024, 2048])])
def test_backbone_levels_strides_and_dc5(name, channels):
    images, mask = batch([(64, 96), (64, 64)])
    feats = Backbone(name, return_interm_layers=True, dilation=False)(images, mask)
    expected = [(2, c, 64 // s, 96 // s) for c, s in zip(channels, (8, 16, 32), strict=True)]
    assert [tuple(x.shape) for x, _ in feats] == expected
    # The second image's padding (columns 64..95) is downsampled to each level.
    assert [int((~m[1]).sum(-1)[0]) for _, m in feats] == [8, 4, 2]
    dc5 = Backbone(name, return_interm_layers=False, dilation=True)
    assert dc5.strides == [16] and dc5(images, mask)[0][0].shape == (2, channels[-1], 4, 6)


def test_resnet18_has_torchvision_names():
    body = Backbone("resnet18", return_interm_layers=True, dilation=False).body
    shapes = {k: tuple(v.shape) for k, v in body.state_dict().items()}
    assert shapes["conv1.weight"] == (64, 3, 7, 7)
    assert shapes["layer1.0.conv2.weight"] == (64, 64, 3, 3)
    assert shapes["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert shapes["layer4.1.bn2.running_var"] == (512,)
    assert "layer1.0.downsample.0.weight" not in shapes and "layer1.0.conv3.weight" not in shapes
    assert len([k for k in shapes if k.endswith(".weight") and "conv" in k or "downsample.0" in k]) == 20


def test_imagenet_weights_load_from_a_file_and_errors_are_clear(tmp_path, monkeypatch):
    source = Backbone("resnet18", True, False).body
    state = dict(source.state_dict())
    # A torchvision file also has the classifier and BN step counters: both are ignored.
    state.update(
        {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000), "bn1.num_batches_tracked": torch.tensor(0)}
    )
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    joiner = build_backbone("resnet18", 64, multi_scale=True, pretrained=str(path))
    for k, v in source.state_dict().items():
        torch.testing.assert_close(joiner[0].body.state_dict()[k], v)
    with pytest.raises(FileNotFoundError, match="pretrained_backbone"):
        build_backbone("resnet18", 64, multi_scale=True, pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(RuntimeError, match="do not fit resnet34"):
        build_backbone("resnet34", 64, multi_scale=True, pretrained=str(path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(RuntimeError, match="could not download"):
        build_backbone("resnet18", 64, multi_scale=True, pretrained="https://127.0.0.1:9/resnet18-unreachable.pth")


def test_box_refinement_blocks_the_gradient_at_the_previous_box():
    model = build_model(shrunk("box_refine"))[0]
    images, mask = batch([(64, 96)])
    features, pos = model.backbone(images, mask)
    srcs = [p(x) for p, (x, _) in zip(model.input_proj, features, strict=False)]
    masks = [m for _, m in features]
    srcs.append(model.input_proj[3](features[-1][0]))
    masks.append(torch.zeros(1, *srcs[-1].shape[-2:], dtype=torch.bool))
    pos.append(model.backbone[1](masks[-1]))
    hs, init_ref, inter_refs, _, _ = model.transformer(srcs, masks, pos, model.query_embed.weight)
    assert init_ref.requires_grad and not inter_refs.requires_grad
    assert inter_refs.shape == (2, 1, 20, 4)  # refined references are boxes after the first layer
    # Layer heads are distinct modules, shared with the decoder under the official key names.
    assert model.bbox_embed[0] is not model.bbox_embed[1]
    assert model.transformer.decoder.bbox_embed is model.bbox_embed


def test_heads_share_weights_without_refinement_and_start_from_the_prior():
    model = build_model(shrunk("deformable_detr"))[0]
    assert model.class_embed[0] is model.class_embed[1] and model.bbox_embed[0] is model.bbox_embed[1]
    torch.testing.assert_close(model.class_embed[0].bias.sigmoid(), torch.full((7,), 0.01))
    last = model.bbox_embed[0].layers[-1]
    assert (last.weight == 0).all() and last.bias.tolist() == [0.0, 0.0, -2.0, -2.0]
    two = build_model(shrunk("two_stage"))[0]
    assert len(two.class_embed) == 3 and two.transformer.decoder.class_embed is two.class_embed
    assert all((b.layers[-1].bias == 0).all() for b in two.bbox_embed)


def greedy_nms(scores: torch.Tensor, boxes: torch.Tensor, k: int, threshold: float) -> list[int]:
    """Textbook greedy NMS over one image's proposals (cxcywh), filled up to k with the best suppressed ones."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))[: 4 * k]
    xyxy = box_cxcywh_to_xyxy(boxes)
    kept, spare = [], []
    for i in order:
        overlaps = any(float(box_iou(xyxy[i : i + 1], xyxy[j : j + 1])[0]) > threshold for j in kept)
        (spare if overlaps or scores[i] == float("-inf") else kept).append(i)
    return (kept + spare)[:k]


def test_distinct_proposals_are_greedy_nms_filled_up_with_the_set_aside_ones():
    # Three near-copies of one box score best; then two boxes elsewhere; the last proposal is invalid (-inf).
    copies = [[0.5, 0.5, 0.4, 0.4], [0.51, 0.5, 0.4, 0.4], [0.5, 0.49, 0.4, 0.4]]
    boxes = torch.tensor(copies + [[0.15, 0.15, 0.2, 0.2], [0.8, 0.8, 0.2, 0.2], [0.5, 0.5, 0.1, 0.1]])
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, float("-inf")]])
    coords = torch.logit(boxes)[None]
    assert distinct_proposals(scores, coords, 3, 0.5).tolist() == [[0, 3, 4]]
    assert distinct_proposals(scores, coords, 6, 0.5).tolist() == [[0, 3, 4, 1, 2, 5]]  # then by score, invalid last
    assert distinct_proposals(scores, coords, 3, 0.99).tolist() == [[0, 1, 2]]  # nothing overlaps that much
    torch.manual_seed(0)
    scores, coords = torch.randn(3, 200), torch.randn(3, 200, 4) * 0.5 - torch.tensor([0.0, 0.0, 1.5, 1.5])
    chosen = distinct_proposals(scores, coords, 20, 0.4)
    for b in range(3):
        assert chosen[b].tolist() == greedy_nms(scores[b], coords[b].sigmoid(), 20, 0.4)


def test_two_stage_with_proposal_nms_trains_and_changes_only_the_selection():
    cfg = shrunk("two_stage")
    torch.manual_seed(0)
    plain, criterion, _ = build_model(cfg)
    cfg_nms = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, proposal_nms=0.3))
    nms = build_model(cfg_nms)[0]
    nms.load_state_dict(plain.state_dict())  # the option adds no weights
    # Large proposals everywhere, so that the plain top-k takes overlapping ones.
    for model in (plain, nms):
        with torch.no_grad():
            model.transformer.decoder.bbox_embed[-1].layers[-1].bias[2:] = 2.0
    images, mask = batch([(96, 128), (80, 112)])
    chosen = {}
    for name, model in (("plain", plain), ("nms", nms)):
        model.eval()
        refs: list[torch.Tensor] = []
        hook = model.transformer.decoder.register_forward_hook(lambda m, args, out, refs=refs: refs.append(args[1]))
        with torch.no_grad():
            model(images, mask)
        hook.remove()
        chosen[name] = box_cxcywh_to_xyxy(refs[0][0])

    def worst_overlap(xyxy: torch.Tensor) -> float:
        return float(box_iou(xyxy, xyxy)[0].fill_diagonal_(0).max())

    assert worst_overlap(chosen["plain"]) > 0.3 >= worst_overlap(chosen["nms"][:5])
    nms.train()
    criterion.total_loss(criterion(nms(images, mask), TARGETS)).backward()
    assert all(p.grad is not None for n, p in nms.named_parameters() if p.requires_grad and "backbone" not in n)


def test_encoder_checkpointing_gives_the_same_gradients():
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        cfg = shrunk("deformable_detr", checkpoint_encoder=flag)
        model, criterion, _ = build_model(cfg)
        images, mask = batch([(64, 96), (48, 64)])
        criterion.total_loss(criterion(model(images, mask), TARGETS)).backward()
        grads.append(model.transformer.encoder.layers[0].linear1.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_post_process_picks_top_scores_and_scales_boxes():
    logits = torch.full((1, 3, 2), -10.0)
    logits[0, 1, 0], logits[0, 2, 1] = 5.0, 3.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.25, 0.5, 0.5], [0.1, 0.1, 0.2, 0.2]]])
    res = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))[0]
    assert res["scores"].shape == (6,) and res["labels"][:2].tolist() == [0, 1]
    torch.testing.assert_close(res["scores"][0], torch.sigmoid(torch.tensor(5.0)))
    torch.testing.assert_close(res["boxes"][0], torch.tensor([50.0, 0.0, 150.0, 50.0]))
    torch.testing.assert_close(res["boxes"][1], torch.tensor([0.0, 0.0, 40.0, 20.0]))


@pytest.mark.slow
def test_tiny_preset_overfits_one_batch():
    torch.manual_seed(0)
    model, criterion, post = build_model(get_preset("tiny"))
    images, mask = batch([(64, 96), (64, 80)])
    targets = [
        {"labels": torch.tensor([1, 7]), "boxes": torch.tensor([[0.3, 0.35, 0.3, 0.4], [0.7, 0.6, 0.35, 0.5]])},
        {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.6]])},
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    first = None
    for _ in range(300):
        loss = criterion.total_loss(criterion(model(images, mask), targets))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        optimizer.step()
        first = first if first is not None else loss.item()
        # Well past the required 90%: at -90% the boxes are found but the classes of the two images still mix.
        if loss.item() < 0.04 * first:
            break
    assert loss.item() < 0.1 * first, (first, loss.item())
    model.eval()
    with torch.no_grad():
        results = post["bbox"](model(images, mask), torch.tensor([[64, 96], [64, 80]]))
    for res, t, (h, w) in zip(results, targets, [(64, 96), (64, 80)], strict=True):
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        gt = box_cxcywh_to_xyxy(t["boxes"]) * scale
        top = res["boxes"][: len(gt)]
        assert set(res["labels"][: len(gt)].tolist()) == set(t["labels"].tolist())
        # Each target is found by one of the top detections with IoU > 0.9.
        assert (box_iou(gt, top)[0].max(1).values > 0.9).all(), box_iou(gt, top)[0]
