"""Checkpoint files: the one safe reader of `.pth`/`.pt` files, the ddetr checkpoint folder's format, and loading
checkpoints of the official release (fundamentalvision/Deformable-DETR) into our model.

A ddetr checkpoint folder (`ddetr.train.checkpoints` writes it; `ddetr.models.weights` reads it too, and models
do not import train, so its format lives here) holds

    state.pt            the `torch.save`d payload (model, optimizer, ..., config; see `ddetr.train.checkpoints`)
    manifest.json       {"state.pt": {"size": bytes, "sha256": hex}}, written last: a folder with a manifest that
                        matches is complete, and a copy cut short (a node lost mid-write or mid-upload) is detected

beside files of the run (metrics.json, config.json). `verify_checkpoint` checks a folder against its manifest;
`state_file` is what every reader of a folder or a file loads.

Our parameter names and shapes equal the official ones for every variant, so the `model` entry of an
official `.pth` loads with `strict=True`. A checkpoint's `model` and `ema` entries are the training state: with
hybrid matching they also hold the one-to-many queries, which `shipped_state_dict` leaves out of the weights that
evaluation, export, serving and fine-tuning read.

Official files also pickle the run's `argparse.Namespace`; every file is read with `torch.load(weights_only=True)`,
allowing only that class (and the `Counter` of the lr scheduler's state) beyond tensors and containers: a file that
pickles anything else is refused rather than executed.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import logging
import math
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddetr import io
from ddetr.config import ModelConfig
from ddetr.models.hybrid import is_training_only

log = logging.getLogger(__name__)

# The only non-tensor classes an official checkpoint pickles: the run's arguments and MultiStepLR's milestones.
SAFE_GLOBALS = [argparse.Namespace, collections.Counter]
CLASS_HEAD_PREFIXES = ("class_embed.", "transformer.decoder.class_embed.")
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint whose state file is missing, unreadable, or does not match its folder's manifest (or has none)."""


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file (a ddetr `state.pt`, an official `.pth`) without executing arbitrary pickled code.

    Returns:
        the checkpoint dict (official: "model", "args", and for training checkpoints "optimizer",
        "lr_scheduler", "epoch"; ddetr: see `ddetr.train.checkpoints`).

    Raises:
        FileNotFoundError: no such file.
        RuntimeError: the file pickles objects other than tensors, containers, argparse.Namespace and Counter.
        CorruptCheckpointError: the file cannot be read (cut short, not a checkpoint), naming it.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {os.fspath(path)!r} not found")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise RuntimeError(
            f"refusing to load {os.fspath(path)!r}: it pickles objects other than tensors, containers and "
            f"argparse.Namespace, and unpickling them could run arbitrary code. If you trust the file, convert it "
            f"once: torch.save({{'model': torch.load(path, weights_only=False)['model']}}, new_path). Details: {e}"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:  # torch reports a truncated zip as a RuntimeError
        raise CorruptCheckpointError(f"checkpoint {os.fspath(path)} cannot be read ({e})") from e


def shipped_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The deployed model's weights of a training state dict: without the training-only parameters (hybrid
    matching's one-to-many queries, `ddetr.models.hybrid.TRAINING_ONLY_PREFIX`), so the keys are the plain model's."""
    return {k: v for k, v in state.items() if not is_training_only(k)}


def state_file(path: str | os.PathLike) -> Path:
    """The file to load for a local checkpoint: a ddetr folder's `state.pt`, checked against its manifest
    (`verify_checkpoint`), or `path` itself when it is a file (a `state.pt` or an official `.pth`, read as it is).

    Raises:
        FileNotFoundError: nothing at `path`. CorruptCheckpointError: a folder that does not verify.
    """
    path = Path(path)
    if path.is_dir():
        verify_checkpoint(path)
        return path / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: expected a folder holding {STATE_FILE}, or the file")
    return path


def write_manifest(directory: str | os.PathLike) -> None:
    """Record the size and sha256 of `directory/state.pt` in `directory/manifest.json`: the folder's last write."""
    path = Path(directory, STATE_FILE)
    manifest = {STATE_FILE: {"size": path.stat().st_size, "sha256": _sha256(str(path))}}
    io.atomic_write(Path(directory, MANIFEST_FILE), json.dumps(manifest))


def verify_checkpoint(directory: str | os.PathLike, checksum: bool = True) -> None:
    """Check a checkpoint folder (a local path or a URI) against its manifest.

    Args:
        checksum: also compare the sha256 (reads the whole state file); without it, only presence and size, which
            finds a copy cut short without reading it (cheap on object storage).

    Raises:
        CorruptCheckpointError: naming the file, when the state file is missing, of another size or checksum than
            the manifest records, or when the folder has no manifest (cut short before its last write, or written
            before ddetr recorded manifests: such a folder is refused; its state file can be given itself).
    """
    directory = str(directory)
    state = io.join(directory, STATE_FILE)
    found = io.file_size(state)
    if found is None:
        raise CorruptCheckpointError(f"checkpoint {directory}: {STATE_FILE} is missing")
    manifest = io.join(directory, MANIFEST_FILE)
    try:
        expected = json.loads(io.read_text(manifest))[STATE_FILE]
        size, digest = int(expected["size"]), str(expected["sha256"])
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"checkpoint {directory} has no {MANIFEST_FILE}, so it cannot be checked: it was cut short before its "
            f"manifest was written, or written by a ddetr from before manifests, whose folders are refused; to load "
            f"it anyway, give its state file itself ({state})"
        ) from None
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpointError(f"{manifest} is not a checkpoint manifest ({err!r})") from None
    if found != size:
        raise CorruptCheckpointError(f"checkpoint {state} is incomplete: {found} bytes where its manifest says {size}")
    if checksum and _sha256(state) != digest:
        raise CorruptCheckpointError(f"checkpoint {state} does not match the checksum its manifest records")


def _sha256(path: str) -> str:
    fs, inner = io.resolve(path)
    digest = hashlib.sha256()
    with fs.open_input_stream(inner) as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass
class LoadReport:
    """What `load_official_checkpoint` did: the run's args (or None) and the class-head keys re-initialised."""

    args: argparse.Namespace | None
    reinitialized: list[str]


def _reinit_class_heads(model: nn.Module) -> None:
    """Fresh class heads with the focal-loss prior (p = 0.01) on the bias, as at construction."""
    prior_bias = -math.log((1 - 0.01) / 0.01)
    for head in model.class_embed:
        head.reset_parameters()
        nn.init.constant_(head.bias, prior_bias)


def load_official_checkpoint(
    model: nn.Module, checkpoint: str | os.PathLike | dict[str, Any], allow_num_classes_change: bool = True
) -> LoadReport:
    """Load an official (or our own) checkpoint's weights into `model`, strictly.

    Args:
        model: a `DeformableDETR` of the checkpoint's variant (see `config_from_official_args`).
        checkpoint: a path, or an already-read dict with a "model" entry (or a bare state dict).
        allow_num_classes_change: when only the class heads differ in shape (another dataset), keep the
            model's freshly initialised heads, log which keys were skipped, and load everything else.

    Returns:
        a `LoadReport`.

    Raises:
        RuntimeError: any other difference; the message lists the missing, unexpected and shape-mismatched keys.
    """
    ckpt = read_checkpoint(checkpoint) if isinstance(checkpoint, str | os.PathLike) else checkpoint
    state = ckpt.get("model", ckpt)
    args = ckpt.get("args") if isinstance(ckpt.get("args"), argparse.Namespace) else None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    head_mismatch = [k for k in mismatched if k.startswith(CLASS_HEAD_PREFIXES)]
    other_mismatch = [k for k in mismatched if not k.startswith(CLASS_HEAD_PREFIXES)]
    if missing or unexpected or other_mismatch or (head_mismatch and not allow_num_classes_change):
        lines = [f"checkpoint does not fit the model ({type(model).__name__}):"]
        if missing:
            lines.append(f"  missing in checkpoint ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected in checkpoint ({len(unexpected)}): {', '.join(unexpected)}")
        for k in other_mismatch + ([] if allow_num_classes_change else head_mismatch):
            lines.append(f"  shape mismatch {k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}")
        lines.append("  (is the model built with the checkpoint's variant? see config_from_official_args)")
        raise RuntimeError("\n".join(lines))
    if head_mismatch:
        k = head_mismatch[0]
        log.warning(
            "checkpoint class heads have %d classes, the model %d: re-initialising %d class-head tensors (%s...) "
            "and loading everything else",
            state[k].shape[0],
            own[k].shape[0],
            len(head_mismatch),
            k,
        )
        state = {k: v for k, v in state.items() if k not in head_mismatch}
        _reinit_class_heads(model)
    result = model.load_state_dict(state, strict=not head_mismatch)
    assert sorted(result.missing_keys) == sorted(head_mismatch) and not result.unexpected_keys
    return LoadReport(args=args, reinitialized=head_mismatch)


# Official main.py argument -> our ModelConfig field, where the names differ or agree.
_ARG_TO_FIELD = {
    "backbone": "backbone",
    "dilation": "dilation",
    "num_feature_levels": "num_feature_levels",
    "hidden_dim": "d_model",
    "enc_layers": "enc_layers",
    "dec_layers": "dec_layers",
    "dim_feedforward": "dim_feedforward",
    "dropout": "dropout",
    "nheads": "nheads",
    "dec_n_points": "dec_n_points",
    "enc_n_points": "enc_n_points",
    "num_queries": "num_queries",
    "with_box_refine": "with_box_refine",
    "two_stage": "two_stage",
    "aux_loss": "aux_loss",
}
# The official build derives the class count from the dataset name.
_DATASET_NUM_CLASSES = {"coco": 91, "coco_panoptic": 250}


def config_from_official_args(
    args: argparse.Namespace | dict[str, Any], base: ModelConfig | None = None
) -> ModelConfig:
    """A ModelConfig from an official checkpoint's `args` (fields it lacks keep `base`'s values).

    Raises:
        ValueError: the checkpoint uses a feature we do not implement (segmentation masks, learned position
            encoding).
    """
    a = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    if a.get("masks"):
        raise ValueError("official checkpoint was trained with --masks (segmentation), which ddetr does not implement")
    if a.get("position_embedding", "sine") not in ("sine", "v2"):
        raise ValueError(
            f"official checkpoint uses position_embedding={a['position_embedding']!r}; "
            "ddetr implements only the sine encoding"
        )
    changes = {field: a[arg] for arg, field in _ARG_TO_FIELD.items() if arg in a}
    if a.get("dataset_file") in _DATASET_NUM_CLASSES:
        changes["num_classes"] = _DATASET_NUM_CLASSES[a["dataset_file"]]
    return dataclasses.replace(base or ModelConfig(), **changes)
