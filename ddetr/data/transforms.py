"""The paper's image transforms (those of DETR), planned as geometry first and applied once.

Training: random horizontal flip; then with probability 1/2 either resize the shorter side to one
of ``scales`` (longer side at most ``max_size``), or resize the shorter side to one of
``crop_resize``, take a random crop with sides in ``crop_range`` (DETR's RandomSizeCrop) and resize
that crop as in the first branch. Validation: shorter side ``val_size``, longer at most ``max_size``.

Instead of resizing, cropping and resizing pixels in turn, ``sample_train_geometry`` draws the
same random choices from the image size alone and folds them into one ``Geometry``: a crop box in
original pixels, an output size and a flip. The decoder (``decode.py``) then decodes the JPEG at
the smallest DCT scale that still covers the output and resamples once. Boxes go through the same
geometry in original coordinates, so they stay exact whatever scale the decoder picked.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class AugmentationSettings(Protocol):
    """What the training transforms read of a run's config: `ddetr.config.DataConfig` has these fields (described
    there). A protocol, so that the data package does not import the config it is configured by."""

    scale: float
    crop_p: float
    multi_scale: bool


@dataclass(frozen=True)
class TransformConfig:
    """Sizes of the training and validation transforms; the defaults are the paper's."""

    scales: tuple[int, ...] = tuple(range(480, 801, 32))  # shorter side choices, 480..800 step 32
    max_size: int = 1333  # longer side cap
    crop_resize: tuple[int, ...] = (400, 500, 600)  # shorter side before the random crop
    crop_range: tuple[int, int] = (384, 600)  # crop side range, in pixels of the resized image
    val_size: int = 800
    flip_p: float = 0.5
    crop_p: float = 0.5  # probability of taking the crop branch

    def scaled(self, factor: float) -> TransformConfig:
        """Every size multiplied by ``factor`` (e.g. 0.2 gives shorter sides 96..160 for CPU runs)."""

        def s(v: int) -> int:
            return max(1, int(round(v * factor)))

        return replace(
            self,
            scales=tuple(sorted({s(v) for v in self.scales})),
            max_size=s(self.max_size),
            crop_resize=tuple(s(v) for v in self.crop_resize),
            crop_range=(s(self.crop_range[0]), s(self.crop_range[1])),
            val_size=s(self.val_size),
        )

    @classmethod
    def for_training(cls, data: AugmentationSettings) -> TransformConfig:
        """The training run's transforms: the paper's at `data.scale`, with the crop branch taken with probability
        `data.crop_p` and, without `data.multi_scale`, every training image resized as for validation."""
        t = replace(cls().scaled(data.scale), crop_p=data.crop_p)
        return t if data.multi_scale else replace(t, scales=(t.val_size,))

    @classmethod
    def small(cls) -> TransformConfig:
        """The CPU preset: the paper's transforms at 1/5 size (shorter side 96..160, max 267)."""
        return cls().scaled(0.2)


@dataclass(frozen=True)
class Geometry:
    """One sampled transform: crop ``(x0, y0, x1, y1)`` in original pixels, output ``(h, w)``, flip."""

    crop: tuple[float, float, float, float]
    out_size: tuple[int, int]
    flip: bool


def resized_size(h: int, w: int, size: int, max_size: int | None) -> tuple[int, int]:
    """Output (h, w) with the shorter side ``size`` and the longer at most ``max_size`` (DETR's rule), every side
    at least 1 pixel.

    Beyond DETR: an image of extreme aspect ratio (1x3000) gets a shorter side of 1 pixel where DETR's rule would give
    0, and a longer side of ``max_size`` where it would keep the image's own (3000); DETR's rounding may still leave
    the longer side a pixel over ``max_size``, as it always did.
    """
    short, long = min(h, w), max(h, w)
    capped = max_size is not None and long / short * size > max_size
    if capped:
        size = int(round(max_size * short / long))
    if short == size:
        out_short, out_long = short, long
    else:
        out_short, out_long = size, int(size * long / short)
    if capped and (out_short < 1 or out_long > max_size + 1):  # the short side rounded to 0 pixels, or kept at 1
        out_short, out_long = max(out_short, 1), max_size
    out_long = max(out_long, 1)
    return (out_long, out_short) if w < h else (out_short, out_long)


def sample_train_geometry(h: int, w: int, cfg: TransformConfig, rng: np.random.Generator) -> Geometry:
    """Draw the training transform for an image of size (h, w) (nothing is decoded)."""
    flip = bool(rng.random() < cfg.flip_p)
    x0, y0, x1, y1 = 0.0, 0.0, float(w), float(h)
    ch, cw = h, w
    if rng.random() < cfg.crop_p:
        # Resize to r (no cap, as DETR), crop a (ch, cw) window of that image, map it back.
        r = int(rng.choice(cfg.crop_resize))
        h1, w1 = resized_size(h, w, r, None)
        lo, hi = cfg.crop_range
        cw = int(rng.integers(min(lo, w1), min(w1, hi) + 1))
        ch = int(rng.integers(min(lo, h1), min(h1, hi) + 1))
        i = int(rng.integers(0, h1 - ch + 1))
        j = int(rng.integers(0, w1 - cw + 1))
        fy, fx = h1 / h, w1 / w
        x0, y0, x1, y1 = j / fx, i / fy, (j + cw) / fx, (i + ch) / fy
    s = int(rng.choice(cfg.scales))
    return Geometry((x0, y0, x1, y1), resized_size(ch, cw, s, cfg.max_size), flip)


def val_geometry(h: int, w: int, cfg: TransformConfig) -> Geometry:
    """The validation transform: the whole image resized to ``val_size`` (no flip)."""
    return Geometry((0.0, 0.0, float(w), float(h)), resized_size(h, w, cfg.val_size, cfg.max_size), False)


def transform_boxes(boxes_xywh: np.ndarray, geo: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Map COCO boxes through ``geo``.

    Args:
        boxes_xywh: (n, 4) boxes in original pixels.
    Returns:
        boxes (m, 4) xyxy in output pixels, and keep (n,) bool: the boxes that keep a non-zero
        area inside the crop (as DETR's crop, the others are dropped).
    """
    x0, y0, x1, y1 = geo.crop
    oh, ow = geo.out_size
    sx, sy = ow / (x1 - x0), oh / (y1 - y0)
    b = boxes_xywh.astype(np.float64).reshape(-1, 4)
    xyxy = np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], axis=1)
    xyxy = np.clip(xyxy, [x0, y0, x0, y0], [x1, y1, x1, y1]) - [x0, y0, x0, y0]
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    out = xyxy[keep] * [sx, sy, sx, sy]
    if geo.flip:
        out = np.stack([ow - out[:, 2], out[:, 1], ow - out[:, 0], out[:, 3]], axis=1)
    return out.astype(np.float32).reshape(-1, 4), keep


def xyxy_to_cxcywh_normalized(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(n, 4) xyxy pixels -> (n, 4) cxcywh in [0, 1] of an image of ``size`` (h, w)."""
    h, w = size
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2 / w, (boxes[:, 1] + boxes[:, 3]) / 2 / h
    bw, bh = (boxes[:, 2] - boxes[:, 0]) / w, (boxes[:, 3] - boxes[:, 1]) / h
    return np.stack([cx, cy, bw, bh], axis=1).astype(np.float32).reshape(-1, 4)


def image_rng(seed: int, epoch: int, image_id: int) -> np.random.Generator:
    """The generator of one image's augmentation: the same in every pipeline and every process."""
    return np.random.default_rng([seed, epoch, image_id])
