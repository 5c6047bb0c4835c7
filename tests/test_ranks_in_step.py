"""Every rank takes the same steps whatever the data holds: an image that fails to decode is replaced in its batch,
a rank whose batches run out early repeats one, an epoch with no decodable image is a DataError on every rank."""

from __future__ import annotations

import datetime
import json
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist

from ddetr.config import apply_overrides, build_config, get_preset
from ddetr.data.decode import decode_rows, fill_failed
from ddetr.data.shards import DataError, read_metadata, shard_uris
from ddetr.data.synthetic import make_synthetic_coco
from ddetr.data.transforms import TransformConfig
from ddetr.train.batches import DataStallError, in_step, planned_groups, step_groups
from ddetr.train.callbacks import ImageTrace
from ddetr.train.logbook import read_metrics

CFG = TransformConfig().scaled(0.1)
BROKEN = b"\xff\xd8\xff\xe0 not a JPEG any more"


def plant(split_dir: str, rows: list[int]) -> list[int]:
    """Replace the image bytes of `rows` of the split's first shard, keeping its row groups; returns their ids."""
    uri = shard_uris(split_dir, read_metadata(split_dir))[0]
    md = pq.ParquetFile(uri).metadata
    table = pq.read_table(uri)
    images = table.column("image").to_pylist()
    for r in rows:
        images[r] = BROKEN
    table = table.set_column(table.schema.get_field_index("image"), "image", [images])
    pq.write_table(table, uri, row_group_size=md.row_group(0).num_rows)
    return [table.column("image_id")[r].as_py() for r in rows]


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    data = make_synthetic_coco(str(tmp_path_factory.mktemp("planted")), 48, 4, seed=0, image_size=(64, 96))
    broken = plant(data.train_shards, [5])
    return data, broken


def example(i: int) -> dict:
    return {"image": np.full((2, 2, 3), i, np.uint8), "boxes": np.zeros((0, 4), np.float32),
            "labels": np.zeros(0, np.int64), "image_id": i, "orig_size": (2, 2), "size": (2, 2)}  # fmt: skip


def test_a_failed_image_is_replaced_by_the_next_good_one_of_its_item() -> None:
    a, b, c = example(1), example(2), example(3)
    filled = fill_failed([a, None, b, None, None, c, None], fallback=None)
    assert [e["image_id"] for e in filled] == [1, 2, 2, 3, 3, 3, 1]  # the last wraps round to the first
    assert [bool(e.get("substitute")) for e in filled] == [False, True, False, True, True, False, True]
    assert [e["image_id"] for e in fill_failed([None, None], fallback=c)] == [3, 3]
    assert fill_failed([None, None], fallback=None) == []


def test_decoded_items_keep_their_length_and_flag_the_stand_in(planted) -> None:
    import pyarrow as pa

    data, broken = planted
    item = pa.table({"shard": [[0] * 12], "row": [list(range(12))]})
    meta = read_metadata(data.train_shards)
    tables = list(decode_rows(item, shard_uris(data.train_shards, meta), CFG, True, 0, 0, chunk=4))
    ids = [i for t in tables for i in t.column("image_id").to_pylist()]
    flags = [f for t in tables for f in t.column("substitute").to_pylist()]
    assert len(ids) == 12 and flags.count(True) == 1
    assert ids[5] == ids[6] and flags[5] and broken[0] not in ids  # row 5 stands in as row 6's image


def test_short_batches_repeat_the_last_step_and_count_its_images() -> None:
    batches = [{"targets": [{}, {}], "substituted": 1}, {"targets": [{}, {}], "substituted": 0}]
    groups = list(step_groups(batches, accum=1, steps_left=4))
    assert len(groups) == 4
    assert [g[2] for g in groups] == [1, 0, 2, 2]  # the two repeats: both their images are stand-ins
    assert list(step_groups([], accum=1, steps_left=3)) == []


def test_an_epoch_without_a_single_decodable_image_is_a_data_error() -> None:
    with pytest.raises(DataError, match="epoch 3: no rank got a single image"):
        list(planned_groups([], accum=1, steps_left=2, epoch=3, device=torch.device("cpu")))
    assert list(planned_groups([], accum=1, steps_left=0, epoch=0, device=torch.device("cpu"))) == []


def _stall_on_rank(rank: int, port: int, stall_rank: int, out: str) -> None:
    """Rank `stall_rank`'s training batches stop after 2 (its data tasks starved), the other's keep coming; then a
    validation pass in which the same rank stalls. Each rank writes what it saw."""
    # A collective that waits 20 s fails: a rank left waiting (the stall not agreed on) ends the test, not CI.
    timeout = datetime.timedelta(seconds=20)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timeout)
    never = threading.Event()

    def batches():
        for i in range(8):
            if rank == stall_rank and i == 2:
                never.wait()
            yield {"targets": [{}], "substituted": 0}

    seen: dict = {"steps": 0}
    started = time.monotonic()
    try:
        for _ in planned_groups(batches(), accum=1, steps_left=6, epoch=1, device=torch.device("cpu"), watchdog_s=1):
            seen["steps"] += 1
    except DataStallError as err:
        seen["training"] = str(err)
    try:
        in_step(rank == stall_rank, [], "validation", 1, torch.device("cpu"), "validation after epoch 2: ")
    except DataStallError as err:
        seen["validation"] = str(err)
    seen["seconds"] = time.monotonic() - started
    Path(f"{out}.{rank}").write_text(json.dumps(seen))
    dist.destroy_process_group()


def test_a_rank_whose_batches_stall_ends_the_run_on_every_rank_at_the_same_step(tmp_path: Path) -> None:
    """Two real gloo ranks; rank 1's batches stop coming. Its watchdog fires after 1 s, and both ranks raise the same
    DataStallError after the same 2 steps, in the step's collective, instead of rank 0 waiting in it until the
    collective's own timeout (30 min). The same for a validation pass."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "seen")
    torch.multiprocessing.spawn(_stall_on_rank, args=(port, 1, out), nprocs=2, join=True)
    seen = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    assert seen[0]["steps"] == seen[1]["steps"] == 2
    assert seen[0]["training"] == seen[1]["training"]
    assert seen[0]["training"].startswith("epoch 1, step 3 of the epoch: 1 of 2 ranks: no training batch for 1 s")
    assert seen[0]["validation"] == seen[1]["validation"]
    assert seen[0]["validation"].startswith("validation after epoch 2: 1 of 2 ranks: no validation batch for 1 s")
    assert max(s["seconds"] for s in seen) < 30


def test_a_single_process_whose_batches_stall_names_the_step() -> None:
    def stalled():
        yield {"targets": [{}]}
        threading.Event().wait()

    with pytest.raises(DataStallError, match=r"^epoch 0, step 2 of the epoch: no training batch for 0.2 s"):
        list(planned_groups(stalled(), accum=1, steps_left=3, epoch=0, device=torch.device("cpu"), watchdog_s=0.2))


@pytest.mark.parametrize("watchdog_s, collectives", [(0.0, 1), (5.0, 4)])
def test_the_stall_check_costs_one_all_reduce_a_step_only_with_the_watchdog_on(watchdog_s, collectives, monkeypatch):
    import ddetr.train.batches as batches_module

    calls: list[list[float]] = []
    real = batches_module.world_sum

    def counted(values, device):
        calls.append(list(values))
        return real(values, device)

    monkeypatch.setattr(batches_module, "world_sum", counted)
    batches = [{"targets": [{}]} for _ in range(4)]
    steps = list(
        planned_groups(batches, accum=1, steps_left=4, epoch=0, device=torch.device("cpu"), watchdog_s=watchdog_s)
    )
    assert len(steps) == 4 and len(calls) == collectives


def test_a_local_run_whose_images_all_fail_ends_in_a_data_error(tmp_path: Path) -> None:
    from ddetr.train import train

    data = make_synthetic_coco(str(tmp_path / "d"), 8, 2, seed=0, image_size=(64, 96))
    plant(data.train_shards, list(range(8)))
    overrides = ["data.scale=0.1", "data.loader_workers=0", "train.epochs=1", f"train.storage_path={tmp_path}",
                 "train.name=none", "data.val="]  # fmt: skip
    with pytest.raises(DataError, match="no rank got a single image"):
        train(build_config("tiny", data.root, overrides), engine="local")


@pytest.mark.ray
@pytest.mark.slow
def test_an_undecodable_image_leaves_two_ranks_in_step(ray_local, planted, tmp_path: Path, hard_timeout) -> None:
    """One broken image in a valid shard of a 2-worker run: the run ends, both ranks train the same steps in each
    of 2 epochs, and the logbook counts the image once per epoch."""
    from ddetr.train.ray_train import build_trainer, check_result

    data, broken = planted
    trace = tmp_path / "trace.jsonl"
    cfg = apply_overrides(
        get_preset("tiny"),
        [
            f"data.train={data.train_shards}",
            f"data.val={data.val_shards}",
            "data.scale=0.1",
            f"train.storage_path={tmp_path}",
            "train.name=planted",
            "train.num_workers=2",
            "train.cpus_per_worker=0.5",
            "train.epochs=2",
            "train.controller_failure_limit=0",
            "train.max_failures=0",
        ],  # fmt: skip
    )
    with hard_timeout(300):
        check_result(build_trainer(cfg, step_callbacks=[ImageTrace(trace)]).fit())
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    per_rank_epoch = Counter((line["rank"], line["epoch"]) for line in lines)
    planned = 48 // (2 * cfg.train.batch_size)
    assert per_rank_epoch == {(r, e): planned for r in (0, 1) for e in (0, 1)}
    assert broken[0] not in {i for line in lines for i in line["image_ids"]}
    epochs = [r for r in read_metrics(tmp_path / "planted") if r["kind"] == "epoch"]
    assert [r["data/skipped_images"] for r in epochs] == [1, 1]
    # Ray Train's controller keeps the run's pointers: `latest` names the last checkpoint.
    latest = json.loads((tmp_path / "planted" / "latest").read_text())
    assert latest["checkpoint"] == f"checkpoint_{2 * planned:08d}" and (tmp_path / "planted" / "best").exists()
