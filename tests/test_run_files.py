"""log.txt of a run folder on the Ray engine: rank 0's console lines (step lines, the epoch's validation) are in it
beside the driver's, in a local folder and in a bucket, where its writers take turns appending."""

from __future__ import annotations

import logging

import pytest

from ddetr import io
from ddetr.config import apply_overrides, get_preset
from ddetr.data.synthetic import make_synthetic_coco
from ddetr.train.run_files import LOG_TXT, RunLog, rank_zero_log
from tests.s3_server import s3_dir, s3_server  # noqa: F401  (fixtures)


def test_writers_taking_turns_in_a_bucket_keep_each_others_lines(s3_dir):  # noqa: F811
    """The driver's log (uploaded at the start and the end) and rank 0's (uploaded while it trains): neither upload
    drops the lines the other appended to the object before it."""
    path = f"{s3_dir}/run/{LOG_TXT}"
    driver = RunLog(path)
    driver.note(logging.INFO, "run starts")
    driver.upload()
    with rank_zero_log(f"{s3_dir}/run") as worker:
        logging.getLogger("ddetr.train").warning("epoch 1/1 step 1/2, loss 3.1")
        worker.upload()
        assert io.read_text(path).count("\n") == 2
        logging.getLogger("ddetr.train").warning("epoch 1/1 done: loss 3.0, val/AP 0.01")
    driver.note(logging.INFO, "run ends")
    driver.close()
    lines = [line.split(": ", 1)[-1] for line in io.read_text(path).splitlines()]
    assert lines == ["run starts", "epoch 1/1 step 1/2, loss 3.1", "epoch 1/1 done: loss 3.0, val/AP 0.01", "run ends"]


@pytest.mark.ray
def test_a_ray_training_leaves_rank_zeros_lines_in_log_txt(ray_local, tmp_path, hard_timeout):
    from ddetr.train import train

    data = make_synthetic_coco(str(tmp_path / "syn"), 4, 2, seed=0, image_size=(48, 64))
    cfg = apply_overrides(
        get_preset("tiny"),
        [
            f"data.train={data.train_shards}",
            f"data.val={data.val_shards}",
            "data.scale=0.1",
            f"train.storage_path={tmp_path / 'runs'}",
            "train.name=logged",
            "train.num_workers=1",
            "train.cpus_per_worker=0.5",  # leaves the Ray Data decode tasks a CPU of the session's two
            "train.epochs=1",
            "train.batch_size=2",
            "train.log_every=1",
        ],
    )
    with hard_timeout(180):
        train(cfg, engine="ray")
    log_txt = (tmp_path / "runs" / "logged" / LOG_TXT).read_text()
    assert "run logged starts (ray engine)" in log_txt  # the driver's
    assert "epoch 1/1 step 1/2" in log_txt, log_txt  # rank 0's progress line
    assert "epoch 1/1 done:" in log_txt and "val/AP" in log_txt, log_txt  # rank 0's epoch summary with validation
