"""Checkpoints by name: a run folder's `best` and `latest` pointers, kept by the single-process runtime, read by
every command that takes a checkpoint (eval, predict, export, serve), on local folders and on S3 (moto's server on
loopback, `s3_server.py`); and the README's example commands, run as written on a folder laid out as `make demo`
writes it."""

from __future__ import annotations

import glob
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from ddetr import io
from ddetr.cli import main
from ddetr.config import build_config
from ddetr.data.synthetic import make_synthetic_coco
from ddetr.demo import RUN_POINTER
from ddetr.train import train
from ddetr.train.checkpoints import (
    BEST,
    CHECKPOINT_METRICS_FILE,
    LATEST,
    STATE_FILE,
    checkpoint_name,
    checkpoint_score,
    list_checkpoints,
    point_to_run,
    read_pointer,
    resolve_checkpoint,
    update_pointers,
)
from ddetr.train.logbook import read_metrics
from tests.s3_server import s3_dir, s3_server  # noqa: F401  (fixtures)

README = Path(__file__).resolve().parents[1] / "README.md"


def write_checkpoint(run: str, step: int, ap: float) -> str:
    """A checkpoint folder as the pointers read it: a state file and its metrics (the weights do not matter)."""
    folder = io.join(run, checkpoint_name(step))
    io.atomic_write(io.join(folder, STATE_FILE), b"weights")
    io.atomic_write(io.join(folder, CHECKPOINT_METRICS_FILE), json.dumps({"val/AP": ap, "step": step}))
    return folder


def checkpoint_written(run: str, step: int, ap: float) -> None:
    """What a runtime does: the checkpoint folder complete in the run folder, then the pointers updated."""
    write_checkpoint(run, step, ap)
    update_pointers(run, checkpoint_name(step), {"step": step, "val/AP": ap, "train/loss": 1.0})


def pointed(run: str, which: str) -> str:
    return read_pointer(io.join(run, which))["checkpoint"]


def delete_folder(path: str) -> None:
    fs, inner = io.resolve(path)
    fs.delete_dir(inner)


@pytest.fixture(params=["local", "s3"])
def run_root(request, tmp_path) -> str:
    return str(tmp_path) if request.param == "local" else request.getfixturevalue("s3_dir")


def test_pointers_follow_the_best_and_the_latest_checkpoint(run_root):
    run = io.join(run_root, "runs", "a")
    checkpoint_written(run, 100, 0.3)
    assert pointed(run, BEST) == pointed(run, LATEST) == checkpoint_name(100)
    checkpoint_written(run, 200, 0.5)
    checkpoint_written(run, 300, 0.4)
    checkpoint_written(run, 400, 0.5)  # a mid-epoch checkpoint carrying the last evaluation's AP: a tie keeps 200
    assert (pointed(run, BEST), pointed(run, LATEST)) == (checkpoint_name(200), checkpoint_name(400))
    assert read_pointer(io.join(run, BEST)) == {"checkpoint": checkpoint_name(200), "step": 200, "val/AP": 0.5}
    # A run folder is its best checkpoint; RUN_DIR/latest (or which="latest") its newest; RUN_DIR/best the best.
    assert resolve_checkpoint(run) == resolve_checkpoint(io.join(run, BEST)) == io.join(run, checkpoint_name(200))
    assert (
        resolve_checkpoint(io.join(run, LATEST))
        == resolve_checkpoint(run, LATEST)
        == io.join(run, "checkpoint_00000400")
    )

    # The best checkpoint pruned under its pointer: the run's checkpoints are ranked again (400 has the best AP).
    delete_folder(io.join(run, checkpoint_name(200)))
    assert resolve_checkpoint(run) == io.join(run, checkpoint_name(400))
    checkpoint_written(run, 500, 0.1)
    assert (pointed(run, BEST), pointed(run, LATEST)) == (checkpoint_name(400), checkpoint_name(500))
    # No pointers at all (a run from before them): the same answers from the checkpoints themselves.
    io.remove(io.join(run, BEST))
    io.remove(io.join(run, LATEST))
    assert resolve_checkpoint(run) == io.join(run, checkpoint_name(400))
    assert resolve_checkpoint(io.join(run, LATEST)) == io.join(run, checkpoint_name(500))
    # A checkpoint folder is itself.
    assert resolve_checkpoint(io.join(run, checkpoint_name(300)), LATEST) == io.join(run, checkpoint_name(300))

    empty = io.join(run_root, "runs", "empty")
    io.atomic_write(io.join(empty, "metrics.jsonl"), "")
    with pytest.raises(FileNotFoundError, match=f"{re.escape(empty)} holds no checkpoint"):
        resolve_checkpoint(empty)
    with pytest.raises(FileNotFoundError, match="no such file or folder: .*/runs/missing"):
        resolve_checkpoint(io.join(run_root, "runs", "missing"))


def test_a_run_without_validation_points_best_at_its_newest(tmp_path):
    run = str(tmp_path / "run")
    for step in (1, 2):
        checkpoint_written(run, step, -1.0)
    assert pointed(run, BEST) == checkpoint_name(2)
    checkpoint_written(run, 3, 0.0)  # evaluated at last: an AP of 0 still beats "not evaluated"
    checkpoint_written(run, 4, -1.0)
    assert pointed(run, BEST) == checkpoint_name(3)


def test_checkpoints_and_weights_files_are_returned_as_they_are(tmp_path):
    folder = write_checkpoint(str(tmp_path / "runs" / "a"), 7, 0.1)
    official = tmp_path / "r50_deformable_detr-checkpoint.pth"
    official.write_bytes(b"pth")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"st")
    for path in (folder, io.join(folder, STATE_FILE), str(official), str(hf)):
        assert resolve_checkpoint(path) == path
    # A `run` pointer file names a run folder (the demo's results/demo/run), relative to the pointer's folder.
    point_to_run(tmp_path / RUN_POINTER, tmp_path / "runs" / "a")
    assert json.loads((tmp_path / RUN_POINTER).read_text()) == {"run": "runs/a"}
    assert resolve_checkpoint(tmp_path / RUN_POINTER) == folder
    assert resolve_checkpoint(tmp_path / RUN_POINTER / LATEST) == folder


# ---- a trained run, laid out as `make demo` lays out results/demo ----------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: tiny models on a shared 2-core machine run several times slower with a second one
    competing (measured: an ONNX export 18 s against 4 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> Path:
    """`results/demo` under a fresh folder: synthetic data, a 2-epoch run of the single-process runtime keeping 1
    checkpoint by AP (plus the latest and the best), and the `run` pointer the demo writes."""
    root = tmp_path_factory.mktemp("cwd")
    out = root / "results" / "demo"
    make_synthetic_coco(str(out / "synthetic"), 8, 4, seed=0, image_size=(64, 96))
    overrides = ["data.scale=0.1", "data.loader_workers=0", "train.epochs=2", "train.batch_size=2",
                 "train.keep_checkpoints=1", f"train.storage_path={out / 'runs'}", "train.name=demo-test",
                 "train.log_every=1000"]  # fmt: skip
    train(build_config("tiny", str(out / "synthetic"), overrides), engine="local")
    point_to_run(out / RUN_POINTER, out / "runs" / "demo-test")
    return root


@pytest.mark.slow
def test_a_local_run_keeps_its_best_and_latest_pointers(demo_folder):
    run = str(demo_folder / "results" / "demo" / "runs" / "demo-test")
    epochs = [r for r in read_metrics(run) if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    checkpoints = list_checkpoints(run)
    assert checkpoints[-1].name == checkpoint_name(epochs[-1]["step"]) == pointed(run, LATEST)
    # Best: the first epoch of the highest val/AP, from the logbook (which outlives pruned checkpoints).
    top = max(r["val/AP"] for r in epochs)
    first_top = next(r for r in epochs if r["val/AP"] == top)
    assert pointed(run, BEST) == checkpoint_name(first_top["step"])
    assert checkpoint_score(Path(run, pointed(run, BEST))) == top
    # keep_checkpoints=1 keeps the best by (AP, newest) and the latest; the pointed-at best is never pruned.
    assert {p.name for p in checkpoints} >= {pointed(run, BEST), pointed(run, LATEST)}


@pytest.mark.slow
def test_commands_take_a_run_folder_and_its_latest(demo_folder, monkeypatch, capsys):
    monkeypatch.chdir(demo_folder)
    run = "results/demo/runs/demo-test"
    best, latest = pointed(run, BEST), pointed(run, LATEST)
    assert main(["export", "--format", "hf", f"{run}/latest", "hf-latest"]) == 0
    assert f"exported {run}/{latest} as a Hugging Face model folder" in capsys.readouterr().out
    assert main(["export", "--format", "onnx", run, "best.onnx"]) == 0
    assert f"exported {run}/{best} as ONNX: best.onnx" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", run, "--data", "results/demo/synthetic"]) == 0
    assert "AP50" in json.loads(capsys.readouterr().out)
    images = ["results/demo/synthetic/images/val/00000001.jpg"]
    assert main(["predict", "--checkpoint", f"{run}/latest", "--out", "preds", *images]) == 0
    assert len(json.loads(Path("preds/detections.json").read_text())) > 0

    from ddetr.deploy.serve import ServeSettings, resolved

    served = resolved(ServeSettings(checkpoint="results/demo/run")).checkpoint
    assert served == str(demo_folder / run / best)  # absolute: replicas run in folders of their own


def readme_commands() -> list[str]:
    """The README's `ddetr` example lines that read the demo's results, comments cut."""
    lines = [line.split("  #")[0].strip() for line in README.read_text().splitlines()]
    return [line for line in lines if line.startswith("ddetr ") and "results/demo/run" in line]


@pytest.mark.slow
def test_the_readme_examples_run_as_written_on_the_demo_results(demo_folder, monkeypatch, capsys):
    commands = readme_commands()
    assert len(commands) >= 6, commands  # export x2, predict x2, eval x2, serve
    monkeypatch.chdir(demo_folder)
    for command in commands:
        argv = [expanded for arg in shlex.split(command)[1:] for expanded in (sorted(glob.glob(arg)) or [arg])]
        paths = [a for a in argv if a.startswith("results/")]
        assert all(io.exists(p) or p.endswith("/latest") for p in paths), command
        if "--shards" in argv or argv[0] == "serve":  # Ray Data and Ray Serve: their tests are test_serve/test_s3_ray
            checkpoint = argv[argv.index("--checkpoint") + 1]
            assert Path(resolve_checkpoint(checkpoint)).parent.name == "demo-test", command
            continue
        assert main(argv) == 0, command
    capsys.readouterr()


@pytest.mark.parametrize("command", ["eval", "predict", "export", "serve", "predict-shards"])
def test_a_run_folder_without_checkpoints_is_one_line(command, tmp_path, capsys):
    import ray

    ray_before = ray.is_initialized()
    run = tmp_path / "runs" / "nothing-yet"
    run.mkdir(parents=True)
    argv = {
        "eval": ["eval", "--checkpoint", str(run), "--data", str(tmp_path)],
        "predict": ["predict", "--checkpoint", str(run), "--out", str(tmp_path / "p"), "a.jpg"],
        "export": ["export", "--format", "onnx", str(run), str(tmp_path / "d.onnx")],
        "serve": ["serve", "--checkpoint", str(run)],
        "predict-shards": ["predict", "--checkpoint", str(run), "--shards", str(tmp_path), "--out", str(tmp_path)],
    }[command]
    if command == "eval":
        make_synthetic_coco(str(tmp_path), 1, 1, seed=0, image_size=(32, 32))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run} holds no checkpoint") and err.count("\n") == 1, err
    assert ray.is_initialized() == ray_before  # refused before any Ray started
