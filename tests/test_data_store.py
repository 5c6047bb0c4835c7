"""Reading the store: bytes read per epoch over all ranks, the footer check, retries, the order's units.

The store is a real local filesystem seen through ``pyarrow.fs.PyFileSystem``: its handler counts the bytes
read from each file and can fail chosen opens of a file, as a flaky object store would.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from ddetr.data import decode, shards
from ddetr.data.loader import ShardDataset, build_dataloader
from ddetr.data.order import epoch_order, rank_positions
from ddetr.data.shards import ShardReadError, UnreadableShardError
from ddetr.data.synthetic import make_synthetic_coco
from ddetr.data.transforms import TransformConfig

CFG = TransformConfig().scaled(0.1)
B = 2  # per-worker batch: a multiple of the row-group size (2)


class _CountingFile:
    """A file object that adds what it reads to its store's count."""

    def __init__(self, f, store: CountingStore, name: str) -> None:
        self.f, self.store, self.name = f, store, name

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.store.count(self.name, len(data))
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.f.close()

    @property
    def closed(self) -> bool:
        return self.f.closed

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


class CountingStore(pafs.FileSystemHandler):
    """The local filesystem, counting bytes read per file name; ``fail[name]`` holds open numbers that fail.

    With ``log``, every read is also appended to that file as "name<TAB>bytes", so the reads of the processes the
    store is pickled into (Ray's decode tasks) add up in one place.
    """

    def __init__(self, log: str | None = None) -> None:
        self.local = pafs.LocalFileSystem()
        self.bytes_read: Counter = Counter()
        self.opens: Counter = Counter()
        self.fail: dict[str, range] = {}
        self.log = log

    def count(self, name: str, size: int) -> None:
        self.bytes_read[name] += size
        if self.log is not None:  # one O_APPEND write per read: processes append without interleaving
            fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{name}\t{size}\n".encode())
            finally:
                os.close(fd)

    def _open(self, path: str):
        name = os.path.basename(path)
        count = self.opens[name]
        self.opens[name] += 1
        if count in self.fail.get(name, ()):
            raise OSError(f"simulated transient failure opening {name}")
        return pa.PythonFile(_CountingFile(open(path, "rb"), self, name), mode="r")

    def open_input_file(self, path):
        return self._open(path)

    def open_input_stream(self, path):
        return self._open(path)

    def get_type_name(self):
        return "counting"

    def equals(self, other):
        # A store that logs is one store wherever it was unpickled: its copies in Ray's tasks share their footers.
        other = getattr(other, "handler", other)  # pyarrow passes the other PyFileSystem
        return self is other or (self.log is not None and getattr(other, "log", None) == self.log)

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("not on a test store")

    def delete_file(self, path):
        self.local.delete_file(path)

    def move(self, src, dest):
        self.local.move(src, dest)

    def copy_file(self, src, dest):
        self.local.copy_file(src, dest)

    def open_output_stream(self, path, metadata=None):
        return self.local.open_output_stream(path)

    def open_append_stream(self, path, metadata=None):
        return self.local.open_append_stream(path)


def _fresh_process() -> None:
    """Forget this process's cached splits and footers, as a rank in its own process would start."""
    shards._splits.clear()
    decode._footers.clear()
    decode._parsed.clear()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """48 train images in 4 shards of 12, row groups of 2; JPEGs of ~30 KB, so that footers weigh about what
    they do for COCO (a few percent per rank here, 0.3% there)."""
    return make_synthetic_coco(
        str(tmp_path_factory.mktemp("store")), 48, 4, seed=0, image_size=(256, 384), shard_size=12
    )


@pytest.fixture
def split_copy(data, tmp_path):
    """A copy of the train split this test may damage."""
    out = tmp_path / "train"
    shutil.copytree(data.train_shards, out)
    return str(out)


def _shard_bytes(split_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(split_dir, f)) for f in os.listdir(split_dir) if f.endswith(".parquet"))


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_an_epoch_reads_each_image_once_over_all_ranks(data, world_size):
    split = data.train_shards
    store = CountingStore()
    fs = pafs.PyFileSystem(store)
    seen = []
    for rank in range(world_size):
        _fresh_process()
        ds = ShardDataset(
            split, CFG, train=True, seed=5, rank=rank, world_size=world_size, chunk=B, deal_size=B, filesystem=fs
        )
        seen += [e["image_id"] for e in ds]
    _fresh_process()
    assert sorted(seen) == list(range(1, 49))  # every image trained once (48 is a multiple of 2 x 4)
    parquet = sum(v for k, v in store.bytes_read.items() if k.endswith(".parquet"))
    ratio = parquet / _shard_bytes(split)
    # Footers (once per rank) plus the row groups of each rank's images; before: every rank read every shard.
    assert ratio <= 1.1, f"{world_size} workers read {ratio:.3f}x the shards"


def test_the_order_is_one_sequence_whatever_the_workers_and_resumes_on_another_count():
    units = [[2] * 6 + [1]] * 5  # 5 shards of 13 images, row groups of 2 and a short last one
    order = epoch_order(units, seed=1, epoch=3)
    seq = [tuple(p) for p in order.sequence()]
    assert sorted(seq) == sorted((s, r) for s in range(5) for r in range(13))  # every image once
    assert order.sequence().tolist() == epoch_order(units, seed=1, epoch=3).sequence().tolist()
    assert order.sequence().tolist() != epoch_order(units, seed=1, epoch=4).sequence().tolist()
    # The first k micro-batches of W ranks (batch 2, dealt 2 at a time) are the first k * W * 2 positions.
    for w in (1, 2, 3, 4):
        taken = [rank_positions(order.num_rows, 0, r, w, deal_size=B)[: 3 * B] for r in range(w)]
        assert sorted(np.concatenate(taken).tolist()) == list(range(3 * w * B))
        # Whole row groups go to one rank: no unit is shared by two ranks (short units only at the tail).
        owner = {}
        for r in range(w):
            for u in order.units[rank_positions(order.num_rows, 0, r, w, deal_size=B)][:-B]:
                assert owner.setdefault(int(u), r) == r
    # 5 steps on 2 workers, then the rest on 3: every image of the epoch once, none twice.
    first = np.concatenate([rank_positions(order.num_rows, 0, r, 2, deal_size=B)[: 5 * B] for r in range(2)])
    rest = np.concatenate([rank_positions(order.num_rows, 5 * 2 * B, r, 3, even=False, deal_size=B) for r in range(3)])
    assert sorted(np.concatenate([first, rest]).tolist()) == list(range(order.num_rows))


def test_a_global_batch_mixes_many_shards_of_a_coco_sized_split():
    """COCO train: 237 shards of 500 images, row groups of 2; a global batch of 32 holds ~15.5 shards."""
    order = epoch_order([[2] * 250] * 237, seed=0, epoch=0)
    distinct = [len(set(order.shards[i : i + 32].tolist())) for i in range(0, order.num_rows - 32, 32)]
    assert np.mean(distinct) > 15  # 16 row groups, nearly always from 16 different shards


def test_a_truncated_shard_is_reported_before_the_first_step(split_copy, caplog):
    bad = os.path.join(split_copy, "shard-00002.parquet")
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)
    with pytest.raises(UnreadableShardError) as err:
        build_dataloader(split_copy, CFG, train=True, batch_size=B, num_workers=0)
    message = str(err.value)
    assert "\n" not in message and bad in message and "truncated" in message
    assert list(err.value.problems) == ["shard-00002.parquet"]
    # The Ray pipeline opens the split the same way, before it builds anything.
    from ddetr.data.pipeline import build_ray_dataset

    with pytest.raises(UnreadableShardError, match="shard-00002.parquet"):
        build_ray_dataset(split_copy, CFG, train=True)
    # With the setting, its images are left out and counted.
    with caplog.at_level(logging.WARNING, logger="ddetr.data.shards"):
        loader = build_dataloader(split_copy, CFG, train=True, batch_size=B, num_workers=0, skip_unreadable=True)
        ids = [int(t["image_id"]) for b in loader for t in b["targets"]]
    assert sorted(ids) == [i for i in range(1, 49) if not 25 <= i <= 36]
    assert "skipping 1 unreadable shards and their 12 images" in caplog.text


def test_failed_reads_are_retried_and_logged(data, monkeypatch, caplog):
    monkeypatch.setattr(shards, "READ_BACKOFF_S", 0.01)
    _fresh_process()
    store = CountingStore()
    store.fail["shard-00001.parquet"] = range(1, 3)  # open 0 is the footer check; the next two reads fail
    fs = pafs.PyFileSystem(store)
    with caplog.at_level(logging.WARNING, logger="ddetr.data.shards"):
        ds = ShardDataset(data.train_shards, CFG, train=True, seed=0, filesystem=fs)
        ids = [e["image_id"] for e in ds]
    _fresh_process()
    assert sorted(ids) == list(range(1, 49))
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2 and all("shard-00001.parquet: read failed" in m for m in retries), retries


def test_a_store_that_keeps_failing_names_the_shard(data, monkeypatch):
    monkeypatch.setattr(shards, "READ_BACKOFF_S", 0.01)
    _fresh_process()
    store = CountingStore()
    store.fail["shard-00003.parquet"] = range(1, 10**9)
    ds = ShardDataset(data.train_shards, CFG, train=True, seed=0, filesystem=pafs.PyFileSystem(store))
    with pytest.raises(ShardReadError, match=r"shard-00003\.parquet: reading failed 4 times") as err:
        list(ds)
    _fresh_process()
    assert err.value.uri.endswith("shard-00003.parquet") and isinstance(err.value, shards.DataError)


@pytest.mark.ray
def test_ray_workers_get_the_images_the_plain_path_deals_them(data, ray_local, hard_timeout):
    from ray.data import DataContext

    from ddetr.data.pipeline import DetrCollateFn, build_ray_dataset

    DataContext.get_current().enable_progress_bars = False
    with hard_timeout(120):
        ds = build_ray_dataset(data.train_shards, CFG, train=True, seed=2, skip=8, rank=1, world_size=2, deal_size=B)
        batches = list(ds.iter_torch_batches(batch_size=B, collate_fn=DetrCollateFn(), drop_last=True))
    plain = ShardDataset(data.train_shards, CFG, train=True, seed=2, rank=1, world_size=2, deal_size=B)
    plain.set_epoch(0, skip=8)
    assert [int(t["image_id"]) for b in batches for t in b["targets"]] == [e["image_id"] for e in plain]


@pytest.mark.ray
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ray_decode_tasks_read_each_image_once_per_epoch_over_all_ranks(
    data, ray_local, hard_timeout, tmp_path, world_size
):
    """The Ray path as each Ray Train rank builds it, two epochs: the bytes its decode tasks read, over the ranks.

    Each rank keeps its own process state (its footer check's cache) from one epoch to the next, as a Ray Train
    worker does; the decode tasks run in Ray's worker processes, which keep theirs. Every epoch reads each row group
    at most once over all ranks; footers are read in the first epoch only, by each rank's check and by each decode
    process, never again.
    """
    from collections import OrderedDict

    import pyarrow.parquet as pq
    import ray.cloudpickle
    from ray.data import DataContext

    from ddetr.data.pipeline import DetrCollateFn, build_ray_dataset

    DataContext.get_current().enable_progress_bars = False
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the store travels to the tasks, not by name
    split = data.train_shards
    names = [f for f in os.listdir(split) if f.endswith(".parquet")]
    footer_size = {f: pq.ParquetFile(os.path.join(split, f)).metadata.serialized_size for f in names}
    log = tmp_path / "reads.tsv"
    fs = pafs.PyFileSystem(CountingStore(log=str(log)))
    ranks = {rank: ({}, {}, OrderedDict()) for rank in range(world_size)}  # each rank's own process caches
    shard_bytes, done = _shard_bytes(split), 0
    try:
        for epoch in (0, 1):
            seen = []
            with hard_timeout(240):
                for rank in range(world_size):
                    shards._splits, decode._footers, decode._parsed = ranks[rank]
                    ds = build_ray_dataset(split, CFG, train=True, seed=5, epoch=epoch, rank=rank,
                                           world_size=world_size, deal_size=B, filesystem=fs)  # fmt: skip
                    batches = ds.iter_torch_batches(batch_size=B, collate_fn=DetrCollateFn(), drop_last=True)
                    seen += [int(t["image_id"]) for b in batches for t in b["targets"]]
            assert sorted(seen) == list(range(1, 49)), f"epoch {epoch}"
            reads = [line.split("\t") for line in log.read_text().splitlines()][done:]
            done += len(reads)
            parquet = [(name, int(size)) for name, size in reads if name.endswith(".parquet")]
            footers = [name for name, size in parquet if size == footer_size[name]]
            total = sum(size for _, size in parquet)
            rows = sum(size for name, size in parquet if size not in (0, 8, footer_size[name]))
            assert rows <= shard_bytes, f"epoch {epoch}: row groups read {rows / shard_bytes:.3f}x the shards"
            assert total / shard_bytes <= 1.1, f"epoch {epoch}: read {total / shard_bytes:.3f}x"
            if epoch == 0:  # each rank's check, and each decode process (at most one per rank here)
                assert len(footers) <= 2 * world_size * len(footer_size), footers
            else:
                assert footers == [], f"footers read again in epoch {epoch}: {footers}"
    finally:
        shards._splits, decode._footers, decode._parsed = {}, {}, OrderedDict()


@pytest.mark.gpu
def test_pinned_uint8_batches_are_normalised_on_the_gpu(data):
    import torch

    from ddetr.data.collate import batch_to

    loader = build_dataloader(data.train_shards, CFG, train=True, batch_size=B, num_workers=1, pin_memory=True)
    batch = next(iter(loader))
    assert batch["images"].dtype == torch.uint8 and batch["images"].is_pinned()
    on_gpu, on_cpu = batch_to(batch, "cuda"), batch_to(batch, "cpu")
    assert on_gpu["images"].is_cuda and on_gpu["images"].dtype == torch.float32
    torch.testing.assert_close(on_gpu["images"].cpu(), on_cpu["images"], atol=1e-6, rtol=1e-6)
