"""The order of an epoch: a pure function of (seed, epoch) and the shards' row groups.

The epoch is one sequence of all images, the same for any number of workers. Its units are the
shards' row groups (``shards.ROW_GROUP_SIZE`` images each): the units of all shards are permuted
together, so consecutive positions come from many shards, and each unit's rows are permuted inside
it. Full units come first, then the few short ones (a shard's last group), so that with units of K
images the bulk of the epoch is cut into aligned runs of K positions. Everything is drawn from
``numpy.random.default_rng([seed, epoch])``: the same order in the Ray Data pipeline and the plain
PyTorch one, on any machine.

Dealing to ranks: the positions are taken in rounds of ``world_size * deal_size``; of each round,
rank r takes the ``deal_size`` positions ``[r * deal_size, (r + 1) * deal_size)``. With
``deal_size=1`` that is rank r taking every world_size-th position. When ``deal_size`` divides the
per-worker batch size, the first k micro-batches of all ranks together are exactly the first
``k * world_size * batch_size`` positions of the epoch; when it is a multiple of the row-group size,
each unit goes whole to one rank, so every image's bytes are read once per epoch.

Resuming inside an epoch: the engine records how many images of the epoch were consumed, by all
ranks together (``TrainState.images_done``), and passes it as ``skip``; the first ``skip`` positions
are dropped before any image is read, and the rest is dealt from there, whatever the number of
workers now (elastic). Augmentations are drawn per image from (seed, epoch, image_id), so they do not
depend on where or when an image is decoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EpochOrder:
    """One epoch's images in order: ``shards``, ``rows`` and ``units`` (N,) int64 per position.

    ``units`` numbers the row groups of all shards together (shard 0's first, in file order), so two
    positions share a unit exactly when they are read from the same row group.
    """

    shards: np.ndarray
    rows: np.ndarray
    units: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def sequence(self) -> np.ndarray:
        """(N, 2) int64 array of (shard, row) in epoch order."""
        return np.stack([self.shards, self.rows], axis=1)


def epoch_order(
    units_per_shard: Sequence[int | Sequence[int]], seed: int, epoch: int, shuffle: bool = True
) -> EpochOrder:
    """The order of epoch ``epoch`` over shards whose row groups hold ``units_per_shard[s]`` rows each.

    An int entry is a shard in one row group. ``shuffle=False`` gives file order (validation).
    """
    sizes_per_shard = [[int(u)] if np.isscalar(u) else [int(v) for v in u] for u in units_per_shard]
    sizes = np.array([v for s in sizes_per_shard for v in s], dtype=np.int64)
    shard_of = np.repeat(np.arange(len(sizes_per_shard)), [len(s) for s in sizes_per_shard]).astype(np.int64)
    first_row = np.concatenate([np.cumsum([0, *s[:-1]]) for s in sizes_per_shard if s] or [np.zeros(0)])
    first_row = first_row.astype(np.int64)
    keep = np.flatnonzero(sizes > 0)
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        full = keep[sizes[keep] == sizes.max(initial=0)]
        short = keep[sizes[keep] != sizes.max(initial=0)]
        unit_order = np.concatenate([rng.permutation(full), rng.permutation(short)])
    else:
        unit_order = keep
    lens = sizes[unit_order]
    units = np.repeat(unit_order, lens)
    # Row within its unit: 0..len-1 per unit, then permuted inside each unit by sorting random keys.
    within = np.arange(len(units)) - np.repeat(np.cumsum(lens) - lens, lens)
    if shuffle and len(units):
        block = np.repeat(np.arange(len(unit_order)), lens)
        within = within[np.lexsort((rng.random(len(units)), block))]
    rows = first_row[units] + within
    return EpochOrder(shard_of[units], rows.astype(np.int64), units.astype(np.int64))


def rank_positions(
    num_rows: int, skip: int, rank: int, world_size: int, even: bool = True, deal_size: int = 1
) -> np.ndarray:
    """Indices into the epoch order of the images rank ``rank`` reads, in order, after ``skip``.

    Positions from ``skip`` on are dealt in rounds of ``world_size * deal_size`` (module docstring).
    With ``even`` (training) only whole rounds are dealt, so every rank gets the same count and up to
    a round's worth at the end of the epoch is left out, as DistributedSampler with drop_last;
    without it (evaluation) every image is read once and the first ranks may get more.
    """
    if not 0 <= rank < world_size or deal_size < 1:
        raise ValueError(f"rank {rank} of world_size {world_size}, deal_size {deal_size}")
    round_ = world_size * deal_size
    n = max(num_rows - skip, 0)
    if even:
        n = n // round_ * round_
    index = np.arange(n, dtype=np.int64)
    return skip + index[(index % round_) // deal_size == rank]


def rank_sequence(
    order: EpochOrder, skip: int, rank: int, world_size: int, even: bool = True, deal_size: int = 1
) -> np.ndarray:
    """(M, 2) (shard, row) pairs rank ``rank`` reads, in order, after the first ``skip`` positions."""
    return order.sequence()[rank_positions(order.num_rows, skip, rank, world_size, even, deal_size)]


def read_groups(units: np.ndarray, target: int) -> list[slice]:
    """Cut a rank's run of positions (their ``units``) into slices of at least ``target`` images.

    Cuts fall only where the unit changes, so a row group a rank needs is read once by that rank.
    """
    if len(units) == 0:
        return []
    starts = np.flatnonzero(np.diff(units) != 0) + 1
    out, begin = [], 0
    for s in starts:
        if s - begin >= target:
            out.append(slice(begin, int(s)))
            begin = int(s)
    out.append(slice(begin, len(units)))
    return out
