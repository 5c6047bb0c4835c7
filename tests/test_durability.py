"""Durable checkpoints and one file layer: the atomic writer (local disk and a real S3 server on loopback), the
order of fsyncs, renames and prunes, the manifest check, and a truncated newest checkpoint met by a resume and a
prune on the single-process engine and on Ray Train."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ddetr import io
from ddetr.config import Config, apply_overrides, get_preset
from ddetr.data.synthetic import make_synthetic_coco
from ddetr.train.checkpoints import (
    BEST,
    STATE_FILE,
    CorruptCheckpointError,
    checkpoint_name,
    checkpoint_order,
    free_checkpoint_name,
    is_checkpoint_name,
    latest_intact,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    update_pointers,
    verify_checkpoint,
)
from ddetr.train.local import LocalRuntime, prune_checkpoints
from ddetr.train.logbook import read_metrics
from tests.s3_server import s3_dir, s3_server  # noqa: F401  (fixtures)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine a second one makes these tiny steps many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_coco(str(tmp_path_factory.mktemp("syn")), 16, 0, seed=0, image_size=(64, 96))


def tiny(dataset, storage: Path, name: str, *overrides: str) -> Config:
    """The tiny preset at a tenth of the paper's image sizes, no validation."""
    return apply_overrides(
        get_preset("tiny"),
        [f"data.train={dataset.train_shards}", "data.scale=0.1", "data.loader_workers=0",
         f"train.storage_path={storage}", f"train.name={name}", "train.log_every=1000", *overrides],
    )  # fmt: skip


def checkpoint(folder: Path, step: int, ap: float | None = None, weight: float = 0.0) -> Path:
    """A small ddetr checkpoint folder as the engine writes it (state, metrics, config, manifest)."""
    metrics = {"step": step} if ap is None else {"step": step, "val/AP": ap}
    payload = {"model": {"w": torch.full((256,), weight)}, "state": {"step": step}, "config": {}}
    save_checkpoint(folder / checkpoint_name(step), payload, metrics)
    return folder / checkpoint_name(step)


def truncate(checkpoint_dir: Path) -> Path:
    state = checkpoint_dir / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    return state


# ---- one writer ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "s3"])
def test_one_writer_for_torch_and_parquet_leaves_the_old_file_when_its_block_fails(where, tmp_path, request):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_dir")
    state, table = io.join(root, "run", "state.pt"), io.join(root, "shard-00000.parquet")
    with io.atomic_writer(state) as f:
        torch.save({"w": torch.arange(5.0)}, f)
    with io.atomic_writer(table) as f:
        pq.write_table(pa.table({"image_id": [1, 2, 3]}), f)
    with io.local_copy(state) as local:
        assert torch.equal(torch.load(local, weights_only=True)["w"], torch.arange(5.0))
    with io.local_copy(table) as local:
        assert pq.read_table(local)["image_id"].to_pylist() == [1, 2, 3]
    before = io.read_bytes(state)
    with pytest.raises(OSError, match="disk gone"), io.atomic_writer(state) as f:
        torch.save({"w": torch.zeros(100)}, f)
        raise OSError("disk gone")  # the block fails after writing: nothing of it may appear
    assert io.read_bytes(state) == before
    assert io.listdir(io.join(root, "run")) == ["state.pt"]  # no temporary file left behind either


def test_a_checkpoint_is_fsynced_and_renamed_before_anything_older_is_pruned(dataset, tmp_path, monkeypatch):
    """The order of what `LocalRuntime.report` does to the disk, recorded by wrapping the real calls: every file of
    the new checkpoint and its folder fsync'ed, the rename, the run folder fsync'ed, and only then a prune."""
    cfg = tiny(dataset, tmp_path, "order", "train.keep_checkpoints=1")
    runtime = LocalRuntime(cfg, device="cpu")
    run = runtime.dir
    try:
        runtime.report({"step": 1, "mid_epoch": True}, checkpoint(tmp_path / "made", 1))
        events: list[tuple[str, str]] = []
        real_fsync, real_replace, real_rmtree = os.fsync, os.replace, shutil.rmtree

        def fsync(fd: int) -> None:
            events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def replace(src, dst) -> None:
            events.append(("replace", f"{src} -> {dst}"))
            real_replace(src, dst)

        def rmtree(path, *args, **kwargs) -> None:
            events.append(("rmtree", str(path)))
            real_rmtree(path, *args, **kwargs)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(shutil, "rmtree", rmtree)
        runtime.report({"step": 2, "mid_epoch": True}, checkpoint(tmp_path / "made", 2))
        monkeypatch.undo()
    finally:
        runtime.close()
    tmp, final, old = f"{run / checkpoint_name(2)}.tmp", str(run / checkpoint_name(2)), str(run / checkpoint_name(1))
    renamed = events.index(("replace", f"{tmp} -> {final}"))
    pruned = events.index(("rmtree", old))
    synced_before = {path for kind, path in events[:renamed] if kind == "fsync"}
    assert {f"{tmp}/{name}" for name in os.listdir(final)} | {tmp} <= synced_before
    assert ("fsync", str(run)) in events[renamed:pruned]  # the new name is on the disk before the old one goes
    assert [p.name for p in list_checkpoints(run)] == [checkpoint_name(2)]


# ---- what counts as intact ----------------------------------------------------------------------------------------


def test_a_folder_without_a_manifest_is_refused_in_one_line_and_its_state_file_still_loads(tmp_path):
    folder = checkpoint(tmp_path, 3)
    (folder / "manifest.json").unlink()
    with pytest.raises(CorruptCheckpointError) as err:
        load_checkpoint(folder)
    message = str(err.value)
    assert "\n" not in message and str(folder) in message and "no manifest.json" in message
    assert f"give its state file itself ({folder / STATE_FILE})" in message
    assert load_checkpoint(folder / STATE_FILE)["state"].step == 3
    # The models read the same format: a weights source that is a truncated ddetr folder is named, not unpickled.
    from ddetr.models.weights import read_weights

    state = truncate(checkpoint(tmp_path, 4))
    with pytest.raises(CorruptCheckpointError, match=f"{state} is incomplete"):
        read_weights(tmp_path / checkpoint_name(4))


def test_the_prune_keeps_the_newest_intact_and_the_best_and_never_trusts_a_corrupt_one(tmp_path):
    """A run resumed from step 4 because 6 was cut short writes 5 below it: 5 is the newest intact checkpoint and
    stays, though 6 has the higher number and the highest val/AP. The best pointer's checkpoint (2) stays too;
    3 goes; 6, not verified, is left for the run to write again."""
    run = tmp_path / "run"
    for step, ap in ((2, 0.5), (3, 0.1), (4, 0.2)):
        checkpoint(run, step, ap)
        update_pointers(str(run), checkpoint_name(step), {"step": step, "val/AP": ap})
    truncate(checkpoint(run, 6, 0.9))
    assert latest_intact(run) == run / checkpoint_name(4)
    fresh = checkpoint(run, 5, 0.05)
    update_pointers(str(run), fresh.name, {"step": 5, "val/AP": 0.05})
    pruned = prune_checkpoints(run, keep=1, fresh=fresh)
    assert sorted(p.name for p in pruned) == [checkpoint_name(3), checkpoint_name(4)]
    assert [p.name for p in list_checkpoints(run)] == [checkpoint_name(s) for s in (2, 5, 6)]
    assert json.loads((run / BEST).read_text())["checkpoint"] == checkpoint_name(2)
    # A later prune, without `fresh`, still counts 5 (not the corrupt 6) as the latest.
    assert prune_checkpoints(run, keep=1) == [] and latest_intact(run) == fresh


@pytest.mark.slow
def test_a_step_written_again_under_its_own_name_sorts_after_the_first_and_is_found_newest(tmp_path):
    assert checkpoint_name(600, rewrite=1) == "checkpoint_00000600-1"
    assert free_checkpoint_name(600, set()) == checkpoint_name(600)
    taken = {checkpoint_name(600), checkpoint_name(600, 1)}
    assert free_checkpoint_name(600, taken) == checkpoint_name(600, 2)
    for name in ("checkpoint_00000600-0", "checkpoint_00000600-", "checkpoint_00000600.tmp", "checkpoint_600"):
        assert not is_checkpoint_name(name)
        with pytest.raises(ValueError, match=name):
            checkpoint_order(name)
    for step, rewrite in ((2, 0), (4, 0), (4, 2), (4, 10), (10, 0)):
        checkpoint(tmp_path, step)
        if rewrite:
            (tmp_path / checkpoint_name(step)).rename(tmp_path / checkpoint_name(step, rewrite))
            checkpoint(tmp_path, step)
    truncate(tmp_path / checkpoint_name(10))
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        checkpoint_name(2), checkpoint_name(4), checkpoint_name(4, 2), checkpoint_name(4, 10), checkpoint_name(10)
    ]  # fmt: skip
    chosen = latest_intact(tmp_path)  # step 10 is cut short; "-10" is newer than "-2" whatever the letters say
    assert chosen is not None and chosen.name == checkpoint_name(4, 10)


def test_local_engine_resumes_past_a_truncated_newest_checkpoint_and_the_intact_one_survives(dataset, tmp_path, caplog):
    from ddetr.train import train

    cfg = tiny(dataset, tmp_path, "cut", "train.epochs=2", "train.max_steps_per_epoch=2", "train.keep_checkpoints=2")
    assert train(cfg, engine="local")["step"] == 4
    run = tmp_path / "cut"
    assert [p.name for p in list_checkpoints(run)] == [checkpoint_name(2), checkpoint_name(4)]
    truncate(run / checkpoint_name(4))
    with caplog.at_level("WARNING", logger="ddetr.train.checkpoints"):
        assert train(apply_overrides(cfg, ["train.epochs=3"]), engine="local")["step"] == 6
    assert f"resuming from {run / checkpoint_name(2)} instead of the newer {checkpoint_name(4)}" in caplog.text
    steps = [r["step"] for r in read_metrics(run) if r["kind"] == "step"]
    assert steps == [1, 2, 3, 4, 3, 4, 5, 6], "the second run starts after checkpoint 2"
    # Checkpoint 2 went only once two newer intact ones were there (4, written again, and 6).
    assert [p.name for p in list_checkpoints(run)] == [checkpoint_name(4), checkpoint_name(6)]
    for p in list_checkpoints(run):
        verify_checkpoint(p)
    assert load_checkpoint(run / checkpoint_name(6))["state"].step == 6


# ---- object storage and Ray Train ---------------------------------------------------------------------------------


def test_a_run_folder_in_a_bucket_falls_back_without_downloading_a_short_copy(tmp_path, s3_dir):  # noqa: F811
    from ddetr.train.ray_worker import node_copy

    run = f"{s3_dir}/run"
    for step in (2, 4):
        io.copy(checkpoint(tmp_path / "made", step, weight=step), io.join(run, checkpoint_name(step)))
    newest = io.join(run, checkpoint_name(4), STATE_FILE)
    io.atomic_write(newest, io.read_bytes(newest)[:100])  # an upload cut short
    fetched: list[str] = []
    copies: list[Path] = []

    def fetch(uri: str) -> Path:
        fetched.append(uri)
        fs, inner = io.resolve(uri)
        copies.append(node_copy(inner, fs))
        return copies[-1]

    chosen = latest_intact(run, fetch=fetch)
    try:
        assert chosen is not None and chosen.name == checkpoint_name(2)
        assert fetched == [io.join(run, checkpoint_name(2))]  # the short one was found by its size alone
        assert load_checkpoint(chosen)["model"]["w"][0] == 2
        # The same name written again (the resumed run reaches step 2 again): a node copy of the new content.
        io.copy(checkpoint(tmp_path / "again", 2, weight=7.0), io.join(run, checkpoint_name(2)))
        again = fetch(io.join(run, checkpoint_name(2)))
        assert again != chosen and load_checkpoint(again)["model"]["w"][0] == 7
    finally:
        for copy in copies:
            shutil.rmtree(copy.parent, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_resumes_past_a_truncated_latest_checkpoint(ray_local, dataset, tmp_path, hard_timeout):
    """Ray Train registers checkpoint 4 as the run's latest; cut short, it would fail every retry. The run given the
    same name again resumes from checkpoint 2, says so in its logbook, and ends with an intact checkpoint 6."""
    from ddetr.train import train

    cfg = tiny(dataset, tmp_path, "ray-cut", "train.epochs=2", "train.max_steps_per_epoch=2", "train.num_workers=1",
               "train.cpus_per_worker=0.5", "train.max_failures=0", "train.controller_failure_limit=0")  # fmt: skip
    with hard_timeout(300):
        assert train(cfg, engine="ray")["step"] == 4
        run = tmp_path / "ray-cut"
        assert [p.name for p in list_checkpoints(run)] == [checkpoint_name(2), checkpoint_name(4)]
        truncate(run / checkpoint_name(4))
        assert train(apply_overrides(cfg, ["train.epochs=3"]), engine="ray")["step"] == 6
    records = read_metrics(run)
    fallback = [r for r in records if r["kind"] == "checkpoint_fallback"]
    assert len(fallback) == 1 and fallback[0]["skipped"] == checkpoint_name(4)
    assert fallback[0]["checkpoint"] == checkpoint_name(2) and "incomplete" in fallback[0]["reason"]
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2, 3, 4, 3, 4, 5, 6]
    newest = run / checkpoint_name(6)
    verify_checkpoint(newest)
    assert load_checkpoint(newest)["state"].step == 6
    # Step 4 was written again after the fallback: under a name of its own, since Ray Train still holds the cut one
    # as checkpoint 4 and deletes it by its path when it prunes it (here at step 6, keeping 2), which would delete
    # the new one too and leave the run a checkpoint it registers but cannot find.
    kept = [p.name for p in list_checkpoints(run)]
    assert checkpoint_name(4) not in kept and kept == [checkpoint_name(4, rewrite=1), checkpoint_name(6)]
    verify_checkpoint(run / checkpoint_name(4, rewrite=1))
    with hard_timeout(300):  # Ray Train continues the run by its name only when every checkpoint it registered exists
        assert train(apply_overrides(cfg, ["train.epochs=4"]), engine="ray")["step"] == 8
    assert [p.name for p in list_checkpoints(run)] == [checkpoint_name(6), checkpoint_name(8)]
