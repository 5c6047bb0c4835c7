"""The plain PyTorch path over the shards: an IterableDataset and a DataLoader, no Ray needed.

It reads the same shards in the same epoch order (``order.py``), decodes with the same function and
collates to the same batch as the Ray Data pipeline, so the engine can run either, and a single
process can debug what a cluster runs.

With ``num_workers`` DataLoader workers, the rank's sequence is cut into chunks of ``batch_size``
images dealt round-robin to the workers; the DataLoader takes batches from its workers round-robin
too, so the batches come out in epoch order exactly (while no image fails to decode). Each worker
reads only the row groups holding its images (``decode.read_rows``), a few batches' worth at a time,
with the footers the split was opened with. Images stay uint8 up to ``collate.batch_to``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ddetr.data.collate import collate_examples, targets_to_torch
from ddetr.data.decode import ROW_COLUMNS, read_rows, try_decode_example
from ddetr.data.order import EpochOrder, epoch_order, rank_positions, read_groups
from ddetr.data.shards import ShardMetadata, Split, open_split
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
        deal_size: images a rank takes in a row from the epoch order (``order.py``; pass the
            per-worker batch size when ``world_size > 1``).
        read_size: about how many images a worker reads at once (whole row groups).
        skip_unreadable, filesystem: as in ``shards.open_split``.
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
        deal_size: int = 1,
        read_size: int = 32,
        skip_unreadable: bool = False,
        filesystem: pafs.FileSystem | None = None,
    ) -> None:
        super().__init__()
        self.split: Split = open_split(split_dir, filesystem=filesystem, skip_unreadable=skip_unreadable)
        self.meta: ShardMetadata = self.split.meta
        self.uris = self.split.uris
        self.cfg, self.train, self.seed = cfg, train, seed
        self.rank, self.world_size, self.chunk = rank, world_size, chunk
        self.deal_size, self.read_size = deal_size, read_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _order(self) -> tuple[EpochOrder, np.ndarray]:
        order = epoch_order(self.split.units, self.seed, self.epoch, shuffle=self.train)
        mine = rank_positions(order.num_rows, self.skip, self.rank, self.world_size, self.train, self.deal_size)
        return order, mine

    def sequence(self) -> np.ndarray:
        """(M, 2) (shard, row) pairs this rank reads this epoch, in order."""
        order, mine = self._order()
        return order.sequence()[mine]

    def __len__(self) -> int:
        return len(self._order()[1])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order, mine = self._order()
        mine = mine[(np.arange(len(mine)) // self.chunk) % workers == worker]
        seq = order.sequence()
        for cut in read_groups(order.units[mine], self.read_size):
            pairs = seq[mine[cut]]
            table = read_rows(
                self.uris, pairs, filesystem=self.split.filesystem, footers=self.split.footers, columns=ROW_COLUMNS
            ).to_pydict()
            for i in range(len(pairs)):
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
    deal_size: int = 1,
    skip_unreadable: bool = False,
    pin_memory: bool | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> ShardLoader:
    """A DataLoader yielding model batches (``collate.py``) of ``split_dir`` for one epoch.

    For the next epoch call ``loader.dataset.set_epoch(epoch, skip)`` and iterate again (workers
    are not persistent, so they pick the new epoch up). ``drop_last`` defaults to ``train``.
    ``deal_size``, ``skip_unreadable`` and ``filesystem`` are ``ShardDataset``'s; ``pin_memory``
    (default: when CUDA is available) pins batches for an asynchronous copy to the GPU.
    """
    dataset = ShardDataset(
        split_dir,
        cfg,
        train=train,
        seed=seed,
        rank=rank,
        world_size=world_size,
        chunk=batch_size,
        deal_size=deal_size,
        skip_unreadable=skip_unreadable,
        filesystem=filesystem,
    )
    dataset.set_epoch(epoch, skip)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=_collate_numpy_targets,
        num_workers=num_workers,
        drop_last=train if drop_last is None else drop_last,
        worker_init_fn=_one_thread,
        prefetch_factor=4 if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
    )
    return ShardLoader(loader)


def _collate_numpy_targets(examples: list[dict[str, Any]]) -> dict[str, Any]:
    return collate_examples(examples, numpy_targets=True)


def _one_thread(_: int) -> None:
    # Workers are processes; torch's intra-op threads inside each would oversubscribe the cores.
    torch.set_num_threads(1)
