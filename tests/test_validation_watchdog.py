"""Validation is under the data watchdog as training is: a validation pipeline that stops delivering ends the run
with the watchdog's error naming validation, instead of a hang. No Ray; the tiny preset on a few synthetic images."""

from __future__ import annotations

import time

import pytest

from ddetr.data.synthetic import make_synthetic_coco
from ddetr.train import loop
from ddetr.train.batches import DataStallError
from ddetr.train.local import LocalRuntime


class StalledValidation(LocalRuntime):
    """The real validation batches, after a wait longer than the watchdog's (a starved or stuck pipeline)."""

    def val_batches(self):
        batches = super().val_batches()

        def stalled():
            time.sleep(5)
            yield from batches

        return stalled()


@pytest.mark.slow
def test_a_stalled_validation_pipeline_ends_in_the_watchdog_error(tmp_path, hard_timeout):
    from tests.test_train_engine import tiny_config

    paths = make_synthetic_coco(str(tmp_path / "syn"), 4, 2, seed=0, image_size=(64, 96))
    cfg = tiny_config(
        paths.train_shards,
        tmp_path / "runs",
        "stalled-val",
        f"data.val={paths.val_shards}",
        "data.watchdog_s=1",
        "train.epochs=1",
        "train.max_steps_per_epoch=1",
    )
    runtime = StalledValidation(cfg, device="cpu")
    try:
        with (
            hard_timeout(60),
            pytest.raises(
                DataStallError, match=r"^validation after epoch 1: no validation batch for 1 s \(data.watchdog_s\)"
            ),
        ):
            loop.fit(cfg, runtime)
    finally:
        runtime.close()
