"""The plain PyTorch path over the shards: an IterableDataset and a DataLoader, no Ray needed.

It reads the same shards in the same epoch order (``order.py``), decodes with the same function and
collates to the same batch as the Ray Data pipeline, so the engine can run either, and a single
process can debug what a cluster runs.

With ``num_workers`` DataLoader workers, the rank's sequence is cut into chunks of ``batch_size``
images dealt round-robin to the workers; the DataLoader takes batches from its workers round-robin
too, so the batches come out in epoch order exactly (while no image fails to decode). Each worker
reads the shards it needs, one at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ddetr.data.collate import collate_examples, targets_to_torch
from ddetr.data.decode import ROW_COLUMNS, try_decode_example
from ddetr.data.order import epoch_order, rank_sequence, shard_runs
from ddetr.data.shards import ShardMetadata, read_metadata, read_shard, shard_uris
from ddetr.data.transforms import TransformConfig


class ShardDataset(IterableDataset):
    """Examples of one split in epoch order (``decode.decode_example`` dicts).

    Args:
        split_dir: a converted split (path or URI).
        cfg: transform sizes. ``train`` picks the training transforms and the shuffled order;
            validation reads in file order with the validation transform.
        seed: seeds the epoch order and the augmentations.
        rank, world_size: this process's share when running data-parallel without Ray (training:
            equal shares, the remainder left out; validation: every image once, see ``order.py``).
        chunk: images per chunk dealt to DataLoader workers (use the batch size).
    Call ``set_epoch(epoch, skip)`` before iterating an epoch; ``skip`` counts the images of the
    epoch already consumed by all ranks together (see ``order.py``).
    """

    def __init__(
        self,
        split_dir: str,
        cfg: TransformConfig,
        *,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        chunk: int = 1,
    ) -> None:
        super().__init__()
        self.meta: ShardMetadata = read_metadata(split_dir)
        self.uris = shard_uris(split_dir, self.meta)
        self.cfg, self.train, self.seed = cfg, train, seed
        self.rank, self.world_size, self.chunk = rank, world_size, chunk
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def sequence(self) -> np.ndarray:
        """(M, 2) (shard, row) pairs this rank reads this epoch, in order."""
        order = epoch_order([s.num_rows for s in self.meta.shards], self.seed, self.epoch, shuffle=self.train)
        return rank_sequence(order, self.skip, self.rank, self.world_size, even=self.train)

    def __len__(self) -> int:
        return len(self.sequence())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        seq = self.sequence()
        mine = seq[(np.arange(len(seq)) // self.chunk) % workers == worker]
        for shard, rows in shard_runs(mine):
            table = read_shard(self.uris[shard], list(ROW_COLUMNS)).take(pa.array(rows, type=pa.int64())).to_pydict()
            for i in range(len(rows)):
                record = {k: table[k][i] for k in ROW_COLUMNS}
                example = try_decode_example(record, self.cfg, self.train, self.seed, self.epoch)
                if example is not None:
                    yield example


class ShardLoader:
    """A DataLoader over a ``ShardDataset`` yielding model batches; ``dataset`` and ``len`` as its own.

    Its workers collate with numpy targets, turned into tensors here in the consuming process (see
    ``collate.collate_examples``).
    """

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.dataset: ShardDataset = loader.dataset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield targets_to_torch(batch)

    def __len__(self) -> int:
        return len(self.loader)


def build_dataloader(
    split_dir: str,
    cfg: TransformConfig,
    *,
    train: bool,
    batch_size: int,
    seed: int = 0,
    epoch: int = 0,
    skip: int = 0,
    num_workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool | None = None,
) -> ShardLoader:
    """A DataLoader yielding model batches (``collate.py``) of ``split_dir`` for one epoch.

    For the next epoch call ``loader.dataset.set_epoch(epoch, skip)`` and iterate again (workers
    are not persistent, so they pick the new epoch up). ``drop_last`` defaults to ``train``.
    """
    dataset = ShardDataset(split_dir, cfg, train=train, seed=seed, rank=rank, world_size=world_size, chunk=batch_size)
    dataset.set_epoch(epoch, skip)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=_collate_numpy_targets,
        num_workers=num_workers,
        drop_last=train if drop_last is None else drop_last,
        worker_init_fn=_one_thread,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    return ShardLoader(loader)


def _collate_numpy_targets(examples: list[dict[str, Any]]) -> dict[str, Any]:
    return collate_examples(examples, numpy_targets=True)


def _one_thread(_: int) -> None:
    # Workers are processes; torch's intra-op threads inside each would oversubscribe the cores.
    torch.set_num_threads(1)
