"""ONNX export: every variant, run by onnxruntime, against PyTorch on the same pixels (batch 1 and padded batches of
images of several sizes), and `ddetr export --format onnx`."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ddetr.cli import main
from ddetr.config import Config, get_preset
from ddetr.data.collate import pad_and_normalize
from ddetr.deploy.onnx import export_model
from ddetr.models import build_detector
from ddetr.models.deformable_detr import PostProcess
from ddetr.train.checkpoints import save_checkpoint

VARIANTS = {
    "single_scale": {"num_feature_levels": 1},
    "dc5": {"num_feature_levels": 1, "dilation": True},
    "multi_scale": {},
    "box_refine": {"with_box_refine": True},
    "two_stage": {"with_box_refine": True, "two_stage": True},
    "two_stage_nms": {"with_box_refine": True, "two_stage": True, "proposal_nms": 0.5},
}
TOP_K = 100
# fp32 parity of the graph with PyTorch (logits and boxes in [0, 1]); scores are sigmoids, boxes in pixels.
ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def tiny_model(variant: str) -> torch.nn.Module:
    """The tiny preset as `variant`, its heads and batch-norm statistics moved off their init so that every tensor
    matters and no two detections tie."""
    m = dataclasses.replace(get_preset("tiny").model, **VARIANTS[variant])
    torch.manual_seed(0)
    model = build_detector(m, load_backbone_weights=False).eval()
    with torch.no_grad():
        for k, p in model.named_parameters():
            if "_embed" in k:
                p.add_(0.1 * torch.randn_like(p))
        for k, b in model.named_buffers():
            b.copy_(torch.rand_like(b) + 0.5 if "running_var" in k else 0.1 * torch.randn_like(b))
    return model


def batches() -> list[list[np.ndarray]]:
    """Batch 1 at two sizes, then padded batches of images of different sizes."""
    rng = np.random.default_rng(0)
    sizes = [[(96, 128)], [(141, 103)], [(96, 128), (80, 112), (120, 90)], [(160, 70), (100, 150)]]
    return [[rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in batch] for batch in sizes]


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def assert_same_detections(got: list[np.ndarray], expected: list[dict[str, torch.Tensor]], scale: float) -> None:
    scores, labels, boxes = got
    for i, want in enumerate(expected):
        assert scores.shape[1] == TOP_K
        np.testing.assert_array_equal(labels[i], want["labels"].numpy())
        np.testing.assert_allclose(scores[i], want["scores"].numpy(), rtol=0, atol=ATOL)
        np.testing.assert_allclose(boxes[i], want["boxes"].numpy(), rtol=0, atol=ATOL * scale)


# DC5 and box refinement add nothing to export that single-scale and two-stage (refining too) do not have.
SLOW = ("dc5", "box_refine")


@pytest.mark.parametrize(
    "variant", [pytest.param(v, marks=pytest.mark.slow) if v in SLOW else v for v in sorted(VARIANTS)]
)
def test_onnxruntime_matches_pytorch(variant, tmp_path):
    model = tiny_model(variant)
    path = export_model(model, tmp_path / "model.onnx", top_k=TOP_K)
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    ops = {node.op_type for node in graph.graph.node}
    assert "GridSample" not in ops and "Gather" in ops  # the gather formulation, standard ops only
    assert not [n.domain for n in graph.graph.node if n.domain not in ("", "ai.onnx")]
    runner = session(path)
    postprocess = PostProcess(TOP_K)
    for images in batches():
        batch, mask = pad_and_normalize(images)
        sizes = torch.tensor([im.shape[:2] for im in images])
        with torch.no_grad():
            expected = model(batch, mask)
        got = runner.run(None, {"images": batch.numpy(), "mask": mask.numpy(), "orig_sizes": sizes.numpy()})
        logits, boxes = got[:2]
        assert logits.shape == tuple(expected["pred_logits"].shape)
        np.testing.assert_allclose(logits, expected["pred_logits"].numpy(), rtol=0, atol=ATOL)
        np.testing.assert_allclose(boxes, expected["pred_boxes"].numpy(), rtol=0, atol=ATOL)
        assert_same_detections(got[2:], postprocess(expected, sizes), scale=float(sizes.max()))


def test_cli_exports_a_checkpoint_and_names_a_user_mistake(tmp_path, capsys):
    cfg = get_preset("tiny")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=4))
    model = build_detector(cfg.model, load_backbone_weights=False).eval()
    categories = [{"id": i, "name": f"shape {i}"} for i in range(4)]
    checkpoint = tmp_path / "checkpoint_00000000"
    save_checkpoint(checkpoint, {"model": model.state_dict(), "config": cfg.to_dict(), "categories": categories}, {})
    out = tmp_path / "exported" / "detector.onnx"

    assert main(["export", "--format", "onnx", str(checkpoint), str(out)]) == 0
    assert "detector.onnx" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["detector.onnx"]  # no temporary file left behind
    graph = onnx.load(str(out))
    meta = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(meta["ddetr.class_names"]) == {str(i): f"shape {i}" for i in range(4)}
    assert Config.from_dict({"model": json.loads(meta["ddetr.model"])}).model == cfg.model
    assert [o.name for o in graph.graph.output] == ["pred_logits", "pred_boxes"]
    batch, mask = pad_and_normalize(batches()[2])
    logits, boxes = session(out).run(None, {"images": batch.numpy(), "mask": mask.numpy()})
    with torch.no_grad():
        expected = model(batch, mask)
    np.testing.assert_allclose(logits, expected["pred_logits"].numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(boxes, expected["pred_boxes"].numpy(), rtol=0, atol=ATOL)

    capsys.readouterr()
    for mistake, named in (([str(tmp_path / "missing")], "missing"), (["--top-k", "0", str(checkpoint)], "top-k")):
        assert main(["export", "--format", "onnx", *mistake, str(tmp_path / "x.onnx")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and named in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "x.onnx").exists()
