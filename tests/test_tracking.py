"""Experiment tracking: a tiny training tracked in an MLflow file store, read back through MLflow's own client; a
run folder continues its tracked run; W&B in offline mode, read back from the run's own record file."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch

from ddetr.cli import main
from ddetr.config import Config, ConfigError, apply_overrides, get_preset
from ddetr.data.synthetic import make_synthetic_coco
from ddetr.train import loop
from ddetr.train.checkpoints import checkpoint_name
from ddetr.train.local import LocalRuntime
from ddetr.train.tracking import TRACKING_FILE, start_tracker

mlflow = pytest.importorskip("mlflow")


@pytest.fixture
def file_store(tmp_path, monkeypatch) -> str:
    # The tracker allows MLflow's file store itself (MLflow 3 refuses it by default): start without the variable,
    # and have it removed again afterwards (setenv first, so that monkeypatch restores the variable's absence).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    return f"file://{tmp_path}/mlruns"


def tracked(tmp_path: Path, tracker: str, uri: str, *overrides: str) -> Config:
    return apply_overrides(get_preset("tiny"), [f"train.storage_path={tmp_path}/runs", "train.name=tracked",
                           f"train.tracker={tracker}", f"train.tracker_uri={uri}", *overrides])  # fmt: skip


@pytest.mark.slow
def test_mlflow_file_store_holds_the_runs_params_metrics_and_pictures(tmp_path, file_store):
    synth = make_synthetic_coco(str(tmp_path / "syn"), 4, 3, seed=1, image_size=(64, 96))
    cfg = tracked(tmp_path, "mlflow", file_store, f"data.train={synth.train_shards}", f"data.val={synth.val_shards}",
                  "data.scale=0.1", "data.loader_workers=0", "train.epochs=1", "train.log_every=1000",
                  "train.draw_images=1")  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runtime = LocalRuntime(cfg, device="cpu")
    try:
        loop.fit(cfg, runtime)
    finally:
        runtime.close()
        torch.set_num_threads(threads)

    client = mlflow.MlflowClient(file_store)
    experiment = client.get_experiment_by_name("ddetr")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.num_queries"] == str(cfg.model.num_queries) and params["train.tracker"] == "mlflow"
    assert params["data.val"] == synth.val_shards
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]  # 4 images, batch 2
    (ap,) = client.get_metric_history(run.info.run_id, "val/AP")
    assert ap.step == 2 and 0.0 <= ap.value <= 1.0
    assert {"per_class/AP/rectangle", "per_class/AP50/diamond"} <= set(run.data.metrics)
    run_dir = tmp_path / "runs" / "tracked"
    assert run.data.tags["best_checkpoint"] == str(run_dir / checkpoint_name(2))
    assert (run_dir / checkpoint_name(2)).is_dir()
    pictures = {f.path for f in client.list_artifacts(run.info.run_id, "evaluation")}
    assert pictures == {"evaluation/pr_curves.png", "evaluation/confusion_matrix.png", "evaluation/per_class.md"}
    assert len(client.list_artifacts(run.info.run_id, "images/epoch_001")) == 1
    assert json.loads((run_dir / TRACKING_FILE).read_text())["run_id"] == run.info.run_id


def test_a_run_folder_continues_its_tracked_run(tmp_path, file_store):
    cfg = tracked(tmp_path, "mlflow", file_store)
    run_dir = str(tmp_path / "runs" / "tracked")
    Path(run_dir).mkdir(parents=True)
    first = start_tracker(cfg, run_dir)
    first.log_metrics({"loss": 2.0, "note": "text is left out"}, step=1)
    first.close(finished=False)
    again = start_tracker(cfg, run_dir)  # a restarted worker, or `ddetr train` with the same name
    again.log_metrics({"loss": 1.0}, step=2)
    again.close(finished=True)
    client = mlflow.MlflowClient(file_store)
    assert again.run_id == first.run_id
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "loss")] == [(1, 2.0), (2, 1.0)]
    assert client.get_run(first.run_id).info.status == "FINISHED"
    # Another tracking URI is another store: a new run there.
    elsewhere = start_tracker(apply_overrides(cfg, [f"train.tracker_uri={file_store}2"]), run_dir)
    elsewhere.close(finished=True)
    assert elsewhere.run_id != first.run_id


def test_tracker_mistakes_are_one_line_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="train.tracker=mlflow needs train.tracker_uri"):
        start_tracker(tracked(tmp_path, "mlflow", ""), str(tmp_path))
    with pytest.raises(ConfigError, match="train.tracker_uri=ftp://x: for W&B"):
        start_tracker(tracked(tmp_path, "wandb", "ftp://x"), str(tmp_path))
    assert main(["config", "--preset", "tiny", "train.tracker=tensorboard"]) == 2
    assert capsys.readouterr().err.strip() == ("error: train.tracker must be none, mlflow or wandb, got 'tensorboard'")


def wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B run file: a 7-byte header (":W&B", magic, version), then LevelDB's log format: 32 KiB
    blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"[: len(data)]
    records, partial, at, block = [], b"", 7, 32 * 1024
    while at + 7 <= len(data):
        if block - at % block < 7:  # a block's tail too short for a header is padding
            at += block - at % block
            continue
        _, length, kind = struct.unpack("<IHB", data[at : at + 7])
        if at + 7 + length > len(data):  # a chunk still being written
            break
        partial += data[at + 7 : at + 7 + length]
        at += 7 + length
        if kind in (1, 4):
            records.append(partial)
            partial = b""
    return records


def test_wandb_offline_run_holds_the_config_metrics_and_best_checkpoint(tmp_path):
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2

    cfg = tracked(tmp_path, "wandb", "offline")
    run_dir = tmp_path / "runs" / "tracked"
    run_dir.mkdir(parents=True)
    tracker = start_tracker(cfg, str(run_dir))
    tracker.log_metrics({"loss": 2.5, "lr": 1e-4}, step=1)
    tracker.log_metrics({"val/AP": 0.25, "epoch": 1}, step=2)
    tracker.set_best(str(run_dir / checkpoint_name(2)))
    tracker.close(finished=True)

    (record_file,) = run_dir.glob(f"wandb/offline-run-*-{tracker.run_id}/run-{tracker.run_id}.wandb")
    # W&B's service writes the file behind finish() (on a loaded machine it was once read without its run record):
    # read it once it holds the run's exit record.
    deadline = time.monotonic() + 60
    while True:
        records = []
        for raw in wandb_records(record_file):
            records.append(wandb_internal_pb2.Record())
            records[-1].ParseFromString(raw)
        kinds = [r.WhichOneof("record_type") for r in records]
        if "exit" in kinds:
            break
        assert time.monotonic() < deadline, f"no exit record in {record_file} after 60 s, only {kinds}"
        time.sleep(0.2)
    history, config, summary, names = {}, {}, {}, []
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            names.append((record.run.project, record.run.display_name))
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history[items["_step"]] = items
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
    assert names and names[0] == ("ddetr", "tracked"), kinds
    assert history[1]["loss"] == 2.5 and history[2]["val/AP"] == 0.25
    assert config["model"]["num_queries"] == cfg.model.num_queries and config["train"]["tracker"] == "wandb"
    assert summary["best_checkpoint"] == str(run_dir / checkpoint_name(2))
