"""Examples to a model batch: pad to the largest image, build the padding mask; normalise on the device.

The batch is a dict::

    images   (B, 3, Hmax, Wmax) uint8, zero where padded; ``batch_to(batch, device)`` turns it into
             float32, ImageNet-normalised, zero where padded, on the device (a quarter of the bytes
             to move, and the arithmetic where the model runs)
    mask     (B, Hmax, Wmax) bool, True at padding (DETR's NestedTensor mask)
    targets  list of B dicts: boxes (n, 4) float32 cxcywh in [0, 1] of the unpadded image,
             labels (n,) int64, image_id () int64, orig_size (2,) int64 (h, w) of the file,
             size (2,) int64 (h, w) of the unpadded transformed image

Both pipelines end here: Ray Data through ``pipeline.DetrCollateFn``, the plain DataLoader through
``collate_examples``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ddetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def pad_images(images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(h_i, w_i, 3) uint8 images -> images (B, 3, Hmax, Wmax) uint8 and mask (B, Hmax, Wmax) bool."""
    hmax = max(im.shape[0] for im in images)
    wmax = max(im.shape[1] for im in images)
    # numpy, not torch: torch's intra-op threads would fight the model's for the same cores.
    out = np.zeros((len(images), 3, hmax, wmax), dtype=np.uint8)
    mask = np.ones((len(images), hmax, wmax), dtype=bool)
    for i, im in enumerate(images):
        h, w = im.shape[:2]
        out[i, :, :h, :w] = im.transpose(2, 0, 1)
        mask[i, :h, :w] = False
    return torch.from_numpy(out), torch.from_numpy(mask)


def normalize_images(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32 ImageNet-normalised, zero where ``mask`` (B, H, W) is True.

    Runs where the tensors are (the trainer's device).
    """
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    out = (images.float() / 255 - mean) / std
    return out.masked_fill_(mask[:, None], 0.0)


def pad_and_normalize(images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(h_i, w_i, 3) uint8 images -> images (B, 3, Hmax, Wmax) float32 normalised and mask (B, Hmax, Wmax)."""
    padded, mask = pad_images(images)
    return normalize_images(padded, mask), mask


def collate_columns(batch: dict[str, Any]) -> dict[str, Any]:
    """A decoded batch (``decode.EXAMPLE_SCHEMA`` columns, as numpy arrays) to the model batch, with "substituted":
    how many of its images stand in for one that failed to decode."""
    heights, widths = np.asarray(batch["height"]), np.asarray(batch["width"])
    images = [
        np.frombuffer(batch["image"][i], dtype=np.uint8).reshape(heights[i], widths[i], 3) for i in range(len(heights))
    ]
    substituted = int(np.sum(batch["substitute"])) if "substitute" in batch else 0
    return {
        "substituted": substituted,
        **_assemble(
            images,
            list(batch["boxes"]),
            list(batch["labels"]),
            batch["image_id"],
            np.stack([batch["orig_height"], batch["orig_width"]], axis=1),
            np.stack([heights, widths], axis=1),
        ),
    }


def table_columns(table: pa.Table) -> dict[str, Any]:
    """A decoded Arrow batch (``decode.EXAMPLE_SCHEMA``) as the numpy columns ``collate_columns`` takes, each image a
    view of the table's buffer: Ray's own conversion to numpy copies every image into a bytes object first (in the
    trainer's process, ~2.5 MB an image at the paper's scale)."""
    columns = {
        name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names if name != "image"
    }
    images: list[np.ndarray] = []
    for chunk in table.column("image").chunks:
        _, offsets, data = chunk.buffers()
        width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32  # should Ray widen the column
        ends = np.frombuffer(offsets, dtype=width)[chunk.offset : chunk.offset + len(chunk) + 1]
        flat = np.frombuffer(data, dtype=np.uint8) if data is not None else np.empty(0, np.uint8)
        images += [flat[ends[i] : ends[i + 1]] for i in range(len(chunk))]
    columns["image"] = images
    return columns


def collate_examples(examples: list[dict[str, Any]], numpy_targets: bool = False) -> dict[str, Any]:
    """A list of ``decode.decode_example`` dicts to the model batch (the DataLoader's collate_fn).

    ``numpy_targets`` leaves the targets as numpy arrays (for ``targets_to_torch`` in another
    process: a DataLoader worker sends each tensor through its own shared-memory segment, which
    costs more than pickling a few small arrays).
    """
    return _assemble(
        [e["image"] for e in examples],
        [e["boxes"] for e in examples],
        [e["labels"] for e in examples],
        [e["image_id"] for e in examples],
        [e["orig_size"] for e in examples],
        [e["size"] for e in examples],
        numpy_targets,
    )


def _assemble(
    images: list[np.ndarray],
    boxes: list[np.ndarray],
    labels: list[np.ndarray],
    image_ids: Sequence[int],
    orig_sizes: Sequence[Sequence[int]],
    sizes: Sequence[Sequence[int]],
    numpy_targets: bool = False,
) -> dict[str, Any]:
    padded, mask = pad_images(images)
    targets = [
        {
            "boxes": np.array(boxes[i], dtype=np.float32).reshape(-1, 4),
            "labels": np.array(labels[i], dtype=np.int64).reshape(-1),
            "image_id": np.array(int(image_ids[i]), dtype=np.int64),
            "orig_size": np.array([int(v) for v in orig_sizes[i]], dtype=np.int64),
            "size": np.array([int(v) for v in sizes[i]], dtype=np.int64),
        }
        for i in range(len(images))
    ]
    batch = {"images": padded, "mask": mask, "targets": targets}
    return batch if numpy_targets else targets_to_torch(batch)


def targets_to_torch(batch: dict[str, Any]) -> dict[str, Any]:
    """Turn a batch's numpy targets into tensors (zero-copy)."""
    targets = [{k: torch.from_numpy(v) for k, v in t.items()} for t in batch["targets"]]
    return {**batch, "targets": targets}


def batch_to(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move a model batch (images, mask and every target tensor) to ``device``; normalise uint8 images there.

    Returns images (B, 3, Hmax, Wmax) float32, ImageNet-normalised, zero where padded. A batch whose
    images are float already is moved as it is.
    """
    images = batch["images"].to(device, non_blocking=True)
    mask = batch["mask"].to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = normalize_images(images, mask)
    return {
        "images": images,
        "mask": mask,
        "targets": [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in batch["targets"]],
    }
