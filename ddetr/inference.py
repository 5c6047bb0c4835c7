"""Inference: load a detector from a ddetr or an official checkpoint, detect objects in images, draw them.

detector = Detector.from_checkpoint("results/demo/run")    # the demo's run: its best checkpoint; run/latest: newest
detections = detector.predict_files(["a.jpg", "b.jpg"])      # {path: {"scores", "labels", "boxes"}}
draw_detections("a.jpg", detections["a.jpg"], "a.png", names={1: "rectangle"})
predict_images(detector, list_images(["photos/"]), "preds/")  # detections.json and drawings, a batch at a time
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ddetr import io
from ddetr.config import Config, ConfigError, get_preset
from ddetr.data.collate import pad_and_normalize
from ddetr.data.images import UNREADABLE, decode_reduced, decode_upright
from ddetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TransformConfig, resized_size
from ddetr.image_sources import ImageSource
from ddetr.models import build_detector
from ddetr.models.deformable_detr import DeformableDETR, PostProcess
from ddetr.models.weights import read_weights
from ddetr.train.checkpoints import resolve_checkpoint

log = logging.getLogger(__name__)

DETECTIONS_FILE = "detections.json"
ONEDNN_CACHE_CAPACITY = "64"  # kernels oneDNN keeps on the CPU (see Detector.__init__)
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


class Detector:
    """A model in eval mode with its post-processing and the validation resize of its config."""

    def __init__(self, model: DeformableDETR, cfg: Config, device: str | torch.device | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cpu":
            # Why: oneDNN keeps a compiled kernel per convolution and input shape, up to 1,024 of them and a few MB
            # each, so images of many sizes make the resident size climb by hundreds of MB over a few hundred images
            # (benchmarks/predict_memory.py). A ResNet's forward uses about 20 shapes: 64 keep a few sizes' worth at
            # the same speed. oneDNN reads the variable when it first runs (a process that already ran a convolution
            # keeps its size); a value set by the user wins.
            os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_CAPACITY)
        self.model = model.to(self.device).eval()
        self.cfg = cfg
        self.postprocess = PostProcess()
        transforms = TransformConfig().scaled(cfg.data.scale)
        self.size, self.max_size = transforms.val_size, transforms.max_size
        self.class_names: dict[int, str] | None = None  # class row -> name, where the checkpoint says

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> Detector:
        """A ddetr checkpoint (folder or state.pt; its EMA when it has one), an official `.pth` (model + args), a
        Hugging Face model folder, or a run folder: its best checkpoint (`RUN_DIR/latest`: its newest; see
        `ddetr.train.checkpoints.resolve_checkpoint`). Nothing else is fetched: the backbone's ImageNet weights are
        not needed."""
        path = resolve_checkpoint(path)
        source = read_weights(path)
        if source.config is None:
            raise ConfigError(f"{path} has no run arguments, so its variant is unknown")
        cfg = source.run_config or dataclasses.replace(get_preset("deformable_detr"), model=source.config)
        if source.kind == "hf":  # its image processor says at what size it detects
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, scale=hf_scale(path)))
        model = build_detector(source.config, load_backbone_weights=False)
        model.load_state_dict(source.state)
        log.info("loaded %s checkpoint %s", source.kind, path)
        detector = cls(model, cfg, device)
        detector.class_names = source.class_names
        return detector

    @torch.no_grad()
    def predict(
        self, images: list[np.ndarray], sizes: list[tuple[int, int]] | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """Detect objects in (H, W, 3) uint8 RGB images.

        Args:
            sizes: per image, the (h, w) whose pixels the boxes are given in; default its own. An image reduced at
                decoding (`Detector.decode`) is detected in the pixels of the whole one this way: the model's boxes
                are fractions of the image.

        Returns:
            one dict per image: "scores" (K,), "labels" (K,) and "boxes" (K, 4) xyxy in pixels of its size.
        """
        resized = []
        for im in images:
            h, w = resized_size(im.shape[0], im.shape[1], self.size, self.max_size)
            resized.append(np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR)))
        batch, mask = pad_and_normalize(resized)
        outputs = self.model(batch.to(self.device), mask.to(self.device))
        sizes = sizes if sizes is not None else [im.shape[:2] for im in images]
        target = torch.tensor(sizes, dtype=torch.int64, device=self.device).reshape(-1, 2)
        return [{k: v.cpu() for k, v in r.items()} for r in self.postprocess(outputs, target)]

    def decode(self, data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
        """An encoded image's pixels, upright and reduced to what this detector reads (`images.decode_reduced`),
        and the (h, w) of the whole upright image."""
        return decode_reduced(data, self.size, self.max_size)

    def iter_predictions(
        self, paths: Iterable[str], batch_size: int = 4
    ) -> Iterator[tuple[str, bytes, dict[str, torch.Tensor]]]:
        """(path, its bytes, its detections) of each image file that decodes, in order, a batch at a time.

        Nothing is held per file, so memory does not grow with their number (benchmarks/predict_memory.py): one batch
        of bytes is read ahead (on threads: object storage answers in tens of milliseconds per request) while the
        batch before it is detected, and only reduced pixels (`Detector.decode`) reach the model. Boxes are in pixels
        of the upright image (EXIF orientation applied). A file that cannot be read or decoded is left out with a
        warning naming it; the others are still detected.
        """
        batches = _chunks(iter(paths), batch_size)
        with ThreadPoolExecutor(max_workers=min(batch_size, 8), thread_name_prefix="ddetr-read") as pool:
            pending = [(p, pool.submit(io.read_bytes, p)) for p in next(batches, [])]
            while pending:
                ahead = [(p, pool.submit(io.read_bytes, p)) for p in next(batches, [])]
                chunk, images, sizes = [], [], []
                for path, read in pending:
                    try:
                        data = read.result()
                        pixels, size = self.decode(data)
                    except UNREADABLE as err:  # a missing file is an OSError too
                        log.warning("skipping %s: not a readable image (%s: %s)", path, type(err).__name__, err)
                        continue
                    chunk.append((path, data))
                    images.append(pixels)
                    sizes.append(size)
                if chunk:
                    for (path, data), found in zip(chunk, self.predict(images, sizes), strict=True):
                        yield path, data, found
                pending = ahead

    def predict_files(self, paths: list[str], batch_size: int = 4) -> dict[str, dict[str, torch.Tensor]]:
        """Detections of each image file, by path (`iter_predictions`: skipped files are not in it). Holds every
        image's detections: for many files, write them as they come (`predict_images`)."""
        return {path: found for path, _, found in self.iter_predictions(paths, batch_size)}


def _chunks(items: Iterator[str], size: int) -> Iterator[list[str]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def predict_images(
    detector: Detector,
    images: Sequence[ImageSource],
    out: str | os.PathLike,
    *,
    batch_size: int = 8,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Detect objects in `images` (`ddetr.image_sources.list_images`); write `out/detections.json` and one drawing
    per image, `out/<image.name>.png`, with the checkpoint's class names.

    Both are written as the batches come: nothing is held per image but its path and name. `detections.json` holds COCO
    results (`coco_records`: image_id is the image's place in `images`, plus its "file_name") and appears whole
    when every image is done (written under a temporary name).

    Returns:
        {"images": detected, "detections", "skipped": [paths that did not read or decode], "file": the JSON's path}.
    """
    out = str(out)
    place = {image.path: i for i, image in enumerate(images)}
    names = {image.path: image.name for image in images}
    path = io.join(out, DETECTIONS_FILE)
    done, detections = set(), 0
    with io.atomic_open(path) as f:
        f.write("[")
        for source, data, found in detector.iter_predictions([image.path for image in images], batch_size):
            try:  # the whole image, to draw on: a file that decodes reduced may still be cut short further in
                picture = decode_upright(data)
            except UNREADABLE as err:
                log.warning("%s: detected, but not drawn: its full size does not decode (%s)", source, err)
            else:
                draw_detections(picture, found, io.join(out, f"{names[source]}.png"), names=detector.class_names,
                                threshold=threshold)  # fmt: skip
            rows = found["scores"].numpy(), found["labels"].numpy(), found["boxes"].numpy()
            for record in coco_records(place[source], *rows, names=detector.class_names):
                f.write(("," if detections else "") + json.dumps({**record, "file_name": source}))
                detections += 1
            done.add(source)
        f.write("]")
    skipped = [image.path for image in images if image.path not in done]
    return {"images": len(done), "detections": detections, "skipped": skipped, "file": path}


PREPROCESSOR_FILE = "preprocessor_config.json"


def hf_preprocessor_config(scale: float) -> dict[str, Any]:
    """A Hugging Face DeformableDetrImageProcessor config for our validation transform at `scale`."""
    t = TransformConfig().scaled(scale)
    return {
        "image_processor_type": "DeformableDetrImageProcessor",
        "format": "coco_detection",
        "do_resize": True,
        "size": {"shortest_edge": t.val_size, "longest_edge": t.max_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(v) for v in IMAGENET_MEAN],
        "image_std": [float(v) for v in IMAGENET_STD],
        "do_pad": True,
    }


def hf_scale(folder: str | os.PathLike) -> float:
    """Our `data.scale` of a Hugging Face folder's image processor (1.0, the paper's 800 px, without one)."""
    path = io.join(str(folder), PREPROCESSOR_FILE)
    if not io.exists(path):
        return 1.0
    return json.loads(io.read_text(path))["size"]["shortest_edge"] / TransformConfig().val_size


def read_image(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of an image file (or URI), upright, at full size (`images.decode_upright`)."""
    return decode_upright(io.read_bytes(path))


def coco_records(
    image_id: int,
    scores: np.ndarray,
    labels: np.ndarray,
    boxes: np.ndarray,
    names: dict[int, str] | None = None,
) -> list[dict[str, Any]]:
    """One image's detections as COCO results: "image_id", "category_id", "bbox" [x, y, w, h] (from `boxes` (K, 4)
    xyxy), "score", and "category_name" where `names` (category id -> name) knows the label."""
    rows = zip(scores.tolist(), labels.tolist(), boxes.tolist(), strict=True)
    records = []
    for score, label, (x0, y0, x1, y1) in rows:
        record = {"image_id": image_id, "category_id": int(label), "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score}
        if names and int(label) in names:
            record["category_name"] = names[int(label)]
        records.append(record)
    return records


def draw_detections(
    image: str | os.PathLike | np.ndarray,
    detections: dict[str, torch.Tensor],
    out: str | os.PathLike,
    names: dict[int, str] | None = None,
    threshold: float = 0.5,
    truth: list[tuple[float, float, float, float]] | None = None,
) -> str:
    """Draw detections scoring at least `threshold` (and, thin and white, the true xyxy boxes) into a PNG."""
    picture = Image.fromarray(image if isinstance(image, np.ndarray) else read_image(image))
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
    buffer = BytesIO()
    picture.save(buffer, format="PNG")
    io.atomic_write(out, buffer.getvalue())
    return str(out)
