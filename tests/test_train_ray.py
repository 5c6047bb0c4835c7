"""The Ray Train adapter: a 2-worker TorchTrainer run, and recovery from a worker killed mid-epoch."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from ddetr.config import Config, apply_overrides, get_preset
from ddetr.data.loader import build_dataloader
from ddetr.data.synthetic import make_synthetic_coco
from ddetr.data.transforms import TransformConfig
from ddetr.train import loop, train
from ddetr.train.callbacks import ImageTrace, KillAfterStep
from ddetr.train.checkpoints import list_checkpoints, load_checkpoint, save_checkpoint
from ddetr.train.engine import NonFiniteLossError
from ddetr.train.logbook import read_metrics

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
            "train.controller_failure_limit=0",
        ],
    )
    with hard_timeout(240):
        result = build_trainer(cfg).fit()
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
            "train.use_gpu=false",  # the checkpoint keeps what the run resolved "auto" to on this CPU cluster
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
            TransformConfig().scaled(cfg.data.scale),
            train=True,
            batch_size=cfg.train.batch_size,
            seed=cfg.train.seed,
            epoch=0,
            num_workers=0,
            rank=rank,
            world_size=world_size,
            deal_size=cfg.train.batch_size,  # as the Ray runtime deals
        )
        batches = [[int(t["image_id"]) for t in b["targets"]] for b in loader]
        expected[rank] = batches[:steps]
    return expected


@pytest.mark.slow
def test_worker_killed_mid_epoch_resumes_from_the_latest_checkpoint(ray_local, dataset, tmp_path, hard_timeout):
    """Rank 1 kills itself (SIGKILL) after step 5 of 6; checkpoints every 2 steps.

    The run restarts both workers from the latest checkpoint Ray registered (step 4, or step 2 when the kill
    beat the registration), continues the step counter from it, and trains exactly the images of the epoch
    that come after it.
    """
    from ddetr.train.ray_train import build_trainer

    trace, marker = tmp_path / "trace.jsonl", tmp_path / "fault-injected"
    callbacks = [ImageTrace(trace), KillAfterStep(rank=1, step=5, marker=marker)]
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
        result = build_trainer(
            apply_overrides(cfg, ["train.controller_failure_limit=1"]), step_callbacks=callbacks
        ).fit()
    assert result.error is None
    assert marker.exists(), "the fault never fired"
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

    def poisoned_build_model(cfg: Config, **kwargs):
        model, criterion, postprocessors = build(cfg, **kwargs)
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
def test_elastic_run_starts_with_the_workers_that_fit(ray_local, dataset, tmp_path, hard_timeout):
    from ddetr.train.ray_train import build_trainer

    trace = tmp_path / "trace.jsonl"
    steps = 3
    cfg = elastic_config(
        dataset, tmp_path, "elastic", f"train.max_steps_per_epoch={steps}", "train.elastic_resize_interval_s=5"
    )
    trainer = build_trainer(
        apply_overrides(cfg, ["train.controller_failure_limit=1"]), step_callbacks=[ImageTrace(trace)]
    )
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


@pytest.mark.slow
def test_init_from_a_checkpoint_with_other_classes_keeps_the_rows_of_shared_names(
    ray_local, dataset, tmp_path, hard_timeout
):
    """Fine-tuning through Ray Train from a checkpoint of 7 classes onto the dataset's 5: the class heads are
    re-initialised (and the logbook says so), the rows of "rectangle" and "ellipse" come from the source's rows
    of those names, the others carry the focal prior. lr 0 keeps what init_from loaded for the check."""
    from ddetr.train.loop import Training

    source_cfg = apply_overrides(get_preset("tiny"), ["model.num_classes=7"])
    source_categories = [
        {"id": 1, "name": "ellipse"},
        {"id": 2, "name": "car"},
        {"id": 5, "name": "rectangle"},
        {"id": 6, "name": "dog"},
    ]
    source = Training(source_cfg, torch.device("cpu"), categories=source_categories)
    with torch.no_grad():
        for head in source.model.class_embed:
            head.weight.normal_()
            head.bias.copy_(torch.arange(7.0))
    save_checkpoint(tmp_path / "source", source.payload(source_cfg.to_dict()), {})
    rows = {k: v for k, v in source.model.state_dict().items() if k.startswith("class_embed.")}

    cfg = ray_config(
        dataset,
        tmp_path,
        "finetune",
        "model.num_classes=5",
        f"model.init_from={tmp_path / 'source'}",
        "train.max_steps_per_epoch=1",
        "train.lr=0",
        "train.lr_backbone=0",
    )
    with hard_timeout(300):
        metrics = train(cfg, engine="ray")
    assert metrics["step"] == 1
    final = load_checkpoint(list_checkpoints(tmp_path / "finetune")[-1])["model"]
    prior = -math.log((1 - 0.01) / 0.01)
    for i in range(len(source.model.class_embed)):
        weight, bias = final[f"class_embed.{i}.weight"], final[f"class_embed.{i}.bias"]
        assert weight.shape[0] == 5
        for dataset_id, source_row in ((1, 5), (2, 1)):  # rectangle, ellipse
            torch.testing.assert_close(weight[dataset_id], rows[f"class_embed.{i}.weight"][source_row])
            assert bias[dataset_id] == rows[f"class_embed.{i}.bias"][source_row]
        for other in (0, 3, 4):
            assert bias[other] == pytest.approx(prior)
    events = [r for r in read_metrics(tmp_path / "finetune") if r["kind"] == "init_from"]
    assert len(events) == 1 and "class_embed.0.weight" in events[0]["reinitialised"]


@pytest.mark.slow
def test_a_starved_data_pipeline_ends_in_the_watchdog_error(ray_local, dataset, tmp_path, hard_timeout):
    """Two workers of half a CPU leave one CPU of this 2-CPU Ray, and each decode task asks for 1.5: no task can
    ever start. `train` refuses such a run before it starts; a TorchTrainer built without that check (or a cluster
    whose CPUs other work holds) stops with the watchdog's error naming the cause, instead of waiting forever."""
    from ddetr.config import ConfigError
    from ddetr.data.shards import DataError
    from ddetr.train.ray_train import build_trainer, check_result

    cfg = ray_config(dataset, tmp_path, "starved", "data.map_cpus=1.5", "data.watchdog_s=20")
    with pytest.raises(ConfigError, match=r"2 x 0.5 \+ 1.5 = 2.5 CPUs, but this cluster \(the nodes up now\) has 2"):
        train(cfg, engine="ray")
    with hard_timeout(240), pytest.raises(DataError, match="no training batch for 20 s.*train.cpus_per_worker"):
        check_result(build_trainer(apply_overrides(cfg, ["train.max_failures=0"])).fit())


@pytest.mark.slow
def test_the_default_train_command_trains_on_this_machine(dataset, tmp_path, hard_timeout):
    """`ddetr train --preset tiny --data D train.epochs=1`, every other setting at its default, in a fresh
    process that starts its own Ray: the CPUs are split so that the data tasks get some, and it finishes."""
    root = dataset.root
    cmd = [sys.executable, "-m", "ddetr.cli", "train", "--preset", "tiny", "--data", str(root), "train.epochs=1"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    with hard_timeout(600):
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=590)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(done.stdout[done.stdout.index("{") :])
    assert metrics["epoch"] == 1 and metrics["step"] >= 1 and "val/AP" in metrics
    assert len(list((tmp_path / "runs").glob("tiny-*"))) == 1


def test_a_local_ray_starts_where_a_dead_one_left_its_address():
    """A Ray that died without `ray stop` leaves its address in <temp>/ray/ray_current_cluster; ray.init() would
    try to join it and hang. `init_local_ray` starts a new one."""
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths must stay under 108 characters
    try:
        os.makedirs(os.path.join(temp, "ray"))
        with open(os.path.join(temp, "ray", "ray_current_cluster"), "w") as f:
            f.write("127.0.0.1:9")  # nothing answers there
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        code = (
            "import ray; from ddetr.train.ray_train import init_local_ray; "
            "started = init_local_ray(1); print(started, ray.cluster_resources()['CPU']); ray.shutdown()"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], env={**env, "RAY_TMPDIR": temp}, capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split() == ["True", "1.0"]
    finally:
        shutil.rmtree(temp, ignore_errors=True)
