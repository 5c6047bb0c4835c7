"""The Ray Train adapter: a 2-worker TorchTrainer run, and recovery from a worker killed mid-epoch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from ddetr.config import Config, apply_overrides, get_preset
from ddetr.data.loader import build_dataloader
from ddetr.data.synthetic import make_synthetic_coco
from ddetr.train import loop, train
from ddetr.train.engine import NonFiniteLossError
from ddetr.train.local import transform_config
from ddetr.train.logbook import read_metrics
from ddetr.train.probes import FAULT_MARKER, FAULT_VAR, TRACE_VAR
from ddetr.train.state import load_checkpoint

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_coco(str(tmp_path_factory.mktemp("syn")), 24, 4, seed=0, image_size=(64, 96))


def ray_config(dataset, storage: Path, name: str, *overrides: str) -> Config:
    return apply_overrides(
        get_preset("tiny"),
        [
            f"data.train={dataset.train_shards}",
            "data.scale=0.1",
            f"train.storage_path={storage}",
            f"train.name={name}",
            "train.num_workers=2",
            "train.cpus_per_worker=0.5",  # leaves a CPU of the two for Ray Data's decode tasks
            "train.epochs=1",
            *overrides,
        ],
    )


def test_two_workers_train_evaluate_and_report_checkpoints(ray_local, dataset, tmp_path, hard_timeout, monkeypatch):
    """Relative paths, as typed on a command line, are the caller's: Ray runs its workers somewhere else."""
    from ddetr.train.ray_train import build_trainer

    monkeypatch.chdir(tmp_path)
    cfg = apply_overrides(
        ray_config(dataset, Path("runs"), "two"),
        [
            f"data.train={os.path.relpath(dataset.train_shards)}",
            f"data.val={os.path.relpath(dataset.val_shards)}",
            "train.max_steps_per_epoch=2",
            "train.checkpoint_every_steps=1",
        ],
    )
    with hard_timeout(240):
        result = build_trainer(cfg, controller_failure_limit=0).fit()
    assert result.error is None
    assert result.metrics["step"] == 2 and result.metrics["epoch"] == 1
    assert "val/AP" in result.metrics and "train/loss" in result.metrics
    final = load_checkpoint(result.checkpoint.to_directory())
    assert final["state"].step == 2 and final["state"].epoch == 1
    absolute = apply_overrides(
        cfg,
        [
            f"data.train={dataset.train_shards}",
            f"data.val={dataset.val_shards}",
            f"train.storage_path={tmp_path / 'runs'}",
        ],
    )
    assert final["config"] == absolute.to_dict()
    reported = sorted(int(m["step"]) for _, m in result.best_checkpoints)
    assert reported[-1] == 2 and set(reported) <= {1, 2}
    # Rank 0 logged both optimizer steps of the run, and the epoch, into the run folder under the caller's cwd.
    records = read_metrics(tmp_path / "runs" / "two")
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1]


def expected_image_ids(cfg: Config, world_size: int, steps: int) -> dict[int, list[list[int]]]:
    """rank -> image ids of each optimizer step of epoch 0, from the plain data path (the same epoch order)."""
    expected = {}
    for rank in range(world_size):
        loader = build_dataloader(
            cfg.data.train,
            transform_config(cfg),
            train=True,
            batch_size=cfg.train.batch_size,
            seed=cfg.train.seed,
            epoch=0,
            num_workers=0,
            rank=rank,
            world_size=world_size,
        )
        batches = [[int(t["image_id"]) for t in b["targets"]] for b in loader]
        expected[rank] = batches[:steps]
    return expected


@pytest.mark.slow
def test_worker_killed_mid_epoch_resumes_from_the_latest_checkpoint(
    ray_local, dataset, tmp_path, hard_timeout, monkeypatch
):
    """Rank 1 kills itself (SIGKILL) after step 5 of 6; checkpoints every 2 steps.

    The run restarts both workers from the latest checkpoint Ray registered (step 4, or step 2 when the kill
    beat the registration), continues the step counter from it, and trains exactly the images of the epoch
    that come after it.
    """
    from ddetr.train.ray_train import build_trainer

    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv(TRACE_VAR, str(trace))
    monkeypatch.setenv(FAULT_VAR, "1:5")
    steps = 6
    cfg = ray_config(
        dataset,
        tmp_path,
        "fault",
        f"train.max_steps_per_epoch={steps}",
        "train.checkpoint_every_steps=2",
        "train.max_failures=1",
    )
    with hard_timeout(420):
        result = build_trainer(cfg, controller_failure_limit=1).fit()
    assert result.error is None
    assert (tmp_path / "fault" / FAULT_MARKER).exists(), "the fault never fired"
    final = load_checkpoint(result.checkpoint.to_directory())
    assert final["state"].step == steps and final["state"].epoch == 1

    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    attempts = sorted({line["start_step"] for line in lines})
    assert len(attempts) == 2 and attempts[0] == 0, f"expected one restart, got start steps {attempts}"
    resumed_from = attempts[1]
    assert resumed_from in (2, 4), f"resumed from step {resumed_from}, not from a checkpoint of the first attempt"

    # What the run kept: the first attempt up to the checkpoint, then the second attempt.
    kept: dict[int, dict[int, list[int]]] = defaultdict(dict)
    for line in lines:
        first, step = line["start_step"] == 0, line["step"]
        if (first and step <= resumed_from) or not first:
            assert step not in kept[line["rank"]], f"rank {line['rank']} trained step {step} twice"
            kept[line["rank"]][step] = line["image_ids"]
    # The step counter goes on from the checkpoint without a gap, on every rank.
    second = sorted({line["step"] for line in lines if line["start_step"] == resumed_from})
    assert second == list(range(resumed_from + 1, steps + 1))
    expected = expected_image_ids(cfg, 2, steps)
    for rank in (0, 1):
        assert sorted(kept[rank]) == list(range(1, steps + 1))
        # Each step trained exactly the images the epoch order gives it: none twice, none skipped.
        assert [kept[rank][s] for s in range(1, steps + 1)] == expected[rank]
    trained = [i for rank in (0, 1) for s in range(1, steps + 1) for i in kept[rank][s]]
    assert len(trained) == len(set(trained)) == steps * 2 * cfg.train.batch_size
    # Rank 0's step log: the first attempt's steps, then the resumed ones from the checkpoint on.
    logged = [r["step"] for r in read_metrics(tmp_path / "fault") if r["kind"] == "step"]
    restarts = [i for i in range(1, len(logged)) if logged[i] <= logged[i - 1]]
    if restarts:
        assert logged[restarts[-1] :] == list(range(resumed_from + 1, steps + 1))
    else:  # rank 0 was stopped before it logged a step past the checkpoint
        assert logged == list(range(1, steps + 1))


def test_nonfinite_loss_stops_a_ray_run_without_retrying(ray_local, dataset, tmp_path, hard_timeout, monkeypatch):
    """A worker error would be retried from the last checkpoint, and meet the same loss again: the adapter stops
    the run instead and the driver raises. `num_workers=0` runs the train function in this process."""
    cfg = ray_config(
        dataset, tmp_path, "nan", "train.num_workers=0", "train.max_failures=2", "train.checkpoint_every_steps=1"
    )
    build, calls = loop.build_model, []

    def poisoned_build_model(cfg: Config):
        model, criterion, postprocessors = build(cfg)
        forward = criterion.forward

        def forward_nan_on_second_call(outputs, targets, num_boxes=None):
            losses = forward(outputs, targets, num_boxes=num_boxes)
            calls.append(1)
            return {k: v * math.nan for k, v in losses.items()} if len(calls) == 2 else losses

        criterion.forward = forward_nan_on_second_call
        return model, criterion, postprocessors

    monkeypatch.setattr(loop, "build_model", poisoned_build_model)
    with hard_timeout(180), pytest.raises(NonFiniteLossError, match="optimizer step 2 .*loss_ce=nan.*last good"):
        train(cfg, engine="ray")
    assert len(calls) == 2, "the run was retried"


def epoch_image_ids(cfg: Config, count: int) -> list[int]:
    """The first `count` image ids of epoch 0's order, whatever the number of workers."""
    return [ids[0] for ids in expected_image_ids(apply_overrides(cfg, ["train.batch_size=1"]), 1, count)[0]]


def elastic_config(dataset, storage: Path, name: str, *overrides: str) -> Config:
    """1 to 4 workers of 0.75 CPU, batch 1 each, total batch 2: two fit in 2 CPUs, with 0.5 left for Ray Data."""
    return ray_config(
        dataset,
        storage,
        name,
        "train.min_workers=1",
        "train.num_workers=4",
        "train.cpus_per_worker=0.75",
        "data.map_cpus=0.25",
        "train.batch_size=1",
        "train.total_batch_size=2",
        *overrides,
    )


@pytest.mark.slow
def test_elastic_run_starts_with_the_workers_that_fit(ray_local, dataset, tmp_path, hard_timeout, monkeypatch):
    from ddetr.train.ray_train import build_trainer

    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv(TRACE_VAR, str(trace))
    steps = 3
    cfg = elastic_config(
        dataset, tmp_path, "elastic", f"train.max_steps_per_epoch={steps}", "train.elastic_resize_interval_s=5"
    )
    trainer = build_trainer(cfg, controller_failure_limit=1)
    assert trainer.scaling_config.num_workers == (1, 4)
    assert trainer.scaling_config.elastic_resize_monitor_interval_s == 5
    with hard_timeout(240):
        result = trainer.fit()
    assert result.error is None
    final = load_checkpoint(result.checkpoint.to_directory())
    assert final["state"].step == steps and final["state"].epoch == 1
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert {line["world_size"] for line in lines} == {2}, "asked for up to 4 workers: 2 fit on 2 CPUs"
    assert sorted((line["rank"], line["step"]) for line in lines) == [(r, s) for r in (0, 1) for s in (1, 2, 3)]
    trained = [i for line in lines for i in line["image_ids"]]
    assert sorted(trained) == sorted(epoch_image_ids(cfg, steps * 2))


@pytest.fixture(scope="module")
def elastic_dataset(tmp_path_factory):
    """176 images: an epoch of 88 steps of 2, long enough to lose a node and get one back within it."""
    return make_synthetic_coco(str(tmp_path_factory.mktemp("elastic")), 176, 2, seed=0, image_size=(64, 96))


@pytest.mark.slow
def test_losing_a_node_continues_with_fewer_workers_and_grows_back(elastic_dataset, tmp_path):
    """A two-node cluster on this machine loses its worker node mid-epoch, then gets a new one (see
    `elastic_node_loss.py`): 2 workers, then 1, then 2 again, each time from the latest checkpoint."""
    trace = tmp_path / "trace.jsonl"
    script = Path(__file__).with_name("elastic_node_loss.py")
    done = subprocess.run(
        [sys.executable, str(script), elastic_dataset.train_shards, str(tmp_path), str(trace)],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["error"] is None
    steps, every = 80, 4  # elastic_node_loss.STEPS, CHECKPOINT_EVERY
    assert summary["step"] == steps and summary["epoch"] == 1

    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    # Attempts in the order they started (the trace is appended to as steps finish).
    attempts = list(dict.fromkeys((line["start_step"], line["world_size"]) for line in lines))
    worlds = [world for _, world in attempts]
    assert worlds[0] == 2 and attempts[0][0] == 0, f"the run should start with 2 workers, one per node: {attempts}"
    assert 1 in worlds, f"after losing a node the run should go on with 1 worker: {attempts}"
    assert worlds[-1] == 2 and worlds.index(1) < len(worlds) - 1, f"it should grow back to 2 workers: {attempts}"
    assert all(start % every == 0 for start, _ in attempts), f"restarts from non-checkpoint steps: {attempts}"

    # What the run kept: each attempt's steps up to where the next one resumed. The step counter goes on without
    # a gap, every step trained by every worker of its attempt, 2 images per step whatever the worker count.
    kept: dict[int, list[dict]] = defaultdict(list)
    for i, (start, world) in enumerate(attempts):
        end = attempts[i + 1][0] if i + 1 < len(attempts) else steps
        for line in lines:
            if (line["start_step"], line["world_size"]) == (start, world) and start < line["step"] <= end:
                kept[line["step"]].append(line)
    assert sorted(kept) == list(range(1, steps + 1))
    for step, step_lines in kept.items():
        assert sorted(line["rank"] for line in step_lines) == list(range(step_lines[0]["world_size"])), step
        assert sum(len(line["image_ids"]) for line in step_lines) == 2, step
    # Together they trained exactly the first 2 x 80 images of the epoch order: none twice, none skipped, across
    # two changes of the worker count.
    trained = [i for step_lines in kept.values() for line in step_lines for i in line["image_ids"]]
    cfg = elastic_config(elastic_dataset, tmp_path, "node_loss")
    assert sorted(trained) == sorted(epoch_image_ids(cfg, 2 * steps)) and len(set(trained)) == len(trained)
