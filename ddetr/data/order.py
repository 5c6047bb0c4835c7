"""The order of an epoch: a pure function of (seed, epoch) and the shard sizes.

An epoch reads the shards in a permuted order and each shard's rows in a permuted order, both drawn
from ``numpy.random.default_rng([seed, epoch, ...])``. So every image has a *position* in the epoch,
the same in the Ray Data pipeline and the plain PyTorch one, on any machine.

Resuming inside an epoch: the engine records how many images of the epoch were consumed, by all
ranks together (``TrainState.images_done``), and passes it as ``skip``; the first
``skip`` positions are dropped *before* any image is decoded. In the plain path each rank then gets
exactly the images it had not yet seen. Under Ray Train, ``streaming_split`` hands blocks to workers
as they ask, so which worker saw which image is not recorded: the resumed epoch skips the right
number of images, from the head of the epoch order, but not necessarily the very images each worker
saw. Augmentations are drawn per image from (seed, epoch, image_id), so they do not depend on where
or when an image is decoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EpochOrder:
    """Where each (shard, row) falls in one epoch.

    ``shard_order`` (S,) lists shard indices in reading order; ``positions[s]`` (rows of shard s,)
    int64 gives each row's position in the epoch, in [0, N).
    """

    shard_order: np.ndarray
    positions: list[np.ndarray]

    @property
    def num_rows(self) -> int:
        return int(sum(len(p) for p in self.positions))

    def sequence(self) -> np.ndarray:
        """(N, 2) int64 array of (shard, row) in epoch order."""
        shard = np.concatenate([np.full(len(p), s) for s, p in enumerate(self.positions)] or [np.zeros(0)])
        row = np.concatenate([np.arange(len(p)) for p in self.positions] or [np.zeros(0)])
        pos = np.concatenate(self.positions or [np.zeros(0)])
        out = np.empty((len(pos), 2), dtype=np.int64)
        out[pos.astype(np.int64)] = np.stack([shard, row], axis=1)
        return out


def epoch_order(rows_per_shard: Sequence[int], seed: int, epoch: int, shuffle: bool = True) -> EpochOrder:
    """The order of epoch ``epoch``; ``shuffle=False`` gives shards and rows in file order (validation)."""
    n = len(rows_per_shard)
    shard_order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    offsets = np.zeros(n, dtype=np.int64)
    total = 0
    for s in shard_order:
        offsets[s] = total
        total += rows_per_shard[s]
    positions = []
    for s, count in enumerate(rows_per_shard):
        within = np.random.default_rng([seed, epoch, s]).permutation(count) if shuffle else np.arange(count)
        positions.append(offsets[s] + within.astype(np.int64))
    return EpochOrder(shard_order, positions)


def rank_sequence(order: EpochOrder, skip: int, rank: int, world_size: int, even: bool = True) -> np.ndarray:
    """(M, 2) (shard, row) pairs rank ``rank`` reads, in order, after the first ``skip`` positions.

    Positions are dealt to ranks one by one (rank r takes every world_size-th). With ``even`` (for
    training) every rank gets the same count and the last ``N mod world_size`` images of the epoch
    are left out, as DistributedSampler with drop_last; without it (for evaluation) every image is
    read once and the first ranks get one more.
    """
    seq = order.sequence()
    mine = seq[rank::world_size]
    if even:
        mine = mine[: len(seq) // world_size]
    # Rank r holds global indices r + world_size * j; keep those at or past ``skip``.
    start = max(0, -(-(skip - rank) // world_size))
    return mine[start:]


def shard_runs(sequence: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Split a (M, 2) (shard, row) sequence into its runs: [(shard, rows (k,) in order), ...].

    Epoch orders visit each shard in one run, so this is one entry per shard read.
    """
    if len(sequence) == 0:
        return []
    breaks = np.flatnonzero(np.diff(sequence[:, 0]) != 0) + 1
    return [(int(run[0, 0]), run[:, 1].copy()) for run in np.split(sequence, breaks)]
