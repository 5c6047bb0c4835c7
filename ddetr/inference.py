"""Inference: load a detector from a ddetr or an official checkpoint, detect objects in images, draw them.

detector = Detector.from_checkpoint("runs/demo/checkpoint_00000400")
detections = detector.predict_files(["a.jpg", "b.jpg"])      # list of {"scores", "labels", "boxes"}
draw_detections("a.jpg", detections[0], "a.png", names={1: "rectangle"})
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ddetr.config import Config, get_preset
from ddetr.data.collate import pad_and_normalize
from ddetr.data.transforms import TransformConfig, resized_size
from ddetr.models import build_detector, config_from_official_args, load_official_checkpoint, read_checkpoint
from ddetr.models.deformable_detr import DeformableDETR, PostProcess
from ddetr.train.state import STATE_FILE, load_checkpoint

log = logging.getLogger(__name__)

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


class Detector:
    """A model in eval mode with its post-processing and the validation resize of its config."""

    def __init__(self, model: DeformableDETR, cfg: Config, device: str | torch.device | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.cfg = cfg
        self.postprocess = PostProcess()
        transforms = TransformConfig().scaled(cfg.data.scale) if cfg.data.scale != 1.0 else TransformConfig()
        self.size, self.max_size = transforms.val_size, transforms.max_size

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> Detector:
        """A ddetr checkpoint (a folder holding state.pt, or the file) or an official `.pth` (model + args)."""
        path = Path(path)
        if path.is_dir() or path.name == STATE_FILE:
            payload = load_checkpoint(path)
            cfg = Config.from_dict(payload["config"])
            model = build_detector(cfg.model)
            model.load_state_dict(payload["model"])
            return cls(model, cfg, device)
        checkpoint = read_checkpoint(path)
        cfg = get_preset("deformable_detr")
        if checkpoint.get("args") is not None:
            cfg.model = config_from_official_args(checkpoint["args"], cfg.model)
        model = build_detector(cfg.model)
        load_official_checkpoint(model, checkpoint)
        log.info("loaded official checkpoint %s", path)
        return cls(model, cfg, device)

    @torch.no_grad()
    def predict(self, images: list[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        """Detect objects in (H, W, 3) uint8 RGB images.

        Returns:
            one dict per image: "scores" (K,), "labels" (K,) and "boxes" (K, 4) xyxy in the image's pixels.
        """
        resized = []
        for im in images:
            h, w = resized_size(im.shape[0], im.shape[1], self.size, self.max_size)
            resized.append(np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR)))
        batch, mask = pad_and_normalize(resized)
        outputs = self.model(batch.to(self.device), mask.to(self.device))
        sizes = torch.tensor([im.shape[:2] for im in images], device=self.device)
        return [{k: v.cpu() for k, v in r.items()} for r in self.postprocess(outputs, sizes)]

    def predict_files(self, paths: list[str | os.PathLike], batch_size: int = 4) -> list[dict[str, torch.Tensor]]:
        results = []
        for i in range(0, len(paths), batch_size):
            images = [np.asarray(Image.open(p).convert("RGB")) for p in paths[i : i + batch_size]]
            results.extend(self.predict(images))
        return results


def coco_records(image_id: int, scores: np.ndarray, labels: np.ndarray, boxes: np.ndarray) -> list[dict[str, Any]]:
    """One image's detections as COCO results; `boxes` (K, 4) xyxy become xywh. Labels are category ids."""
    rows = zip(scores.tolist(), labels.tolist(), boxes.tolist(), strict=True)
    return [{"image_id": image_id, "category_id": int(label), "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score}
            for score, label, (x0, y0, x1, y1) in rows]  # fmt: skip


def draw_detections(
    image: str | os.PathLike | np.ndarray,
    detections: dict[str, torch.Tensor],
    out: str | os.PathLike,
    names: dict[int, str] | None = None,
    threshold: float = 0.5,
    truth: list[tuple[float, float, float, float]] | None = None,
) -> Path:
    """Draw detections scoring at least `threshold` (and, thin and white, the true xyxy boxes) into a PNG."""
    picture = Image.open(image).convert("RGB") if not isinstance(image, np.ndarray) else Image.fromarray(image)
    scale = max(1, 384 // max(picture.size))
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    for box in truth or []:
        draw.rectangle([v * scale for v in box], outline=(255, 255, 255), width=1)
    keep = detections["scores"] >= threshold
    kept = zip(detections["scores"][keep], detections["labels"][keep], detections["boxes"][keep], strict=True)
    for score, label, box in kept:
        colour = PALETTE[int(label) % len(PALETTE)]
        x0, y0, x1, y1 = (float(v) * scale for v in box)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        name = (names or {}).get(int(label), str(int(label)))
        draw.text((x0 + 2, max(0, y0 - 11)), f"{name} {float(score):.2f}", fill=colour)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp.png")
    picture.save(tmp)
    os.replace(tmp, out)
    return out
