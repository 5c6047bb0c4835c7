"""Config files as the unit of an experiment: `ddetr config` YAML read back by `--config`, partial YAML on a preset,
the old full JSON, one-line errors naming the file and key, config.yaml and log.txt in a run folder, and the
reference page that must match the code."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ddetr import io
from ddetr.cli import main
from ddetr.config import Config, ConfigError, ModelConfig, apply_overrides, build_config, get_preset
from ddetr.config_text import config_yaml, field_meanings, reference_markdown, sections
from tests.s3_server import s3_dir, s3_server  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def printed(capsys, *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_ddetr_config_yaml_read_back_gives_the_same_config(capsys, tmp_path):
    text = printed(capsys, "config", "--preset", "two_stage", "model.num_queries=100")
    expected = apply_overrides(get_preset("two_stage"), ["model.num_queries=100"])
    assert "preset: two_stage" in text and "  num_queries: 100" in text
    saved = tmp_path / "exp.yaml"
    saved.write_text(text)
    assert build_config(config_file=str(saved), name_run=False) == expected
    # The file printed again is the same text: nothing is lost or reinterpreted on the way.
    assert printed(capsys, "config", "--config", str(saved)) == text


@pytest.mark.parametrize("preset", ["tiny", "single_scale_dc5", "deformable_detr"])
def test_every_value_survives_the_yaml(preset, tmp_path):
    """Texts YAML would read as something else ('off', 'none', '', 'true', paths) and small floats come back."""
    cfg = apply_overrides(
        get_preset(preset),
        [
            "train.amp=off",
            "train.use_gpu=true",
            "train.lr=1e-7",
            "data.train=/a b/c: d",
            "train.name=run-1",
            "model.msda_backend=reference",
            "train.storage_path=s3://bucket/runs",
        ],
    )
    saved = tmp_path / "cfg.yaml"
    saved.write_text(config_yaml(cfg))
    assert build_config(config_file=str(saved)) == cfg


def test_partial_yaml_on_its_preset_then_the_overrides(tmp_path):
    saved = tmp_path / "partial.yaml"
    saved.write_text("preset: tiny\nmodel:\n  num_queries: 12\n  dec_n_points: 2\ntrain: {lr: 1e-3, amp: 'off'}\n")
    cfg = build_config(config_file=str(saved), overrides=["model.num_queries=7", "train.epochs=3"])
    assert cfg.model.backbone == "resnet18" and cfg.model.d_model == 64  # the tiny preset underneath
    assert cfg.model.num_queries == 7 and cfg.model.dec_n_points == 2  # the command line after the file
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)  # YAML 1.1 reads 1e-3 as text: parsed
    assert (cfg.train.amp, cfg.train.epochs) == ("off", 3)
    assert cfg.train.name.startswith("tiny-")  # an unnamed run is named after the file's preset
    # Without preset: the given one (else deformable_detr) is the base; a different one is refused.
    (tmp_path / "bare.yaml").write_text("model: {num_queries: 12}\n")
    assert build_config("box_refine", config_file=str(tmp_path / "bare.yaml")).model.with_box_refine
    assert build_config(config_file=str(tmp_path / "bare.yaml")).model.backbone == "resnet50"
    with pytest.raises(ConfigError, match="names preset tiny but --preset two_stage"):
        build_config("two_stage", config_file=str(saved))


def test_the_old_full_json_and_a_sweeps_best_config_are_read(tmp_path):
    from ddetr.sweep.report import write_best_config

    cfg = apply_overrides(get_preset("box_refine"), ["model.num_queries=50", "train.epochs=3", "train.name=old"])
    (tmp_path / "old.json").write_text(cfg.to_json())
    assert build_config(config_file=str(tmp_path / "old.json")) == cfg
    rows = [{"AP": 0.3, "config": get_preset("two_stage").to_dict()}]
    best = write_best_config(rows, tmp_path / "best_config.json", name="best", storage_path=str(tmp_path))
    # A full config keeps its own keys, whatever the --preset (it only names the run when the file does not).
    assert build_config("tiny", config_file=str(tmp_path / "best_config.json")) == best


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("preset: tiny\nmodel: {num_querys: 5}\n", "unknown key model.num_querys (did you mean model.num_queries?)"),
        ("epochs: 2\n", "unknown section 'epochs' (put it under train:)"),
        ("model: {num_queries: many}\n", "model.num_queries: expected a value of type int, got 'many'"),
        ("model: {num_queries: 2.5}\n", "model.num_queries: expected a value of type int, got 2.5"),
        ("train: {amp: off}\n", "train.amp: YAML reads unquoted on/off/yes/no as booleans; quote them"),
        ("model: {two_stage: true}\n", "model.two_stage=true needs model.with_box_refine=true"),
        ("preset: three_stage\n", "unknown preset 'three_stage' (did you mean two_stage?)"),
        ("model: [1, 2]\n", "section model must be a mapping"),
        ("model:\n  num_queries: 1\n   bad: 2\n", "not valid YAML at line 3"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_and_key(text, expected, tmp_path, capsys):
    saved = tmp_path / "bad.yaml"
    saved.write_text(text)
    assert main(["config", "--config", str(saved)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: config file {saved}") or err.startswith(f"error: cannot read config file {saved}")
    assert err.count("\n") == 1 and expected in err, err


def test_the_reference_page_matches_the_code():
    """docs/config.md is generated: regenerate it with `ddetr config --reference > docs/config.md`."""
    assert (ROOT / "docs" / "config.md").read_text() == reference_markdown()


def test_every_key_has_a_meaning_and_the_meanings_come_from_the_comments():
    for name, section in sections().items():
        missing = [key for key, meaning in field_meanings(section).items() if not meaning]
        assert not missing, f"{name}: give these fields a comment in ddetr/config_sections.py: {missing}"
    model = field_meanings(ModelConfig)
    assert model["num_queries"].startswith("object queries")  # the comment beside the field
    assert model["num_classes"].startswith("Classifier outputs") and "91" in model["num_classes"]  # the lines above


@pytest.mark.slow
def test_a_run_folder_holds_config_yaml_and_log_txt(tmp_path, caplog):
    from ddetr.data.synthetic import make_synthetic_coco
    from ddetr.train import train

    shards = make_synthetic_coco(str(tmp_path / "syn"), 4, 0, seed=0, image_size=(64, 96)).train_shards
    cfg = apply_overrides(
        get_preset("tiny"),
        [
            f"data.train={shards}",
            "data.scale=0.1",
            "data.loader_workers=0",
            f"train.storage_path={tmp_path}",
            "train.name=run",
            "train.epochs=1",
            "train.max_steps_per_epoch=1",
        ],
    )
    caplog.set_level(logging.INFO)  # the console's level of `ddetr train`
    train(cfg, engine="local")
    folder = tmp_path / "run"
    assert build_config(config_file=str(folder / "config.yaml")) == cfg
    log_txt = (folder / "log.txt").read_text()
    assert "run run starts (local engine)" in log_txt and "epoch 1/1 done" in log_txt
    train(cfg, engine="local")  # continued: the log of both starts
    continued = (folder / "log.txt").read_text()
    assert continued.startswith(log_txt) and continued.count("run run starts (local engine)") == 2


def test_a_failed_run_in_a_bucket_leaves_its_log_and_traceback(s3_dir):  # noqa: F811
    from ddetr.train.run_files import run_files

    cfg = apply_overrides(Config(), [f"train.storage_path={s3_dir}", "train.name=failed"])
    with pytest.raises(RuntimeError, match="worker lost"), run_files(cfg, engine="ray") as folder:
        assert "starts (ray engine)" in io.read_text(io.join(folder, "log.txt"))  # there from the start
        logging.getLogger("ddetr.train").warning("a line of the console")
        raise RuntimeError("worker lost")
    log_txt = io.read_text(f"{s3_dir}/failed/log.txt")
    assert "a line of the console" in log_txt and "the run failed: RuntimeError: worker lost" in log_txt
    assert "Traceback" in log_txt
    assert build_config(config_file=f"{s3_dir}/failed/config.yaml") == cfg
