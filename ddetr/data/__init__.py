"""COCO as Parquet shards, a synthetic COCO, the paper's transforms, Ray Data and PyTorch pipelines.

Flow: ``convert_coco`` / ``make_synthetic_coco`` write shards -> ``build_ray_dataset`` (Ray Data,
with ``DetrCollateFn``) or ``build_dataloader`` (plain PyTorch) yield padded batches ->
``CocoEvaluator`` scores predictions against ``coco_from_shards``.

The names below load their module on first use, so that a Ray Data task importing
``ddetr.data.decode`` does not pay for torch or pycocotools, and ``import ddetr.data`` needs no Ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "STAT_NAMES": "coco_eval",
    "CocoEvaluator": "coco_eval",
    "coco_from_json": "coco_eval",
    "coco_from_shards": "coco_eval",
    "batch_to": "collate",
    "collate_examples": "collate",
    "ConvertSummary": "convert",
    "convert_coco": "convert",
    "ShardDataset": "loader",
    "build_dataloader": "loader",
    "DetrCollateFn": "pipeline",
    "build_ray_dataset": "pipeline",
    "DataError": "shards",
    "ShardMetadata": "shards",
    "ShardReadError": "shards",
    "UnreadableShardError": "shards",
    "open_split": "shards",
    "read_metadata": "shards",
    "SyntheticPaths": "synthetic",
    "make_synthetic_coco": "synthetic",
    "TransformConfig": "transforms",
    "BadRecordError": "validate",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from ddetr.data.coco_eval import STAT_NAMES, CocoEvaluator, coco_from_json, coco_from_shards  # noqa: F401
    from ddetr.data.collate import batch_to, collate_examples  # noqa: F401
    from ddetr.data.convert import ConvertSummary, convert_coco  # noqa: F401
    from ddetr.data.loader import ShardDataset, build_dataloader  # noqa: F401
    from ddetr.data.pipeline import DetrCollateFn, build_ray_dataset  # noqa: F401
    from ddetr.data.shards import (  # noqa: F401
        DataError,
        ShardMetadata,
        ShardReadError,
        UnreadableShardError,
        open_split,
        read_metadata,
    )
    from ddetr.data.synthetic import SyntheticPaths, make_synthetic_coco  # noqa: F401
    from ddetr.data.transforms import TransformConfig  # noqa: F401
    from ddetr.data.validate import BadRecordError  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ddetr.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ddetr.data.{_EXPORTS[name]}"), name)
