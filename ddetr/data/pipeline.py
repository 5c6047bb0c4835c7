"""The Ray Data pipeline: shards -> epoch order -> parallel decode + augment -> padded batches.

::

    # on each Ray Train worker, for each epoch (as ddetr.train.ray_train does):
    ds = build_ray_dataset(split_dir, cfg, train=True, seed=seed, epoch=epoch, skip=images_done,
                           rank=rank, world_size=world_size, deal_size=B)
    for batch in ds.iter_torch_batches(batch_size=B, collate_fn=DetrCollateFn(), drop_last=True):
        batch["images"], batch["mask"], batch["targets"]        # see collate.py

Stages. The driver opens the split (``shards.open_split``: every shard's footer checked, cached per
process), computes this rank's part of the epoch order (``order.py``) and cuts it into read items of
about ``read_size`` images, at row-group boundaries; an item names (shard, row) pairs from many shards.
A dataset of those items (one block each) is mapped by ``decode.decode_rows``: one task per item reads
only the row groups holding its images (any ``pyarrow.fs`` filesystem, retried on I/O errors) and
yields decoded, augmented batches of ``decode_batch_size`` images as it goes. ``ray.data.read_parquet``
is not used: it packs row groups of several files into one block in an order of its own, which would
make the epoch order depend on block sizes. Tasks ask for ``num_cpus`` each (default 0.5): on a small
machine, tasks holding a whole CPU each leave nothing for the trainer, and Ray Data then stalls
without an error. The dataset preserves order, so one consumer sees exactly the plain DataLoader's
order. Images stay uint8 up to the trainer (``collate.batch_to`` normalises on its device).

The dataset runs its scheduling loop in a thread of the consuming process (the trainer). While it has no task
running (its output is buffered, waiting for the trainer), Ray Data's loop turns without blocking and holds
the GIL most of the time, so every Python step of the trainer waits for it: ``IdleLoopThrottle`` sleeps in
those turns.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import ray
import ray.data
from ray.data.collate_fn import ArrowBatchCollateFn

from ddetr.data.collate import collate_columns, table_columns
from ddetr.data.decode import decode_rows
from ddetr.data.loop_throttle import EarlyLimits, IdleLoopThrottle
from ddetr.data.order import epoch_order, rank_positions, read_groups
from ddetr.data.shards import open_split
from ddetr.data.transforms import TransformConfig


class DetrCollateFn(ArrowBatchCollateFn):
    """``iter_torch_batches(collate_fn=DetrCollateFn())``: decoded columns to the model batch.

    Returns the dict of ``collate.py`` (uint8 images, mask, targets). Ray hands it back unmoved (it
    holds a list of target dicts); move it with ``collate.batch_to(batch, device)``, which normalises
    the images there. ``pin_memory`` (for a CUDA trainer) pins images and mask, so that the copy to
    the device overlaps the step; pair it with ``iter_torch_batches(prefetch_batches=...)``. It takes the batch as
    Arrow and reads the images in place (``collate.table_columns``).
    """

    def __init__(self, pin_memory: bool = False) -> None:
        super().__init__()
        self.pin_memory = pin_memory

    def __call__(self, batch: pa.Table) -> dict[str, Any]:
        out = collate_columns(table_columns(batch))
        if self.pin_memory:
            out["images"], out["mask"] = out["images"].pin_memory(), out["mask"].pin_memory()
        return out


# Ray Data's notice when its first operator has not been able to reserve its minimum CPUs for 60 s: "Cluster
# resources are not enough to run any task from ... The job may hang forever unless the cluster scales up." In
# training it means the training workers hold most CPUs, while the decode tasks still run as CPUs come free (it
# came several times per epoch on a 2-CPU machine that trained at full speed).
STARVATION_NOTICE = "Cluster resources are not enough to run any task from"
STARVATION_LOGGER = "ray.data._internal.execution.resource_manager"


class _HideStarvationNotice(logging.Filter):
    """Marks the notice hidden: Ray Data's console handler drops hidden records (its `HiddenRecordFilter`), while
    its log file (ray-data.log in the session's logs) still gets it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(STARVATION_NOTICE):
            record.hide = True
        return True


def hide_starvation_notice() -> None:
    """Keep Ray Data's "may hang forever unless the cluster scales up" notice off this process's console.

    For a consumer that turns a real stall into an error itself (the training loop's data watchdog,
    `data.watchdog_s`), where the notice only alarms. Idempotent.
    """
    logger = logging.getLogger(STARVATION_LOGGER)
    if not any(isinstance(f, _HideStarvationNotice) for f in logger.filters):
        logger.addFilter(_HideStarvationNotice())


def decoded_image_bytes(cfg: TransformConfig, train: bool) -> int:
    """About how many bytes one decoded image of ``cfg`` holds: (H, W, 3) uint8 at the middle training scale (or the
    validation size), the longer side 4/3 of the shorter (COCO's usual shape)."""
    short = cfg.scales[len(cfg.scales) // 2] if train else cfg.val_size
    return int(short * min(cfg.max_size, short * 4 / 3) * 3)


def decode_task_cap(world_size: int) -> int:
    """Decode tasks one rank's dataset may run at once: the cluster's CPUs shared among the ranks (at least 1), plus
    one.

    Why a cap, when each task asks for ``num_cpus`` < 1: without one, Ray Data runs CPUs / num_cpus tasks, each in its
    own worker process, more workers than the node's CPUs. Ray keeps that many idle workers for 1 s only
    (``num_workers_soft_limit``, the node's CPUs by default) and starts new ones as tasks come back: on 2 CPUs at 0.5
    CPU per task, an epoch of 200 COCO-sized images took 6 s instead of 2, most of it in starting workers (each import
    of Ray and Arrow costs about a CPU-second) on the cores that decode. The tasks still ask for ``num_cpus``, so they
    fit beside the training workers.

    Why one more: between the end of a task and the start of the next on the same worker, ~0.1 s passes (Ray Data's
    scheduling loop notices a finished task within its 0.1 s wait, then leases a worker for the next). With exactly
    one task per CPU that gap idles the CPU: on 2 CPUs a decode-bound epoch kept 1.6 busy. One task queued beyond the
    CPUs fills it (with ``read_size`` 128, 2 cores decoded 0.91x what ddetr's DataLoader does, against 0.82x; see
    docs/ingest.md). The extra worker is busy while an epoch decodes; between epochs Ray may stop it (idle workers
    beyond the CPUs are kept 1 s), and the next epoch starts it again.
    """
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, cpus // max(1, world_size)) + 1


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
    deal_size: int = 1,
    read_size: int = 128,
    max_tasks: int | None = None,
    skip_unreadable: bool = False,
    filesystem: pafs.FileSystem | None = None,
) -> ray.data.Dataset:
    """A Ray Dataset of decoded, augmented examples of one epoch of ``split_dir``.

    Rows have the columns of ``decode.EXAMPLE_SCHEMA`` (the transformed image's bytes and size,
    flat cxcywh boxes, labels, image id, original size); ``DetrCollateFn`` makes model batches.
    ``train`` selects the training transform and the shuffled epoch order (validation: file order,
    the validation transform, and every image once across ranks). Build a new dataset per epoch.
    ``num_cpus`` is what each decode task asks of Ray; ``decode_batch_size`` the images per block;
    ``read_size`` about how many images one task reads; ``max_tasks`` how many decode tasks may run at once (default:
    the cluster's CPUs shared among the ``world_size`` ranks, see ``decode_task_cap``).

    Each Ray Train worker builds its own dataset with its ``rank`` and ``world_size``: it gets exactly
    the images ``order.rank_positions`` deals it and reads only the row groups holding them. Pass the
    per-worker batch size as ``deal_size`` (any divisor of it keeps resuming exact; with a multiple of
    the row-group size no row group is read by two ranks).
    ``skip`` counts the images of the epoch already consumed by all ranks together (``order.py``).
    The split is opened with ``shards.open_split``: an unreadable shard raises
    ``shards.UnreadableShardError`` here, before any step, unless ``skip_unreadable``.
    ``filesystem`` reads ``split_dir`` as a path inside it instead of resolving it.
    """
    split = open_split(split_dir, filesystem=filesystem, skip_unreadable=skip_unreadable)
    order = epoch_order(split.units, seed, epoch, shuffle=train)
    mine = rank_positions(order.num_rows, skip, rank, world_size, even=train, deal_size=deal_size)
    plan = [
        {"shard": order.shards[mine[cut]].tolist(), "row": order.rows[mine[cut]].tolist()}
        for cut in read_groups(order.units[mine], read_size)
    ]
    if not plan:
        return ray.data.from_items([])
    # One block per item, by construction: a Parquet reader would pack row groups of several
    # shards into one block, or split a shard, in an order of its own.
    ds = ray.data.from_items(plan, override_num_blocks=len(plan))
    ds = ds.map_batches(
        decode_rows,  # in decode.py: a task's worker imports neither torch nor ray.data for it
        batch_format="pyarrow",
        batch_size=1,  # one item per call: one task per item, it yields decoded batches as it goes
        num_cpus=num_cpus,
        compute=ray.data.TaskPoolStrategy(size=min(len(plan), max_tasks or decode_task_cap(world_size))),
        fn_kwargs={
            "uris": split.uris,
            "sizes": [f.size if f is not None else -1 for f in split.footers],
            "cfg": cfg,
            "train": train,
            "seed": seed,
            "epoch": epoch,
            "chunk": decode_batch_size,
            "filesystem": filesystem,
        },
    )
    ds.context.execution_options.preserve_order = True
    # Ray Data gathers what a task yields into blocks of `target_max_block_size` (128 MiB) before it hands any on:
    # a task's decoded images (64 at ~1.6 MB at the paper's scale) reached the trainer only when the task ended,
    # and the first batch of every epoch waited for whole tasks. A target of half a decoded chunk makes each chunk
    # leave as it is decoded (split into blocks of about half a chunk; splitting is zero-copy).
    ds.context.target_max_block_size = max(1, decode_batch_size * decoded_image_bytes(cfg, train) // 2)
    for callback in (IdleLoopThrottle, EarlyLimits):
        if callback not in ds.context.custom_execution_callback_classes:
            ds.context.custom_execution_callback_classes.append(callback)
    return ds
