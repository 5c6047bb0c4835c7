"""Mistakes found on the driver before any worker starts (`ddetr.train.preflight`): `ddetr train` prints one line
and exits 2 within seconds, with no Ray started, for either engine; a reused run name in a bucket (moto's S3
server on loopback) is refused as a local one is."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ddetr import io
from ddetr.cli import main
from ddetr.config import apply_overrides, get_preset
from ddetr.data.synthetic import make_synthetic_coco
from ddetr.models import build_detector
from ddetr.train.checkpoints import checkpoint_name, save_checkpoint, update_pointers
from tests.s3_server import s3_dir, s3_server  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("syn")
    make_synthetic_coco(str(root), 4, 2, seed=0, image_size=(32, 32))
    return str(root)


@pytest.fixture(scope="module")
def two_stage_checkpoint(tmp_path_factory) -> Path:
    """A ddetr checkpoint folder (state.pt, config.json, manifest) of the tiny preset made two-stage."""
    cfg = apply_overrides(get_preset("tiny"), ["model.with_box_refine=true", "model.two_stage=true"])
    folder = tmp_path_factory.mktemp("two-stage") / checkpoint_name(10)
    model = build_detector(cfg.model, load_backbone_weights=False)
    save_checkpoint(folder, {"model": model.state_dict(), "config": cfg.to_dict()}, {"val/AP": 0.2})
    return folder


def train_fails(argv: list[str], capsys) -> str:
    """Run `ddetr train ...`; assert exit 2 within 30 s, no Ray started by it, and one line; return that line."""
    import ray

    ray_before = ray.is_initialized()
    start = time.monotonic()
    status = main(["train", *argv])
    seconds = time.monotonic() - start
    err = capsys.readouterr().err
    assert status == 2, err
    assert seconds < 30, f"took {seconds:.0f} s"
    assert ray.is_initialized() == ray_before, "Ray was started"
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.removeprefix("error: ").strip()


@pytest.mark.parametrize("engine", ["ray", "local"])
def test_init_from_another_variant_is_one_line_naming_what_differs(engine, data, two_stage_checkpoint, tmp_path,
                                                                  capsys):  # fmt: skip
    argv = ["--preset", "deformable_detr", "--data", data, "--engine", engine, f"train.storage_path={tmp_path}",
            f"model.init_from={two_stage_checkpoint}"]  # fmt: skip
    line = train_fails(argv, capsys)
    assert line.startswith(f"model.init_from={two_stage_checkpoint} is a backbone=resnet18, ")
    assert "with_box_refine=True, two_stage=True model; this config has backbone=resnet50, " in line
    assert "with_box_refine=False, two_stage=False:" in line
    assert not any(tmp_path.iterdir()), "nothing is written before the checks pass"


def test_init_from_that_is_missing_or_unreadable(data, tmp_path, capsys):
    argv = ["--preset", "tiny", "--data", data, f"train.storage_path={tmp_path}"]
    line = train_fails([*argv, f"model.init_from={tmp_path / 'nope.pth'}"], capsys)
    assert line == f"model.init_from={tmp_path / 'nope.pth'}: no such file or folder"
    cut = tmp_path / "cut.pth"
    cut.write_bytes(b"PK\x03\x04 not a whole file")
    assert train_fails([*argv, f"model.init_from={cut}"], capsys).startswith(f"model.init_from={cut} cannot be read")


def test_a_missing_or_other_resume_is_one_line(data, two_stage_checkpoint, tmp_path, capsys):
    argv = ["--preset", "tiny", "--data", data, f"train.storage_path={tmp_path / 'runs'}"]
    missing = tmp_path / "runs" / "gone" / checkpoint_name(4)
    line = train_fails([*argv, "--resume", str(missing)], capsys)
    assert line == f"--resume: no such file or folder: {missing}"
    (tmp_path / "empty-run").mkdir()
    assert "holds no checkpoint" in train_fails([*argv, "--resume", str(tmp_path / "empty-run")], capsys)
    line = train_fails([*argv, "--resume", str(two_stage_checkpoint)], capsys)
    assert line.startswith(
        f"--resume {two_stage_checkpoint} holds a with_box_refine=True, two_stage=True, "
        "num_classes=91 model; this config has with_box_refine=False, two_stage=False, num_classes=5:"
    )
    # A checkpoint cut short (a copy interrupted) is found by its manifest.
    cut = tmp_path / "cut"
    cut.mkdir()
    for f in two_stage_checkpoint.iterdir():
        (cut / f.name).write_bytes(f.read_bytes()[:100] if f.name == "state.pt" else f.read_bytes())
    assert "is incomplete" in train_fails([*argv, "--resume", str(cut)], capsys)


def test_missing_data_and_backbone_weights_are_one_line(data, tmp_path, capsys):
    argv = ["--preset", "tiny", "--data", data, f"train.storage_path={tmp_path}"]
    line = train_fails([*argv, "data.val=/no/such/shards/val"], capsys)
    assert line.startswith("data.val=/no/such/shards/val: no such folder")
    line = train_fails([*argv, "model.pretrained_backbone=/no/such/resnet18.pth"], capsys)
    assert line.startswith("model.pretrained_backbone=/no/such/resnet18.pth: no such file")
    line = train_fails([*argv, "model.pretrained_backbone=http://127.0.0.1:9/resnet18-f37072fd.pth"], capsys)
    assert "only https:// URLs are fetched" in line  # before any worker, and before any request
    assert train_fails(["--preset", "tiny"], capsys).startswith("no training data")


def test_a_reused_run_name_in_a_bucket_with_another_model_is_refused(data, s3_dir, capsys):  # noqa: F811
    """The run folder holds a checkpoint of the tiny preset with 10 queries; training 30 in it is refused."""
    run = f"{s3_dir}/runs/reused"
    other = apply_overrides(get_preset("tiny"), ["model.num_queries=10"])
    checkpoint = io.join(run, checkpoint_name(4))
    io.atomic_write(io.join(checkpoint, "state.pt"), b"weights")  # the check reads config.json only
    io.atomic_write(io.join(checkpoint, "config.json"), other.to_json())
    update_pointers(run, checkpoint_name(4), {"step": 4, "val/AP": 0.1})
    line = train_fails(["--preset", "tiny", "--data", data, f"train.storage_path={s3_dir}/runs", "train.name=reused"],
                       capsys)  # fmt: skip
    assert line.startswith(f"run {run} holds checkpoints of another model (") and "model.num_queries 10 -> 30" in line


def test_continuing_with_another_number_of_learned_one_to_many_queries_is_refused(s3_dir):  # noqa: F811
    """Hybrid matching's learned queries are part of the training state (single-stage): their number must match;
    two-stage proposals playing them hold no parameters, so their number may change."""
    from ddetr.config import ConfigError
    from ddetr.train.preflight import check_continuation

    def saved_run(name: str, overrides: list[str]) -> None:
        run = f"{s3_dir}/runs/{name}"
        cfg = apply_overrides(get_preset("tiny"), overrides)
        checkpoint = io.join(run, checkpoint_name(4))
        io.atomic_write(io.join(checkpoint, "state.pt"), b"weights")  # the check reads config.json only
        io.atomic_write(io.join(checkpoint, "config.json"), cfg.to_json())
        update_pointers(run, checkpoint_name(4), {"step": 4, "val/AP": 0.1})

    base = [f"train.storage_path={s3_dir}/runs", "model.with_box_refine=true"]
    saved_run("single", ["model.with_box_refine=true", "loss.one_to_many_queries=20"])
    with pytest.raises(ConfigError, match=r"another model \(loss.one_to_many_queries 20 -> 0\)"):
        check_continuation(apply_overrides(get_preset("tiny"), [*base, "train.name=single"]))
    saved_run("two", ["model.with_box_refine=true", "model.two_stage=true", "loss.one_to_many_queries=20"])
    cfg = apply_overrides(get_preset("tiny"), [*base, "model.two_stage=true", "train.name=two"])
    assert check_continuation(cfg).endswith(checkpoint_name(4))
