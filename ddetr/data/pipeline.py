"""The Ray Data pipeline: shards -> epoch order -> parallel decode + augment -> padded batches.

::

    ds = build_ray_dataset(split_dir, cfg, train=True, seed=seed, epoch=epoch)
    trainer = TorchTrainer(..., datasets={"train": ds},
                           dataset_config=ray.train.DataConfig(datasets_to_split=["train"]))
    # in the train loop:
    shard = ray.train.get_dataset_shard("train")
    for batch in shard.iter_torch_batches(batch_size=B, collate_fn=DetrCollateFn(), drop_last=True):
        batch["images"], batch["mask"], batch["targets"]        # see collate.py

Stages. The driver computes this rank's part of the epoch order (``order.py``) and groups it by
shard: one small item per shard, naming the file and the rows to take in order. A dataset of those
items (one block each) is mapped by ``decode.decode_shard_rows``: one task per shard reads the rows with
pyarrow (any ``pyarrow.fs`` filesystem) and yields decoded, augmented batches of
``decode_batch_size`` images as it goes. ``ray.data.read_parquet`` is not used: it packs row groups
of several files into one block in an order of its own, which would make the epoch order depend on
block sizes. Tasks ask for ``num_cpus`` each (default 0.5): on a small machine, tasks holding a whole
CPU each leave nothing for the trainer, and Ray Data then stalls without an error. The dataset
preserves order, so one consumer sees exactly the plain DataLoader's order.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import ray
import ray.data
from ray.data.collate_fn import NumpyBatchCollateFn

from ddetr.data.collate import collate_columns
from ddetr.data.decode import decode_shard_rows
from ddetr.data.order import epoch_order, rank_sequence, shard_runs
from ddetr.data.shards import read_metadata, shard_uris
from ddetr.data.transforms import TransformConfig


class DetrCollateFn(NumpyBatchCollateFn):
    """``iter_torch_batches(collate_fn=DetrCollateFn())``: decoded columns to the model batch.

    Returns the dict of ``collate.py`` (images, mask, targets). Ray hands it back unmoved (it holds
    a list of target dicts); move it with ``collate.batch_to(batch, device)``.
    """

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return collate_columns(batch)


def build_ray_dataset(
    split_dir: str,
    cfg: TransformConfig,
    *,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    skip: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_cpus: float = 0.5,
    decode_batch_size: int = 16,
) -> ray.data.Dataset:
    """A Ray Dataset of decoded, augmented examples of one epoch of ``split_dir``.

    Rows have the columns of ``decode.EXAMPLE_SCHEMA`` (the transformed image's bytes and size,
    flat cxcywh boxes, labels, image id, original size); ``DetrCollateFn`` makes model batches.
    ``train`` selects the training transform and the shuffled epoch order (validation: file order,
    the validation transform, and every image once across ranks). Build a new dataset per epoch.
    ``num_cpus`` is what each decode task asks of Ray; ``decode_batch_size`` the images per block.

    Two ways to split across Ray Train workers:
      * each worker builds its own dataset with its ``rank`` and ``world_size``: it gets exactly
        the images ``order.rank_sequence`` deals it (reproducible, resumable per rank; every
        worker reads every shard's bytes but decodes only its own rows);
      * or one dataset (``world_size=1``) passed to ``TorchTrainer(datasets=...)`` with
        ``DataConfig(datasets_to_split=["train"])``: Ray splits blocks as workers ask for them.
    ``skip`` counts the images of the epoch already consumed by all ranks together (``order.py``).
    """
    if "://" not in split_dir:
        split_dir = os.path.abspath(split_dir)  # tasks may run in another working directory
    meta = read_metadata(split_dir)
    order = epoch_order([s.num_rows for s in meta.shards], seed, epoch, shuffle=train)
    uris = shard_uris(split_dir, meta)
    runs = shard_runs(rank_sequence(order, skip, rank, world_size, even=train))
    plan = [{"uri": uris[shard], "rows": rows.tolist()} for shard, rows in runs]
    if not plan:
        return ray.data.from_items([])
    # One block per shard, by construction: a Parquet reader would pack row groups of several
    # shards into one block, or split a shard, in an order of its own.
    ds = ray.data.from_items(plan, override_num_blocks=len(plan))
    ds = ds.map_batches(
        decode_shard_rows,  # in decode.py: a task's worker imports neither torch nor ray.data for it
        batch_format="pyarrow",
        batch_size=1,  # one shard per call: one task per shard, it yields decoded batches as it goes
        num_cpus=num_cpus,
        fn_kwargs={"cfg": cfg, "train": train, "seed": seed, "epoch": epoch, "chunk": decode_batch_size},
    )
    ds.context.execution_options.preserve_order = True
    return ds
