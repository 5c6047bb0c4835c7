"""Training where pycocotools is not installed (the lent GPU machine): the engine and the benchmarks import, a run
without evaluation trains, and a run that would evaluate is refused before it starts, in one line.

Each test runs a fresh interpreter in which `import pycocotools` fails as it does where the package is missing
(a `sys.meta_path` finder, installed before anything else is imported).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddetr.data.synthetic import make_synthetic_coco

ROOT = Path(__file__).resolve().parents[1]
NO_PYCOCOTOOLS = """
import sys


class NoPycocotools:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "pycocotools":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoPycocotools())
"""
CLI = """
from ddetr.cli import main

sys.exit(main(sys.argv[1:]))
"""


def run_without_pycocotools(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", NO_PYCOCOTOOLS + code, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """4 training and 2 validation images of 32 x 48 pixels, as shards (`shards/train`, `shards/val`)."""
    root = tmp_path_factory.mktemp("syn")
    return make_synthetic_coco(str(root), 4, 2, seed=0, image_size=(32, 48)).root + "/shards"


def train_args(data: str, storage: Path, *overrides: str) -> list[str]:
    return [
        "train", "--preset", "tiny", "--data", data, "--engine", "local",
        "train.epochs=1", "train.max_steps_per_epoch=2", "train.log_every=1000", f"train.storage_path={storage}",
        "train.name=nococo", "data.scale=0.1", "data.loader_workers=0", *overrides,
    ]  # fmt: skip


def test_engine_imports_and_evaluation_is_refused_before_the_run(data, tmp_path):
    """The modules of the local engine, the command line and benchmarks/train_step.py import; a run with a
    validation split (which would be evaluated) ends in one line and exit 2 before its run folder exists."""
    code = f"""
import importlib.util

try:
    import pycocotools.coco
except ImportError:
    pass
else:
    raise SystemExit("the finder did not block pycocotools")
import ddetr.cli, ddetr.data.confusion, ddetr.train.local, ddetr.train.plots, ddetr.train.results

spec = importlib.util.spec_from_file_location("train_step", {str(ROOT / "benchmarks" / "train_step.py")!r})
spec.loader.exec_module(importlib.util.module_from_spec(spec))
print("imported", file=sys.stderr)
{CLI}"""
    storage = tmp_path / "runs"
    done = run_without_pycocotools(code, *train_args(data, storage))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[0] == "imported", done.stderr
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == [lines[-1]], done.stderr
    assert errors[0].startswith("error: evaluation needs pycocotools: pip install pycocotools"), errors
    assert f"data.val={data}/val" in errors[0] and "data.val= trains without evaluation" in errors[0]
    assert not storage.exists()  # refused before anything was written


@pytest.mark.slow
def test_a_run_without_evaluation_trains(data, tmp_path):
    """`data.val=` (no validation split): two steps of the tiny model train, and the run ends with a checkpoint."""
    storage = tmp_path / "runs"
    done = run_without_pycocotools(CLI, *train_args(data, storage, "data.val="))
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)
    assert metrics["step"] == 2 and metrics["epoch"] == 1 and metrics["train/loss"] > 0
    assert "val/AP50" not in metrics  # nothing was evaluated
    assert list((storage / "nococo").glob("checkpoint_*")), sorted(p.name for p in (storage / "nococo").iterdir())


@pytest.mark.slow
@pytest.mark.ray
def test_ray_workers_without_pycocotools_end_the_run_in_one_line_without_retrying(data, tmp_path, ray_local):
    """The driver has pycocotools, its Ray workers do not (a worker node on another image): every worker refuses at
    its start, the run ends with exit 2 and one line, and no attempt is retried (a restart would meet it again).

    The driver joins the session's Ray as a job of its own, whose worker processes import the blocker at their
    start. The job passes RAY_ADDRESS on (as a sweep's driver does, `ray_session.join(pass_address=True)`): Ray
    Train's placement-group cleaner asks "the" Ray's State API, and on a machine running two Rays (CI's suite,
    another test's cluster) it printed a traceback when it could not tell which."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_PYCOCOTOOLS)  # Python imports it at every worker's start
    address = ray_local.get_runtime_context().gcs_address
    worker_env = {"PYTHONPATH": f"{blocker}:{ROOT}", "OMP_NUM_THREADS": "1", "RAY_ADDRESS": address}
    code = f"""
import sys

import ray

import pycocotools.coco  # the driver has it
ray.init(address={address!r}, log_to_driver=True, runtime_env={{"env_vars": {worker_env!r}}})
{CLI}"""
    storage = tmp_path / "runs"
    args = [*train_args(data, storage), "train.num_workers=1", "train.max_failures=3"]
    args[args.index("local")] = "ray"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    out = done.stderr + done.stdout
    assert done.returncode == 2, out
    assert "Traceback" not in out, out
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "evaluation needs pycocotools: pip install pycocotools" in errors[0], out
