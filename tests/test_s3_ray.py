"""Object storage end to end through Ray, against the S3 server on loopback (`s3_server.py`).

Images converted into shards in the bucket; a 2-worker run whose run folder is in the bucket, a worker killed
mid-epoch and the run restored from the bucket's checkpoint; `--resume s3://...`; then `ddetr eval` and batch
inference from an `s3://` checkpoint, the detections and drawings written back to the bucket. What ddetr wrote is
read back with boto3, an independent client of the same server.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from ddetr import cli, io
from ddetr.config import build_config
from ddetr.train.callbacks import ImageTrace, KillAfterStep
from ddetr.train.checkpoints import checkpoint_name, fetch_checkpoint, load_checkpoint
from ddetr.train.logbook import read_metrics
from tests.s3_server import ray_s3, s3_dir, s3_server  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]

TRAIN_IMAGES, VAL_IMAGES = 16, 4
STEPS_PER_EPOCH = TRAIN_IMAGES // (2 * 2)  # 2 workers of 2 images
EPOCHS = 2
KILL_AFTER = 7  # the third step of the second epoch; checkpoints every 2 steps, so the last one is mid-epoch


def bucket_key(s3_server, uri: str) -> str:  # noqa: F811
    return uri.removeprefix(f"s3://{s3_server.bucket}/")


def test_a_run_in_the_bucket_survives_a_killed_worker_and_its_checkpoints_serve_eval_and_predict(
    ray_s3,  # noqa: F811
    s3_server,  # noqa: F811
    s3_dir,  # noqa: F811
    tmp_path,
    hard_timeout,
    capsys,
) -> None:
    from ddetr.train.ray_train import build_trainer

    coco = f"{s3_dir}/coco"
    assert cli.main(["data", "synth", "--out", coco, "--images", str(TRAIN_IMAGES), "--val", str(VAL_IMAGES)]) == 0
    for split in ("train", "val"):
        argv = ["data", "convert", "--images", f"{coco}/images/{split}", "--out", f"{s3_dir}/shards/{split}",
                "--annotations", f"{coco}/annotations/instances_{split}.json"]  # fmt: skip
        assert cli.main(argv) == 0
    settings = [
        "data.scale=0.1",
        f"train.storage_path={s3_dir}/runs",
        "train.num_workers=2",
        "train.cpus_per_worker=0.5",
        f"train.epochs={EPOCHS}",
        "train.checkpoint_every_steps=2",
        "train.keep_checkpoints=4",  # all of them
        "train.max_failures=1",
        "train.controller_failure_limit=1",
        "train.lr_backbone=0",  # a frozen backbone: smaller checkpoints (no optimizer state for it)
    ]
    cfg = build_config("tiny", f"{s3_dir}/shards", [*settings, "train.name=bucket"])
    run = f"{s3_dir}/runs/bucket"
    trace, marker = tmp_path / "trace.jsonl", tmp_path / "fault-injected"
    callbacks = [ImageTrace(trace), KillAfterStep(rank=1, step=KILL_AFTER, marker=marker)]
    with hard_timeout(480):
        result = build_trainer(cfg, step_callbacks=callbacks).fit()
    assert result.error is None
    assert marker.exists(), "the fault never fired"
    last = STEPS_PER_EPOCH * EPOCHS

    # The restarted workers restored the newest checkpoint the bucket held and went on from its step.
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    starts = sorted({line["start_step"] for line in lines})
    assert len(starts) == 2 and starts[0] == 0, f"expected one restart, got start steps {starts}"
    resumed_from = starts[1]
    assert resumed_from in (4, 6), f"resumed from step {resumed_from}, not from a checkpoint of the first attempt"
    second = sorted({line["step"] for line in lines if line["start_step"] == resumed_from})
    assert second == list(range(resumed_from + 1, last + 1))

    # The run folder is in the bucket: every checkpoint, the step log, TensorBoard events and the curves.
    keys = s3_server.keys(bucket_key(s3_server, run) + "/")
    for step in (2, 4, 6, 8):
        assert f"{bucket_key(s3_server, run)}/{checkpoint_name(step)}/state.pt" in keys, sorted(keys)
    final = load_checkpoint(fetch_checkpoint(f"{run}/{checkpoint_name(last)}", tmp_path / "final"))
    assert final["state"].step == last and final["state"].epoch == EPOCHS
    records = read_metrics(run)
    logged = [r["step"] for r in records if r["kind"] == "step"]
    assert logged[-(last - resumed_from) :] == list(range(resumed_from + 1, last + 1))
    assert [r["epoch"] for r in records if r["kind"] == "epoch"][-1] == EPOCHS
    # Event files reach the bucket in parts (`<file>.part-NNNNN`): count the files.
    # Event files reach the bucket in parts (`<file>.part-NNNNN`): count the files; the logbook's, not the pictures'
    # writer's (`.results.` in its name, `ddetr/train/results.py`).
    events = sorted({re.sub(r"\.part-\d+$", "", k) for k in keys if "/tensorboard/" in k and "tfevents" in k})
    events = [e for e in events if ".results." not in e]
    assert len(events) == 2, events  # rank 0's writer before the kill and after the restart, neither overwritten
    assert f"{bucket_key(s3_server, run)}/curves.png" in keys

    # `--resume s3://...` into another run: from the mid-epoch checkpoint at step 6 to the end of the schedule.
    resumed = f"{s3_dir}/runs/again"
    argv = ["train", "--preset", "tiny", "--data", f"{s3_dir}/shards", "--resume", f"{run}/{checkpoint_name(6)}",
            *settings, "train.name=again"]  # fmt: skip
    with hard_timeout(300):
        assert cli.main(argv) == 0
    assert [r["step"] for r in read_metrics(resumed) if r["kind"] == "step"] == [7, 8]

    # Eval and batch inference straight from the bucket's checkpoint; detections and drawings go back to it.
    capsys.readouterr()
    checkpoint = f"{run}/{checkpoint_name(last)}"
    with hard_timeout(240):
        assert cli.main(["eval", "--checkpoint", checkpoint, "--data", f"{s3_dir}/shards"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0.0 <= metrics["AP"] <= 1.0 and 0.0 <= metrics["AP50"] <= 1.0
    out = f"{s3_dir}/predictions"
    argv = ["predict", "--checkpoint", checkpoint, "--shards", f"{s3_dir}/shards/val", "--out", out,
            "--actors", "1", "--draw", "2", "--threshold", "0"]  # fmt: skip
    with hard_timeout(240):
        assert cli.main(argv) == 0
    client = s3_server.client()
    body = client.get_object(Bucket=s3_server.bucket, Key=f"{bucket_key(s3_server, out)}/detections.json")["Body"]
    detections = json.loads(body.read())
    truth = json.loads(io.read_text(f"{coco}/annotations/instances_val.json"))
    assert {d["image_id"] for d in detections} == {image["id"] for image in truth["images"]}
    pictures = [k for k in s3_server.keys(bucket_key(s3_server, out) + "/") if k.endswith(".png")]
    assert len(pictures) == 2
    for key in pictures:
        assert client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sweep_in_the_bucket_continues_with_the_bucket_only(
    ray_s3,  # noqa: F811
    s3_server,  # noqa: F811
    s3_dir,  # noqa: F811
    hard_timeout,
) -> None:
    """A 2-trial ASHA sweep with `--storage s3://...`: its table, plot, best config and ASHA rungs land in the bucket;
    Tune's local files deleted, the same command continues it from the bucket, and a scheduler built on the bucket's
    rungs alone stops a trial behind them."""
    from ray.tune.schedulers import TrialScheduler

    from ddetr.sweep.asha import ResumableASHA
    from ddetr.sweep.driver import ASHA_STATE
    from tests.test_tune import TEST_SPACE, TINY, sweep_env

    shards = f"{s3_dir}/shards"
    assert cli.main(["data", "synth", "--out", s3_dir, "--images", "48", "--val", "8"]) == 0
    cmd = [sys.executable, str(REPO / "tune" / "sweep.py"), "--preset", "tiny", "--data", shards, "--space",
           str(TEST_SPACE), "--samples", "1", "--max-concurrent", "2", "--name", "asha", "--storage",
           f"{s3_dir}/tune", *TINY, "train.epochs=1"]  # fmt: skip
    env = sweep_env(ray_s3)
    with hard_timeout(600):
        first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=480)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    sweep = f"{s3_dir}/tune/asha"
    keys = s3_server.keys(bucket_key(s3_server, sweep) + "/")
    for name in ("results.csv", "results.md", "ap_vs_params.png", "best_config.json", ASHA_STATE):
        assert f"{bucket_key(s3_server, sweep)}/{name}" in keys, sorted(keys)
    table = io.read_text(f"{sweep}/results.csv")
    assert len(table.splitlines()) == 3, table  # a header and the two trials of the learning-rate grid

    # Tune's local files of the sweep (its driver's staging folder in the Ray session): gone, as on another machine.
    staged = {p.resolve() for p in Path("/tmp/ray").glob("session_*/artifacts/*/asha")}  # session_latest: a link
    assert staged, "no local staging folder of the sweep found to delete"
    for local in staged:
        shutil.rmtree(local)
    with hard_timeout(300):
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"continuing the sweep in {sweep}" in again.stdout + again.stderr, again.stderr[-3000:]
    assert io.read_text(f"{sweep}/results.csv").splitlines()[1:] == table.splitlines()[1:]  # nothing ran again

    scheduler = ResumableASHA(f"{sweep}/{ASHA_STATE}", metric="val/AP", mode="max", time_attr="epoch", max_t=1,
                              grace_period=1, reduction_factor=2)  # fmt: skip
    behind = types.SimpleNamespace(trial_id="behind")
    scheduler.on_trial_add(None, behind)
    assert scheduler.on_trial_result(None, behind, {"epoch": 1, "val/AP": -1.0}) == TrialScheduler.STOP
