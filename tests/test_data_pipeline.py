"""Both pipelines (plain PyTorch and Ray Data): padded batches, masks, epoch order, skip, bad bytes."""

from __future__ import annotations

import logging
import threading
import warnings

import numpy as np
import pytest
import torch

from ddetr.data.collate import batch_to, collate_examples
from ddetr.data.decode import decode_batch, decode_example, decode_failures
from ddetr.data.loader import ShardDataset, build_dataloader
from ddetr.data.order import epoch_order, rank_sequence
from ddetr.data.shards import open_split, read_metadata, read_shard, shard_uris
from ddetr.data.synthetic import make_synthetic_coco
from ddetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TransformConfig

CFG = TransformConfig().scaled(0.1)  # shorter sides 48..80: small and fast
B = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """40 train images in 5 shards of 8, 12 val images."""
    paths = make_synthetic_coco(str(tmp_path_factory.mktemp("syn")), 40, 12, seed=0, image_size=(64, 96), shard_size=8)
    return paths


@pytest.fixture
def limit_120s(hard_timeout):
    with hard_timeout(120):
        yield


def _expected_ids(split_dir: str, seed: int, epoch: int, train: bool = True, skip: int = 0) -> list[int]:
    meta = read_metadata(split_dir)
    uris = shard_uris(split_dir, meta)
    ids = [read_shard(u, ["image_id"]).column("image_id").to_pylist() for u in uris]
    order = epoch_order(open_split(split_dir).units, seed, epoch, shuffle=train)
    return [ids[s][r] for s, r in rank_sequence(order, skip, 0, 1)]


def _ids(batches) -> list[int]:
    return [int(t["image_id"]) for b in batches for t in b["targets"]]


def _check_batch(batch: dict) -> None:
    assert batch["images"].dtype == torch.uint8  # images cross to the trainer as uint8 ...
    batch = batch_to(batch, "cpu")  # ... and are normalised on its device
    images, mask, targets = batch["images"], batch["mask"], batch["targets"]
    n, _, hmax, wmax = images.shape
    assert images.dtype == torch.float32 and mask.dtype == torch.bool and mask.shape == (n, hmax, wmax)
    assert hmax == max(int(t["size"][0]) for t in targets) and wmax == max(int(t["size"][1]) for t in targets)
    for i, t in enumerate(targets):
        h, w = (int(v) for v in t["size"])
        assert not mask[i, :h, :w].any() and mask[i, h:].all() and mask[i, :, w:].all()
        assert (images[i, :, h:] == 0).all() and (images[i, :, :, w:] == 0).all()
        assert t["boxes"].dtype == torch.float32 and t["boxes"].shape[1] == 4 and t["labels"].dtype == torch.int64
        assert len(t["boxes"]) == len(t["labels"])
        assert ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()


def test_collate_pads_normalises_and_masks(shards):
    meta = read_metadata(shards.train_shards)
    rows = read_shard(shard_uris(shards.train_shards, meta)[0]).to_pylist()[:3]
    examples = [decode_example(r, CFG, True, 0, 0) for r in rows]
    batch = collate_examples(examples)
    _check_batch(batch)
    batch = batch_to(batch, "cpu")
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for i, e in enumerate(examples):
        h, w = e["size"]
        expect = (torch.from_numpy(e["image"].copy()).permute(2, 0, 1) / 255 - mean) / std
        torch.testing.assert_close(batch["images"][i, :, :h, :w], expect, atol=1e-5, rtol=1e-5)
        assert int(batch["targets"][i]["image_id"]) == e["image_id"]
        assert batch["targets"][i]["orig_size"].tolist() == [rows[i]["height"], rows[i]["width"]]


def test_plain_loader_batches_and_order(shards):
    batches = list(build_dataloader(shards.train_shards, CFG, train=True, batch_size=B, seed=3, epoch=0, num_workers=2))
    assert len(batches) == 10
    for b in batches:
        _check_batch(b)
    assert _ids(batches) == _expected_ids(shards.train_shards, 3, 0)
    again = _ids(build_dataloader(shards.train_shards, CFG, train=True, batch_size=B, seed=3, epoch=0, num_workers=0))
    assert again == _ids(batches)  # same seed, same order, whatever the number of workers
    other = _ids(build_dataloader(shards.train_shards, CFG, train=True, batch_size=B, seed=3, epoch=1, num_workers=0))
    assert sorted(other) == sorted(again) and other != again


def test_skip_resumes_inside_the_epoch(shards):
    full = _ids(build_dataloader(shards.train_shards, CFG, train=True, batch_size=B, seed=3, epoch=2, num_workers=0))
    rest = _ids(
        build_dataloader(shards.train_shards, CFG, train=True, batch_size=B, seed=3, epoch=2, skip=12, num_workers=2)
    )
    assert rest == full[12:]


def test_ranks_get_disjoint_equal_shares(shards):
    seen = []
    for rank in range(3):
        ds = ShardDataset(shards.train_shards, CFG, train=True, seed=1, rank=rank, world_size=3)
        ids = [e["image_id"] for e in ds]
        assert len(ids) == 13
        seen += ids
    assert len(set(seen)) == 39
    # Resuming after 2 images per rank (6 in all) gives each rank the rest of its own share.
    ds = ShardDataset(shards.train_shards, CFG, train=True, seed=1, rank=1, world_size=3)
    full = [e["image_id"] for e in ds]
    ds.set_epoch(0, skip=6)
    assert [e["image_id"] for e in ds] == full[2:]


def test_validation_reads_in_file_order_and_every_image_once(shards):
    ids = _ids(build_dataloader(shards.val_shards, CFG, train=False, batch_size=5, num_workers=0))
    assert ids == list(range(1, 13))  # drop_last is off for validation
    per_rank = [
        [e["image_id"] for e in ShardDataset(shards.val_shards, CFG, train=False, rank=r, world_size=5)]
        for r in range(5)
    ]
    assert [len(p) for p in per_rank] == [3, 3, 2, 2, 2]
    assert sorted(sum(per_rank, [])) == list(range(1, 13))


def test_undecodable_bytes_are_dropped_with_a_warning(shards, caplog):
    meta = read_metadata(shards.train_shards)
    t = read_shard(shard_uris(shards.train_shards, meta)[0]).to_pydict()
    t["image"][1] = b"\xff\xd8\xff broken"
    before = decode_failures()
    with caplog.at_level(logging.WARNING, logger="ddetr.data.decode"):
        out = decode_batch(t, CFG, True, 0, 0)
    assert decode_failures() == before + 1
    assert out.column("image_id").to_pylist() == [i for j, i in enumerate(t["image_id"]) if j != 1]
    assert f"image_id {t['image_id'][1]}" in caplog.text


def test_idle_scheduling_loop_turns_are_stretched_and_busy_ones_left_alone():
    import time

    from ddetr.data.pipeline import IdleLoopThrottle

    throttle = IdleLoopThrottle()
    throttle.on_execution_step(None)
    start = time.perf_counter()
    for _ in range(4):  # turns that returned at once, as with no task running: each sleeps out the minimum
        throttle.on_execution_step(None)
    assert time.perf_counter() - start >= 4 * IdleLoopThrottle.min_turn_s
    time.sleep(2 * IdleLoopThrottle.min_turn_s)  # a turn that waited on a task (ray.wait) by itself
    start = time.perf_counter()
    throttle.on_execution_step(None)
    assert time.perf_counter() - start < IdleLoopThrottle.min_turn_s / 2


def test_an_executor_whose_limits_are_still_zero_reads_them_again_on_its_next_turn():
    # Ray Data's own resource manager, fed by a stand-in for the autoscaling coordinator's cache: empty when the
    # execution starts, the reserved CPUs a few ms later.
    from types import SimpleNamespace

    from ray.data import DataContext
    from ray.data._internal.execution.block_ref_counter import BlockRefCounter
    from ray.data._internal.execution.interfaces import ExecutionOptions, ExecutionResources
    from ray.data._internal.execution.operators.input_data_buffer import InputDataBuffer
    from ray.data._internal.execution.resource_manager import ResourceManager

    from ddetr.data.loop_throttle import EarlyLimits

    reserved = [ExecutionResources.zero()]
    context = DataContext()
    topology = {InputDataBuffer(context, []): None}
    manager = ResourceManager(topology, ExecutionOptions(), lambda: reserved[0], context, BlockRefCounter(lambda *_: 1))
    executor = SimpleNamespace(_resource_manager=manager)
    assert manager.get_global_limits().cpu == 0
    reserved[0] = ExecutionResources(cpu=2, object_store_memory=2**30)
    assert manager.get_global_limits().cpu == 0  # Ray keeps what it read for GLOBAL_LIMITS_UPDATE_INTERVAL_S (1 s)
    EarlyLimits().on_execution_step(executor)
    assert manager.get_global_limits().cpu == 2
    reserved[0] = ExecutionResources(cpu=1, object_store_memory=2**30)
    EarlyLimits().on_execution_step(executor)  # limits with CPUs in them are left to Ray's own refresh
    assert manager.get_global_limits().cpu == 2


@pytest.mark.ray
def test_ray_pipeline_matches_the_plain_one(shards, ray_local, limit_120s):
    from ray.data import DataContext

    from ddetr.data.pipeline import DetrCollateFn, IdleLoopThrottle, build_ray_dataset

    DataContext.get_current().enable_progress_bars = False
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # RayDeprecationWarning is one
        ds = build_ray_dataset(shards.train_shards, CFG, train=True, seed=3, epoch=0)
        assert ds.context.custom_execution_callback_classes.count(IdleLoopThrottle) == 1
        ray_batches = list(ds.iter_torch_batches(batch_size=B, collate_fn=DetrCollateFn(), drop_last=True))
    plain = list(build_dataloader(shards.train_shards, CFG, train=True, batch_size=B, seed=3, epoch=0, num_workers=0))
    assert _ids(ray_batches) == _ids(plain) == _expected_ids(shards.train_shards, 3, 0)
    for r, p in zip(ray_batches, plain, strict=True):
        _check_batch(r)
        assert torch.equal(r["images"], p["images"]) and torch.equal(r["mask"], p["mask"])
        for tr, tp in zip(r["targets"], p["targets"], strict=True):
            assert all(torch.equal(tr[k], tp[k]) for k in tp)

    epoch1 = build_ray_dataset(shards.train_shards, CFG, train=True, seed=3, epoch=1)
    ids1 = _ids(epoch1.iter_torch_batches(batch_size=B, collate_fn=DetrCollateFn()))
    assert ids1 == _expected_ids(shards.train_shards, 3, 1) and ids1 != _ids(ray_batches)

    rank1 = build_ray_dataset(shards.train_shards, CFG, train=True, seed=3, epoch=0, skip=6, rank=1, world_size=2)
    ids = _ids(rank1.iter_torch_batches(batch_size=B, collate_fn=DetrCollateFn()))
    assert ids == _expected_ids(shards.train_shards, 3, 0)[1::2][3:]


@pytest.mark.ray
def test_ray_pipeline_splits_for_train_workers(shards, ray_local, limit_120s):
    from ray.data import DataContext

    from ddetr.data.pipeline import DetrCollateFn, build_ray_dataset

    DataContext.get_current().enable_progress_bars = False
    ds = build_ray_dataset(shards.val_shards, CFG, train=False)
    parts = ds.streaming_split(2, equal=True)  # what DataConfig(datasets_to_split=...) does
    ids: list[list[int]] = [[], []]

    def consume(i: int) -> None:
        ids[i] = _ids(parts[i].iter_torch_batches(batch_size=3, collate_fn=DetrCollateFn()))

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=100)
    assert len(ids[0]) == len(ids[1]) == 6
    np.testing.assert_array_equal(sorted(ids[0] + ids[1]), np.arange(1, 13))
