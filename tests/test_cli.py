"""The command line as a user meets it: a mistake is one line naming what was wrong, with exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ddetr.cli import main
from ddetr.data.synthetic import make_synthetic_coco


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("syn")
    make_synthetic_coco(str(root), 4, 2, seed=0, image_size=(32, 32))
    return str(root)


def test_a_misspelt_override_is_one_line_with_the_suggestion(data):
    """In a fresh process, as a user runs it: no traceback, the key and the closest real one, exit 2."""
    cmd = [sys.executable, "-m", "ddetr.cli", "train", "--preset", "tiny", "--data", data, "model.num_querys=5"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[0].startswith("error: "), done.stderr
    assert "model.num_querys" in lines[0] and "did you mean model.num_queries?" in lines[0]
    assert "Traceback" not in done.stderr + done.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "--preset", "two_stag"], "did you mean two_stage?"),
        (["train", "--preset", "tiny", "modle.num_queries=5"], "did you mean model?"),
        (["train", "--preset", "tiny", "train.epochs=many"], "expected a value of type int"),
        (["train", "--preset", "tiny", "model.two_stage=true"], "needs model.with_box_refine=true"),
        (["train", "--preset", "tiny", "--data", "/no/such/folder"], "no shard folders train/ or val/"),
        (["train", "--preset", "tiny", "--config", "/no/such/file.json"], "cannot read config file"),
        (["eval", "--checkpoint", "/no/such/checkpoint", "--data", "DATA"], "/no/such/checkpoint"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(args, expected, data, capsys):
    args = [data if a == "DATA" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err


def test_debug_shows_the_traceback(data):
    from ddetr.config import ConfigError

    with pytest.raises(ConfigError, match="model.num_querys"):
        main(["--debug", "train", "--preset", "tiny", "--data", data, "model.num_querys=5"])


def test_demo_trains_its_recipe(data, tmp_path):
    from ddetr.demo import DEMO_EPOCHS, demo_config

    cfg = demo_config(tmp_path, Path(data), DEMO_EPOCHS, [])
    assert (cfg.train.epochs, cfg.train.lr_drop) == (DEMO_EPOCHS, DEMO_EPOCHS - 1)
    assert cfg.model.two_stage and cfg.model.proposal_nms == 0.5 and cfg.model.num_queries == 10
    assert (cfg.data.crop_p, cfg.data.multi_scale, cfg.model.backbone_norm) == (0.0, False, "group_norm")
    assert demo_config(tmp_path, Path(data), 4, ["model.num_queries=5"]).model.num_queries == 5  # overrides win
