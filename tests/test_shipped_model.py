"""One model validated, ranked and shipped: with the EMA on, validation, checkpoint ranking and `ddetr eval` all
use the EMA weights, and the raw weights' AP is logged beside them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ddetr.config import build_config
from ddetr.data.synthetic import make_synthetic_coco
from ddetr.train.checkpoints import checkpoint_score, find_checkpoint, list_checkpoints
from ddetr.train.logbook import read_metrics


@pytest.mark.slow
def test_the_ema_is_what_is_validated_ranked_and_evaluated(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from ddetr.cli import main
    from ddetr.train import train

    # One object an image and 4 epochs: enough for both models to find some objects (an AP of 0 would tell nothing).
    data = make_synthetic_coco(str(tmp_path / "d"), 16, 6, seed=0, image_size=(64, 96), max_objects=1)
    overrides = ["data.scale=0.1", "data.loader_workers=0", "train.epochs=4", "train.ema_decay=0.9",
                 "train.ema_warmup_steps=1", "train.lr=1e-3", f"train.storage_path={tmp_path}", "train.name=ema",
                 "train.keep_checkpoints=1"]  # fmt: skip
    cfg = build_config("tiny", data.root, overrides)
    metrics = train(cfg, engine="local")
    assert {"val/AP", "val_raw/AP"} <= set(metrics)
    epochs = [r for r in read_metrics(tmp_path / "ema") if r["kind"] == "epoch"]
    assert len(epochs) == 4 and all("val_raw/AP" in r for r in epochs)
    # The raw weights and their average are different models, and the metrics tell them apart.
    assert epochs[-1]["val/AP"] > 0 and epochs[-1]["val/AP"] != epochs[-1]["val_raw/AP"]

    run = tmp_path / "ema"
    best = find_checkpoint(str(run))
    assert best is not None
    assert checkpoint_score(best) == max(r["val/AP"] for r in epochs) > 0  # ranked by the EMA's AP
    assert checkpoint_score(best) == max(checkpoint_score(p) for p in list_checkpoints(run))
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--data", data.root, "--batch-size", str(cfg.train.batch_size)]) == 0
    out = capsys.readouterr().out
    evaluated = json.loads(out[out.index("{") :])
    assert evaluated["AP"] == pytest.approx(checkpoint_score(best), abs=1e-9)
