"""Jobs and sweeps for real runs: `ddetr submit train --config FILE` (a sweep's best_config.json) and `--resume`, a
local config or space carried inside the job's entrypoint, and `ddetr tune`'s paper-scale default space shipped in
the package."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from ddetr import cli, jobs
from ddetr.config import apply_overrides, get_preset
from ddetr.job_entrypoints import shown, train_entrypoint, tune_entrypoint
from ddetr.sweep.options import to_argv
from ddetr.sweep.space import load_space, packaged_space, param_space, trial_config

ROOT = Path(__file__).resolve().parents[1]
DDETR = f"{shlex.quote(sys.executable)} -m ddetr.cli"
UNREACHABLE = "http://127.0.0.1:9"  # nothing answers: a command that connected would say "Cannot reach"


def best_config(folder: Path) -> Path:
    """A full JSON config as a sweep writes it (best_config.json), in a folder whose name needs quoting."""
    path = folder / "sweep 1" / "best_config.json"
    path.parent.mkdir(parents=True)
    cfg = apply_overrides(get_preset("tiny"), ["model.num_queries=17", "loss.focal_alpha=0.31", "train.name=best"])
    path.write_text(cfg.to_json())
    return path


def test_a_local_config_travels_inside_the_train_entrypoint(tmp_path: Path) -> None:
    best = best_config(tmp_path)
    entrypoint = train_entrypoint(None, None, ["train.epochs=3"], config=str(best))
    assert entrypoint.startswith("f1=$(mktemp -d) && printf '%s' ")
    assert entrypoint.endswith(' && ddetr train --config "$f1"/best_config.json train.epochs=3')
    assert shown(entrypoint) == 'ddetr train --config "$f1"/best_config.json train.epochs=3'
    # What the node resolves: `ddetr config` takes the arguments of `ddetr train` and prints the config they make.
    here = subprocess.run([*shlex.split(DDETR), "config", "--config", str(best), "train.epochs=3"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    best.unlink()  # the job has the text, not the path
    on_node = entrypoint.replace("ddetr train", f"{DDETR} config")
    done = subprocess.run(["/bin/sh", "-c", on_node], cwd="/", capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == here and "num_queries: 17" in here and "focal_alpha: 0.31" in here


def test_submit_train_takes_a_config_or_a_preset_and_a_resume_checkpoint(tmp_path: Path, capsys) -> None:
    best = best_config(tmp_path)
    argv = ["train", "--config", str(best), "--resume", "s3://b/runs/best/latest", "--storage", "s3://b/runs",
            "train.epochs=50"]  # fmt: skip
    entrypoint = jobs.entrypoint_for(jobs.build_parser().parse_args(argv))
    assert entrypoint.endswith(
        ' && ddetr train --config "$f1"/best_config.json --resume s3://b/runs/best/latest '
        "train.storage_path=s3://b/runs train.epochs=50"
    )
    args = jobs.build_parser().parse_args(["train", "--preset", "tiny", "--config", "s3://b/exp.yaml", "--data", "d"])
    assert (
        jobs.entrypoint_for(args) == "ddetr train --preset tiny --config s3://b/exp.yaml --data d"
    )  # URIs as they are

    # Mistakes are told in one line, before any cluster is contacted.
    for argv, message in [
        (["train", "--data", "s3://b/coco"], "give --preset NAME or --config FILE"),
        (["train", "--preset", "tiny"], "give --data"),
        (["train", "--config", str(tmp_path / "nope.yaml")], f"--config {tmp_path / 'nope.yaml'}: no such file"),
    ]:
        assert jobs.main(["--address", UNREACHABLE, *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ddetr submit train: ") and message in err[0], err


def test_submit_tune_carries_a_local_space_and_else_uses_the_clusters_packaged_one(tmp_path: Path) -> None:
    parser = jobs.build_parser()
    args = parser.parse_args(["tune", "--data", "s3://b/coco", "train.epochs=12"])
    assert args.preset == "deformable_detr" and args.space is None
    assert jobs.entrypoint_for(args) == (
        "ddetr tune --preset deformable_detr --data s3://b/coco --samples 8 --max-concurrent 0 --storage runs/tune "
        "--grace-period 1 --reduction-factor 2 --seed 0 train.epochs=12"
    )
    space = tmp_path / "my space.yaml"
    space.write_text("loss.focal_alpha: {uniform: [0.2, 0.3]}  # it's mine\n")
    args = parser.parse_args(["tune", "--preset", "box_refine", "--data", "s3://b/coco", "--space", str(space)])
    entrypoint = tune_entrypoint(to_argv(args))
    assert " --space \"$f1\"/'my space.yaml'" in entrypoint  # its stem names the sweep on the cluster as here
    prelude = entrypoint.rsplit(" && ", 1)[0]
    shipped = subprocess.run(["/bin/sh", "-c", prelude + " && cat \"$f1\"/'my space.yaml'"], capture_output=True)
    assert shipped.returncode == 0 and shipped.stdout == space.read_bytes()


def test_tune_defaults_to_deformable_detr_and_the_packaged_paper_scale_space() -> None:
    args = cli.build_parser().parse_args(["tune", "--data", "data/coco"])
    assert args.preset == "deformable_detr" and args.space is None
    import ddetr

    path = packaged_space()
    assert path == Path(ddetr.__file__).parent / "sweep" / "spaces" / "default.yaml"
    assert (ROOT / "tune" / "spaces" / "default.yaml").resolve() == path.resolve()  # the checkout's pointer to it
    space = load_space()
    assert space == load_space(path)
    assert space["model.num_queries"] == {"choice": [100, 300]}
    assert space["refinement"] == {"choice": ["none", "box_refine", "two_stage"]}
    assert {"loss.cls_loss_coef", "loss.focal_alpha", "train.lr"} <= set(space)
    params = param_space(get_preset("deformable_detr"), space)
    sampled = {**params, "refinement": "two_stage"}
    sampled["model"] = {**params["model"], "num_queries": 300}
    sampled["loss"] = {**params["loss"], "cls_loss_coef": 2.0, "focal_alpha": 0.25}
    sampled["train"] = {**params["train"], "lr": 2e-4}
    cfg = trial_config(sampled)
    assert cfg.model.two_stage and cfg.model.with_box_refine and cfg.model.num_queries == 300
    with pytest.raises(FileNotFoundError, match="no packaged search space 'paper'.*there are: default"):
        packaged_space("paper")


@pytest.mark.slow
def test_the_wheel_ships_the_default_space(tmp_path: Path) -> None:
    """Built from a copy of the project and installed into a fresh environment, ddetr loads its default space from
    the install (importlib.resources), not from this checkout."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        (project / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run(["cp", "-r", str(ROOT / "ddetr"), str(ROOT / "csrc"), str(project)], check=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"),
                    str(project)], check=True, capture_output=True, cwd=tmp_path)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("ddetr-*.whl")
    assert "ddetr/sweep/spaces/default.yaml" in zipfile.ZipFile(wheel).namelist()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    # .venv's packages (ray, torch) through a path line; its editable ddetr stays out (its .pth is not processed).
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], check=True)
    check = (
        "from ddetr.sweep.space import load_space, packaged_space; print(packaged_space()); print(sorted(load_space()))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([python, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    path, keys = done.stdout.splitlines()
    assert Path(path).is_relative_to(venv) and path.endswith("ddetr/sweep/spaces/default.yaml")
    assert "model.num_queries" in keys and "refinement" in keys
