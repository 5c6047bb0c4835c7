"""Typed configuration: dataclasses with the official defaults, the paper's presets, flat overrides, config files.

The public face of the configuration; each concept lives in its own module and every name is re-exported here:

    config_sections   ModelConfig, LossConfig, DataConfig, TrainConfig, Config; ConfigError, UnknownNameError
    config_presets    the paper's variants and `tiny` (PRESETS, get_preset); run names (named, run_time)
    config_parse      flat `section.field=value` overrides and config files (apply_overrides, read_config_file)
    config_data       what `--data` names: dataset or split folders, and a split's class count
    config_text       the config as commented YAML and docs/config.md (imported by those who print it)

    cfg = apply_overrides(get_preset("box_refine"), ["model.num_queries=100", "loss.cls_loss_coef=3"])
    cfg = build_config(config_file="exp.yaml", data="data/coco", overrides=["train.epochs=12"])  # a run's config

`Config.to_dict()` is plain JSON (it becomes Ray's `train_loop_config` and is saved in checkpoints) and
`Config.from_dict` reads it back. A config file is YAML (or JSON) naming a `preset:` and the keys that differ from
it. Every mistake in a configuration raises a `ConfigError` (a ValueError; an unknown key or preset is also a
KeyError) whose message names the key and, for a misspelt name, the closest known one.

The configuration is the ground floor of ddetr: these modules import only `ddetr.io`, the standard library and
yaml, never `ddetr.data`, `ddetr.train`, `ddetr.models`, torch or Ray (tests/test_structure.py checks it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from ddetr.config_data import SPLIT_METADATA, data_said, data_split, is_split_folder, split_dirs, split_num_classes
from ddetr.config_parse import apply_overrides, read_config_file
from ddetr.config_presets import (
    PRESETS,
    box_refine,
    deformable_detr,
    get_preset,
    named,
    run_time,
    single_scale,
    single_scale_dc5,
    tiny,
    two_stage,
)
from ddetr.config_sections import (
    BACKBONE_NORMS,
    BACKBONES,
    Config,
    ConfigError,
    DataConfig,
    LossConfig,
    ModelConfig,
    TrainConfig,
    UnknownNameError,
    did_you_mean,
    field_types,
)

__all__ = [
    "BACKBONES",
    "BACKBONE_NORMS",
    "PRESETS",
    "SPLIT_METADATA",
    "Config",
    "ConfigError",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "TrainConfig",
    "UnknownNameError",
    "apply_overrides",
    "box_refine",
    "build_config",
    "data_said",
    "data_split",
    "deformable_detr",
    "did_you_mean",
    "field_types",
    "get_preset",
    "is_split_folder",
    "named",
    "read_config_file",
    "run_time",
    "single_scale",
    "single_scale_dc5",
    "split_dirs",
    "split_num_classes",
    "tiny",
    "two_stage",
]

log = logging.getLogger(__name__)


def build_config(
    preset: str | None = None,
    data: str | None = None,
    overrides: Iterable[str] = (),
    config_file: str = "",
    *,
    name_run: bool = True,
) -> Config:
    """The config of a run: a preset or a config file on it, its data folders and their class count, then overrides.

    `preset` defaults to the config file's `preset:`, else deformable_detr. `data` is a folder holding train/ and
    val/ shards (or DIR/shards/...); its dataset.json gives `model.num_classes`. Overrides come last, so
    `model.num_classes=...` still wins. With `name_run`, an unnamed run is named `<preset>-<time>` (a new folder);
    without, `train.name` stays as given (`ddetr config`: a saved file then starts a new run each time).
    """
    if config_file:
        cfg, base_name = read_config_file(config_file, preset)
    else:
        base_name = preset or "deformable_detr"
        cfg = get_preset(base_name)
    defaults, said = [], ""
    if data:
        train, val = split_dirs(data)
        said = data_said(data, train, val)
        if not train and not val:
            raise ConfigError(
                f"--data {data}: no shard folders train/ or val/ under it and no {SPLIT_METADATA} in it (a split "
                "folder); make them with `ddetr data`"
            )
        defaults += [f"data.train={train}", f"data.val={val}"]
        defaults.append(f"model.num_classes={split_num_classes(train or val)}")
    cfg = apply_overrides(cfg, [*defaults, *overrides])
    if said:  # once the config stands: a mistake stays one line
        log.info("%s", said)
    return named(cfg, base_name) if name_run else cfg
