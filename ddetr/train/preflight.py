"""Checks on the driver before any worker starts: a mistake in what a run reads is one line, not a retried crash.

`train()` runs `preflight` for both engines before it starts Ray. Inside a Ray worker the same mistake would be
raised by every rank, retried `train.max_failures` times and end in a Ray traceback; here it is a ConfigError or a
FileNotFoundError, which the command line prints as `error: <one line>` with exit status 2. Each check reads only
what the run would read first: the data's metadata and shard footers, a checkpoint's `config.json` and manifest,
the `model.init_from` weights.
"""

from __future__ import annotations

import dataclasses
import json
import os

from ddetr import io
from ddetr.config import Config, ConfigError, ModelConfig
from ddetr.train.checkpoints import (
    CONFIG_FILE,
    LATEST,
    STATE_FILE,
    find_checkpoint,
    latest_intact,
    resolve_checkpoint,
    run_dir,
    verify_checkpoint,
)

# Model settings that do not change the architecture: a run may continue with other values of these.
NOT_ARCHITECTURE = ("init_from", "pretrained_backbone", "msda_backend", "checkpoint_encoder")


def preflight(cfg: Config, resume: str | None = None) -> str | None:
    """Check the data, that evaluation can run, `resume`, a reused run name, and for a fresh run `model.init_from`
    and `model.pretrained_backbone`.

    Returns:
        the checkpoint folder `resume` names (a run folder: its latest checkpoint), or None without `resume`.

    Raises:
        ConfigError, FileNotFoundError, CorruptCheckpointError, DataError: one line naming the setting and the path.
    """
    check_data(cfg)
    check_evaluation(cfg)
    if resume is not None:
        return check_resume(cfg, resume)
    if check_continuation(cfg) is None:  # a fresh run starts from these weights; a continued one from its own
        check_init_from(cfg)
        check_pretrained_backbone(cfg)
    return None


def check_continuation(cfg: Config) -> str | None:
    """Refuse to continue a run folder whose checkpoints hold another model (a reused `train.name`).

    The run folder may be local or in object storage: its latest checkpoint's `config.json` is read either way.

    Returns:
        the checkpoint the run continues from, or None when the run folder holds none (a fresh run).

    Raises:
        ConfigError: naming the folder and every differing model key.
    """
    run = run_dir(cfg.train.storage_path, cfg.train.name)
    if io.is_uri(run):
        latest = find_checkpoint(run, LATEST)
    else:
        intact = latest_intact(run)  # what the single-process runtime resumes from
        latest = str(intact) if intact is not None else None
    if latest is None or not io.exists(io.join(latest, CONFIG_FILE)):
        return latest
    saved_cfg = Config.from_dict(json.loads(io.read_text(io.join(latest, CONFIG_FILE))))
    saved = saved_cfg.model
    differing = [
        f"model.{f.name} {getattr(saved, f.name)!r} -> {getattr(cfg.model, f.name)!r}"
        for f in dataclasses.fields(saved)
        if f.name not in NOT_ARCHITECTURE and getattr(saved, f.name) != getattr(cfg.model, f.name)
    ]
    # Hybrid matching's one-to-many queries are parameters of the training state unless two-stage proposals
    # (without mixed query selection) play them: their number is then part of the model that continues.
    learned = not cfg.model.two_stage or cfg.model.mixed_query_selection
    before, now = saved_cfg.loss.one_to_many_queries, cfg.loss.one_to_many_queries
    if learned and before != now:
        differing.append(f"loss.one_to_many_queries {before!r} -> {now!r}")
    if differing:
        raise ConfigError(
            f"run {run} holds checkpoints of another model ({', '.join(differing)}): choose another train.name "
            "(the default is a new one each time), or --resume one of its checkpoints to start a new run from it"
        )
    return latest


def check_data(cfg: Config) -> None:
    """The training split (required) and the validation split (if any) open: metadata and every shard's footer."""
    from ddetr.data.shards import open_split

    if not cfg.data.train:
        raise ConfigError("no training data: give --data DIR (a folder with train/ shards) or data.train=SHARD_FOLDER")
    for key, split in (("data.train", cfg.data.train), ("data.val", cfg.data.val)):
        if not split:
            continue
        if not io.exists(split):
            raise FileNotFoundError(
                f"{key}={split}: no such folder; give a shard folder written by `ddetr data convert` or `ddetr data "
                "synth`"
            )
        # A bad shard is named now, not by a worker mid-epoch.
        open_split(split, skip_unreadable=cfg.data.skip_unreadable_shards)


def check_evaluation(cfg: Config) -> None:
    """pycocotools imports when the run evaluates (`data.val` set), here rather than after the first epoch.

    The driver checks its own installation here; each Ray worker checks again at its start (`ray_worker`), since a
    worker node may run another image.
    """
    if not cfg.data.val:
        return
    from ddetr.data.coco_eval import MISSING_PYCOCOTOOLS, coco_api

    try:
        coco_api()
    except ImportError:
        raise ConfigError(
            f"{MISSING_PYCOCOTOOLS} (the run evaluates data.val={cfg.data.val}; data.val= trains without evaluation)"
        ) from None


def check_resume(cfg: Config, resume: str) -> str:
    """The ddetr checkpoint `resume` names: there, complete (local: its manifest), and of this config's model.

    A run folder names its latest checkpoint. Returns the checkpoint's folder or state file.
    """
    try:
        checkpoint = resolve_checkpoint(resume, LATEST)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--resume: {err}") from None
    folder = checkpoint if io.is_dir(checkpoint) else None
    if folder is not None and not io.exists(io.join(folder, STATE_FILE)):
        raise ConfigError(
            f"--resume {resume}: not a ddetr checkpoint folder (no {STATE_FILE}); to start from other weights, "
            "give them as model.init_from instead"
        )
    if folder is not None and not io.is_uri(folder):
        verify_checkpoint(folder)  # a copy cut short is found here, not by every worker
    if folder is not None and io.exists(io.join(folder, CONFIG_FILE)):
        from ddetr.models.weights import architecture_differences

        saved = Config.from_dict(json.loads(io.read_text(io.join(folder, CONFIG_FILE)))).model
        differing = architecture_differences(saved, cfg.model) + [
            f for f in ("num_classes",) if getattr(saved, f) != getattr(cfg.model, f)
        ]
        if differing:
            raise ConfigError(
                f"--resume {resume} holds a {_settings(saved, differing)} model; this config has "
                f"{_settings(cfg.model, differing)}: set these to resume it, or fine-tune from it with "
                "model.init_from instead"
            )
    return checkpoint


def check_init_from(cfg: Config) -> None:
    """`model.init_from` reads (official .pth, ddetr checkpoint or Hugging Face folder) and is this variant."""
    source = cfg.model.init_from
    if not source:
        return
    from ddetr.models.weights import architecture_differences, read_weights

    if not io.exists(source):
        raise FileNotFoundError(f"model.init_from={source}: no such file or folder")
    try:
        weights = read_weights(source)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"model.init_from={source}: {' '.join(str(err).split())}") from None
    except (OSError, RuntimeError, ValueError, KeyError, EOFError) as err:  # torch reports a cut file as a RuntimeError
        raise ConfigError(f"model.init_from={source} cannot be read: {' '.join(str(err).split())}") from None
    if weights.config is None:  # an official file without its run's args: the variant is not known to compare
        return
    differing = architecture_differences(weights.config, cfg.model)
    if differing:
        raise ConfigError(
            f"model.init_from={source} is a {_settings(weights.config, differing)} model; this config has "
            f"{_settings(cfg.model, differing)}: set these (or pick the matching --preset), or choose another "
            "checkpoint"
        )


def check_pretrained_backbone(cfg: Config) -> None:
    """A `model.pretrained_backbone` that names a local file names one that exists ("imagenet" and URLs are
    fetched by the workers; with `model.init_from` the backbone's weights come from there)."""
    from ddetr.models.backbone import has_pretrained_weights

    source = (cfg.model.pretrained_backbone or "").strip()
    if cfg.model.init_from or not has_pretrained_weights(source) or source.lower() == "imagenet":
        return
    if source.startswith("http://"):  # refused here, before any worker starts, as the backbone loader would
        raise ConfigError(
            f"model.pretrained_backbone={source}: only https:// URLs are fetched (a plain http:// download can be "
            "replaced on its way); give an https:// URL, or download the file yourself and give its path"
        )
    if source.startswith("https://"):
        return
    if not os.path.isfile(source):
        raise FileNotFoundError(
            f"model.pretrained_backbone={source}: no such file; give a torchvision {cfg.model.backbone} .pth file on "
            "this machine, 'imagenet' (downloaded once), a URL, or 'none' for random weights"
        )


def _settings(model: ModelConfig, fields: list[str]) -> str:
    """`two_stage=True, d_model=256`: the given fields of a model config."""
    return ", ".join(f"{f}={getattr(model, f)}" for f in fields)
