"""ONNX export of a detector, every variant, with dynamic batch and image size and optional post-processing.

    export_onnx("results/demo/run", "detector.onnx", top_k=100)   # ddetr export --format onnx

The graph takes what the model takes: "images" (B, 3, H, W) float32, a padded batch normalised with the ImageNet
mean and std, and "mask" (B, H, W) bool, True at padding; B, H and W are free. It returns "pred_logits" (B, Q, K)
and "pred_boxes" (B, Q, 4) (cx, cy, w, h) in [0, 1] of each valid image. With post-processing it also takes
"orig_sizes" (B, 2) int64 (h, w) and returns the top-k detections as `PostProcess` gives them: "scores" (B, k),
"labels" (B, k) int64 (category ids) and "boxes" (B, k, 4) xyxy in pixels of (h, w). Two-stage graphs need
images whose feature maps hold at least num_queries positions, as the model does.

The deformable attention exports as the gather formulation (`ddetr.ops.gather`: integer indices, `Gather` and
bilinear weights, no `GridSample`); `ddetr.ops.ms_deform_attn.select_backend` picks it while exporting. The file
carries the class names and the preprocessing (resize sizes, mean, std) in its metadata.
"""

from __future__ import annotations

import io as _io
import json
import logging
import os
import warnings

import torch
from torch import nn

from ddetr import io
from ddetr.config import ConfigError
from ddetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TransformConfig
from ddetr.models.deformable_detr import DeformableDETR, PostProcess

log = logging.getLogger(__name__)

OPSET = 17  # LayerNormalization is a standard op from 17 on, so the encoder and decoder norms stay one node each
RAW_OUTPUTS = ("pred_logits", "pred_boxes")
DETECTION_OUTPUTS = ("scores", "labels", "boxes")


class ExportedDetector(nn.Module):
    """The model with its outputs as a tuple (what a graph returns) and, optionally, `PostProcess.batched`.

    Args:
        model: the detector, in eval mode.
        num_select: keep the top `num_select` (query, class) pairs in the graph; None for the raw outputs only.
    """

    def __init__(self, model: DeformableDETR, num_select: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.postprocess = PostProcess(num_select) if num_select else None

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor, orig_sizes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """images (B, 3, H, W), mask (B, H, W), orig_sizes (B, 2) -> RAW_OUTPUTS (+ DETECTION_OUTPUTS)."""
        out = self.model(images, mask)
        raw = (out["pred_logits"], out["pred_boxes"])
        if self.postprocess is None:
            return raw
        return raw + self.postprocess.batched(*raw, orig_sizes)


def example_inputs(
    batch: int = 2, size: tuple[int, int] = (256, 320), postprocess: bool = False
) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with: random pixels, the last image padded at the bottom and the right."""
    H, W = size
    images = torch.randn(batch, 3, H, W)
    mask = torch.zeros(batch, H, W, dtype=torch.bool)
    mask[-1, (3 * H) // 4 :] = True
    mask[-1, :, (2 * W) // 3 :] = True
    if not postprocess:
        return images, mask
    return images, mask, torch.tensor([[H, W]] * batch)


def export_model(
    model: DeformableDETR,
    out: str | os.PathLike,
    *,
    top_k: int | None = None,
    metadata: dict[str, str] | None = None,
    opset: int = OPSET,
) -> str:
    """Write `model` as an ONNX file at `out`, a local path or a URI (atomically: a temporary name, then renamed).

    Args:
        model: any variant (single-scale, DC5, multi-scale, box refinement, two-stage); it is moved to the CPU
            and put in eval mode.
        top_k: also put post-processing in the graph, keeping the top_k detections; None: raw outputs only.
        metadata: strings stored in the file's metadata_props.
        opset: the ONNX opset.

    Returns:
        the path written.
    """
    model = model.cpu().eval()
    wrapper = ExportedDetector(model, top_k)
    args = example_inputs(postprocess=top_k is not None)
    input_names = ["images", "mask"] + (["orig_sizes"] if top_k else [])
    output_names = list(RAW_OUTPUTS) + (list(DETECTION_OUTPUTS) if top_k else [])
    image_axes = {0: "batch", 2: "height", 3: "width"}
    dynamic_axes = {"images": image_axes, "mask": {0: "batch", 1: "height", 2: "width"}}
    dynamic_axes |= {name: {0: "batch"} for name in input_names[2:] + output_names}
    buffer = _io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript-based exporter (dynamo=False). Both exporters give the same graph numbers here (checked
        # at several sizes, batch 1 and 3 with padding, 1e-6 apart from PyTorch), but torch.export's symbolic
        # reasoning over the level sizes took 326 s on the tiny model on a shared 2-core machine against 8 s
        # for the trace, and it records guards (the smallest level wider than one pixel) the traced graph does
        # not need.
        # The trace keeps sizes dynamic because the model builds its level shapes from the maps' own shapes
        # (ddetr.models.deformable_transformer), never from Python numbers read back from tensors.
        # Python conditions on static sizes (channels, the number of levels, argument checks) become constants
        # of the trace, which is what they are; the exporter's deprecation notice is about its future, not this.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\._internal")
        torch.onnx.export(
            wrapper,
            args,
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    payload = buffer.getvalue()
    if metadata:
        import onnx

        graph = onnx.load_from_string(payload)
        for key, value in metadata.items():
            graph.metadata_props.add(key=key, value=value)
        payload = graph.SerializeToString()
    io.atomic_write(out, payload)
    return str(out)


def export_onnx(
    checkpoint: str | os.PathLike, out: str | os.PathLike, *, top_k: int | None = None, opset: int = OPSET
) -> str:
    """Export a checkpoint (anything `ddetr.inference.Detector.from_checkpoint` reads) to an ONNX file.

    Args:
        checkpoint: a ddetr checkpoint folder or state.pt, an official .pth with its args, a Hugging Face folder.
        out: the .onnx file to write (a local path or a URI).
        top_k: include post-processing in the graph, keeping this many detections per image; None: raw outputs.
        opset: the ONNX opset.

    Raises:
        FileNotFoundError, ConfigError: the checkpoint cannot be read or its variant is unknown.
    """
    from ddetr.inference import Detector

    if top_k is not None and top_k < 1:
        raise ConfigError(f"top-k must be at least 1, got {top_k}")
    detector = Detector.from_checkpoint(checkpoint, device="cpu")
    transforms = TransformConfig().scaled(detector.cfg.data.scale)
    metadata = {
        "ddetr.inputs": "images: (B, 3, H, W) float32 normalised RGB, padded; mask: (B, H, W) bool, True at padding"
        + ("; orig_sizes: (B, 2) int64 (h, w) of the boxes' pixels" if top_k else ""),
        "ddetr.resize": json.dumps({"shortest_edge": transforms.val_size, "longest_edge": transforms.max_size}),
        "ddetr.mean": json.dumps([float(v) for v in IMAGENET_MEAN]),
        "ddetr.std": json.dumps([float(v) for v in IMAGENET_STD]),
        "ddetr.class_names": json.dumps({str(k): v for k, v in (detector.class_names or {}).items()}),
        "ddetr.model": json.dumps(detector.cfg.to_dict()["model"]),
    }
    path = export_model(detector.model, out, top_k=top_k, metadata=metadata, opset=opset)
    log.info("exported %s to %s", checkpoint, path)
    return path
