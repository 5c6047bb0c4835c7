"""What `--data` names: a dataset folder (its train and val splits) or one split's folder, and a split's class count.

A dataset folder holds train/ and val/ shard folders, or shards/{train,val} (`ddetr data synth`); a split folder
holds its shards and its `dataset.json` (the format is `ddetr.data.shards`). The config reads only where the
splits are and, from `dataset.json`, how many classes the classifier needs: the configuration is the ground floor
of ddetr and imports nothing of `ddetr.data`, which is configured by it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ddetr import io
from ddetr.config_sections import ConfigError

# A split folder's own file (`ddetr.data.shards.METADATA_FILE`: config imports nothing of ddetr.data).
SPLIT_METADATA = "dataset.json"


def is_split_folder(data: str) -> bool:
    """Whether `data` is one split's shard folder (it holds its dataset.json) rather than a dataset folder."""
    return io.exists(io.join(data, SPLIT_METADATA))


def split_dirs(data: str) -> tuple[str, str]:
    """(train, val) shard folders `--data` names (`data_said` says which, in words).

    A dataset folder gives DIR/{train,val}, or DIR/shards/{train,val} (`ddetr data synth`); a local split that is
    missing is "" (no such split), under a URI both are assumed. A split folder (`.../shards/train`: it holds its
    dataset.json) is the training split alone, without validation.
    """
    if is_split_folder(data):
        return data, ""
    if io.is_uri(data):
        root = io.join(data, "shards") if io.is_dir(io.join(data, "shards")) else data
        return io.join(root, "train"), io.join(root, "val")
    root = Path(data) / "shards" if (Path(data) / "shards").is_dir() else Path(data)
    train, val = root / "train", root / "val"
    return (str(train) if train.exists() else "", str(val) if val.exists() else "")


def data_said(data: str, train: str, val: str) -> str:
    """One line saying how `--data` was read, for the log of a command that goes ahead with it."""
    if data in (train, val):
        return f"--data {data}: a split folder" + (", trained on without validation" if data == train else "")
    splits = ", ".join(f"{name} {path}" for name, path in (("train", train), ("val", val)) if path)
    return f"--data {data}: a dataset folder: {splits}"


def data_split(data: str, split: str = "val") -> str:
    """The one shard split a command reads (eval, batch inference) that `--data` names: `data` itself when it is a
    split folder (`.../shards/val`), else the dataset folder's `split` (DIR/val or DIR/shards/val). `data_said(data,
    "", found)` says which.

    Raises:
        ConfigError: neither; the message says what was looked for.
    """
    if is_split_folder(data):
        return data
    for root in (io.join(data, "shards"), data):
        if is_split_folder(io.join(root, split)):
            return io.join(root, split)
    raise ConfigError(
        f"--data {data}: neither a split folder (no {SPLIT_METADATA}) nor a dataset folder with a {split} split "
        f"({split}/ or shards/{split}/ holding {SPLIT_METADATA}); give one of these, as `ddetr data` writes them"
    )


def split_num_classes(split: str) -> int:
    """The classifier width a split's dataset.json asks for: its largest category id + 1 (raw ids are the labels).

    The same rule as `ddetr.data.shards.ShardMetadata.num_classes` (tests/test_config.py checks that they agree),
    read here so that the config imports nothing of ddetr.data. The rest of the file (format version, shard list)
    is checked when a run opens the split.

    Raises:
        ConfigError: the file is missing, unreadable or lists no categories; the message names the file.
    """
    path = io.join(split, SPLIT_METADATA)
    try:  # a store's transient error is retried, as every read of dataset.json is
        text = io.retried(f"{path}: read", lambda: io.read_text(path))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; make the split with `ddetr data`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    try:
        ids = [int(category["id"]) for category in json.loads(text)["categories"]]
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise ConfigError(
            f"{path}: not a split's dataset.json (no categories with ids: {e!r}); convert it again"
        ) from None
    if not ids:
        raise ConfigError(f"{path}: lists no categories; convert the dataset again with its annotations")
    return max(ids) + 1
