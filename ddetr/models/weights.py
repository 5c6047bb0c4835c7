"""Detector weights from elsewhere: `init_from` (fine-tuning), `load_detector` and `export_hf`.

A source is one of
    an official `.pth` (fundamentalvision/Deformable-DETR: "model" and the run's "args"),
    a ddetr checkpoint (a folder holding `state.pt`, or that file: "model", "config", maybe "categories"),
    a Hugging Face folder (`config.json` + `model.safetensors`, see `ddetr.models.hf`).
Labels are category ids (class row r predicts category id r), so a source's class rows have names when it
carries them: COCO's for an official COCO run, the dataset's categories for ddetr, `id2label` for Hugging Face.
Nothing here fetches ImageNet weights: the model is built to be overwritten.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddetr import io
from ddetr.config import Config, ModelConfig
from ddetr.models.build import build_detector
from ddetr.models.checkpoint import (
    CLASS_HEAD_PREFIXES,
    STATE_FILE,
    config_from_official_args,
    read_checkpoint,
    shipped_state_dict,
    state_file,
)
from ddetr.models.deformable_detr import DeformableDETR
from ddetr.models.hf import is_hf_folder, read_hf, write_hf

log = logging.getLogger(__name__)

# Fields that shape the parameters: a fine-tuning source must agree on all of them (num_classes aside).
ARCHITECTURE_FIELDS = (
    "backbone",
    "dilation",
    "num_feature_levels",
    "d_model",
    "enc_layers",
    "dec_layers",
    "dim_feedforward",
    "nheads",
    "dec_n_points",
    "enc_n_points",
    "num_queries",
    "with_box_refine",
    "two_stage",
    "mixed_query_selection",  # learned content queries: a query_embed the other two-stage model lacks
    "backbone_norm",  # frozen batch norm holds buffers where group norm holds parameters
)
# The 80 COCO categories by id (ids 0, 12, 26, 29, 30, 45, 66, 68, 69, 71 and 83 are unused): the rows of the
# official COCO checkpoints' 91 logits.
COCO_CATEGORIES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant",
    13: "stop sign", 14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse",
    20: "sheep", 21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack",
    28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis", 36: "snowboard",
    37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove", 41: "skateboard",
    42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass", 47: "cup", 48: "fork", 49: "knife",
    50: "spoon", 51: "bowl", 52: "banana", 53: "apple", 54: "sandwich", 55: "orange", 56: "broccoli",
    57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut", 61: "cake", 62: "chair", 63: "couch",
    64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse",
    75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}  # fmt: skip


@dataclasses.dataclass
class WeightsSource:
    """A source read into our parameter names.

    state: our state dict; config: its ModelConfig (None for an official file without args);
    class_names: class row -> category name, where the source says; kind: "official", "ddetr" or "hf";
    run_config: a ddetr checkpoint's whole Config (data and train sections too), else None.
    """

    path: str
    kind: str
    state: dict[str, torch.Tensor]
    config: ModelConfig | None
    class_names: dict[int, str] | None
    run_config: Config | None = None


def read_weights(source: str | os.PathLike) -> WeightsSource:
    """Read an official `.pth`, a ddetr checkpoint (folder or `state.pt`) or a Hugging Face folder.

    `source` may be a URI (`s3://...`): the file or folder is downloaded for the call. A ddetr checkpoint folder
    is checked against its manifest first (`ddetr.models.checkpoint.state_file`).

    Raises:
        FileNotFoundError: none of these at `source`.
        CorruptCheckpointError: a ddetr checkpoint cut short, without a manifest, or unreadable.
    """
    if io.is_uri(source):
        if not io.exists(source):
            raise FileNotFoundError(f"no checkpoint at {source}")
        with io.local_copy(source) as local:
            return dataclasses.replace(read_weights(local), path=str(source))
    path = Path(source)
    if is_hf_folder(path):
        model, m, id2label = read_hf(path)
        return WeightsSource(os.fspath(path), "hf", model.state_dict(), m, id2label or None)
    if path.is_dir():
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(
                f"{os.fspath(path)!r} is neither a ddetr checkpoint folder ({STATE_FILE}) nor a Hugging Face model "
                "folder (config.json + model.safetensors)"
            )
        path = state_file(path)
    payload: dict[str, Any] = read_checkpoint(path)
    if isinstance(payload.get("config"), dict):  # ours: Config.to_dict()
        run = Config.from_dict(payload["config"])
        categories = payload.get("categories")
        names = {int(c["id"]): str(c["name"]) for c in categories} if categories else None
        # With an EMA the average is the model to deploy and to fine-tune from; training-only parameters are left out.
        state = shipped_state_dict(payload["ema"]["module"] if payload.get("ema") else payload["model"])
        return WeightsSource(os.fspath(path), "ddetr", state, run.model, names, run)
    args = payload.get("args")
    m = config_from_official_args(args) if args is not None else None
    dataset = getattr(args, "dataset_file", None) if args is not None else None
    names = dict(COCO_CATEGORIES) if dataset == "coco" else None
    return WeightsSource(os.fspath(path), "official", payload.get("model", payload), m, names)


def architecture_differences(source: ModelConfig, target: ModelConfig) -> list[str]:
    """The ARCHITECTURE_FIELDS on which two model configs differ (weights of one do not fit the other's model)."""
    return [f for f in ARCHITECTURE_FIELDS if getattr(source, f) != getattr(target, f)]


def _architecture_differences(source: ModelConfig, target: ModelConfig) -> list[str]:
    return [
        f"model.{f}: checkpoint {getattr(source, f)!r}, config {getattr(target, f)!r}"
        for f in architecture_differences(source, target)
    ]


def _norm(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def _class_rows(src: WeightsSource, categories: list[dict] | None) -> dict[int, int] | None:
    """Model row -> source row, for the dataset categories whose names the source has; None: no names to use."""
    if not src.class_names or not categories:
        return None
    by_name = {_norm(n): r for r, n in src.class_names.items() if _norm(n) not in ("n/a", "")}
    return {int(c["id"]): by_name[_norm(c["name"])] for c in categories if _norm(c["name"]) in by_name}


def init_from(model: DeformableDETR, source: str, cfg: ModelConfig, categories: list[dict] | None) -> list[str]:
    """Load a source's weights into `model` (built from `cfg`) to fine-tune it; the optimizer starts fresh.

    Everything but the class heads must fit exactly. The class heads load as they are when the class count
    and, where both sides name them, every category's row agree. Otherwise they are re-initialised with the
    focal prior, and the rows of the dataset categories whose names the source has (COCO's for an official
    COCO run, a ddetr checkpoint's categories, a Hugging Face `id2label`) are copied from their source rows.

    Args:
        model: the freshly built detector.
        source: an official `.pth`, a ddetr checkpoint folder or `state.pt`, or a Hugging Face folder.
        cfg: the run's model config, checked against the source's architecture.
        categories: the dataset's COCO category dicts ("id", "name"); None when unknown.

    Returns:
        the class-head keys re-initialised (empty when the heads loaded as they are); the log says which
        classes kept their trained rows.

    Raises:
        ValueError: the source's architecture differs from `cfg` (one message listing every difference).
        RuntimeError: the weights do not fit the model beyond the class heads.
    """
    src = read_weights(source)
    if src.config is not None:
        differences = _architecture_differences(src.config, cfg)
        if differences:
            raise ValueError(
                f"model.init_from={source} is a different variant from the config: " + "; ".join(differences)
                + " (set these in the config, e.g. pick the matching --preset, or choose another checkpoint)"
            )  # fmt: skip
    own = shipped_state_dict(model.state_dict())  # hybrid matching's one-to-many queries start afresh
    state = src.state
    heads = [k for k in own if k.startswith(CLASS_HEAD_PREFIXES)]
    body = {k: v for k, v in state.items() if not k.startswith(CLASS_HEAD_PREFIXES)}
    missing = sorted(set(own) - set(body) - set(heads))
    unexpected = sorted(set(body) - set(own))
    mismatched = sorted(k for k in set(own) & set(body) if own[k].shape != body[k].shape)
    if missing or unexpected or mismatched:
        raise RuntimeError(
            f"model.init_from={source} does not fit the model: missing {missing[:10]}, unexpected "
            f"{unexpected[:10]}, shape mismatches {mismatched[:10]}"
        )
    result = model.load_state_dict(body, strict=False)
    assert not result.unexpected_keys and all(k in heads or k not in own for k in result.missing_keys)

    source_classes = state["class_embed.0.bias"].shape[0]
    num_classes = own["class_embed.0.bias"].shape[0]
    rows = _class_rows(src, categories)
    same_rows = rows is None or (len(rows) == len(categories or []) and all(r == s for r, s in rows.items()))
    if source_classes == num_classes and same_rows:
        model.load_state_dict({k: state[k] for k in heads}, strict=False)
        log.info("model.init_from=%s: loaded every weight (%s, %d classes)", source, src.kind, num_classes)
        return []
    kept = {r: s for r, s in (rows or {}).items() if r < num_classes and s < source_classes}
    prior_bias = -math.log((1 - 0.01) / 0.01)
    with torch.no_grad():
        for i, head in enumerate(model.class_embed):
            head.reset_parameters()
            nn.init.constant_(head.bias, prior_bias)
            weight, bias = state[f"class_embed.{i}.weight"], state[f"class_embed.{i}.bias"]
            for r, s in kept.items():
                head.weight[r] = weight[s]
                head.bias[r] = bias[s]
    names = {int(c["id"]): c["name"] for c in categories or []}
    log.warning(
        "model.init_from=%s: class heads re-initialised with the focal prior (checkpoint %d classes, dataset %d); "
        "%d classes kept their trained rows by name%s",
        source,
        source_classes,
        num_classes,
        len(kept),
        (": " + ", ".join(names.get(r, str(r)) for r in sorted(kept))) if kept else "",
    )
    return sorted(heads)


def load_detector(source: str | os.PathLike) -> tuple[DeformableDETR, ModelConfig, dict[int, str] | None]:
    """A detector with a source's weights, its ModelConfig and its class names (row -> name, or None).

    Raises:
        ValueError: an official file without its run's args (its variant cannot be known).
    """
    src = read_weights(source)
    if src.config is None:
        raise ValueError(f"{src.path!r} has no run arguments, so its variant is unknown; load it with a config")
    model = build_detector(src.config, load_backbone_weights=False)
    model.load_state_dict(src.state)
    return model, src.config, src.class_names


def export_hf(checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a ddetr checkpoint or an official `.pth` as a Hugging Face folder (config.json + model.safetensors).

    Class rows without a name are "N/A" (COCO's unused ids, as in the Hugging Face COCO models), or all
    "LABEL_{i}" when the source names none.
    """
    model, m, names = load_detector(checkpoint_path)
    id2label = {i: (names.get(i, "N/A") if names else f"LABEL_{i}") for i in range(m.num_classes)}
    folder = write_hf(model, m, out_dir, id2label)
    log.info("exported %s to %s", checkpoint_path, folder)
    return folder
