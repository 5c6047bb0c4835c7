"""Typed configuration: dataclasses with the official defaults, the paper's presets, flat overrides, config files.

The defaults are those of the official release's `main.py` (COCO, ResNet-50, 4 levels, 300 queries).
`Config.to_dict()` is plain JSON (it becomes Ray's `train_loop_config` and is saved in checkpoints) and
`Config.from_dict` reads it back. Overrides are flat `section.field=value` strings:

    cfg = apply_overrides(get_preset("box_refine"), ["model.num_queries=100", "loss.cls_loss_coef=3"])
    cfg = build_config(config_file="exp.yaml", data="data/coco", overrides=["train.epochs=12"])  # a run's config

A config file is YAML (or JSON) naming a `preset:` and the keys that differ from it (`read_config_file`). The
comment beside each field is its documentation: `ddetr.config_text` turns them into the commented YAML of a
resolved config and into docs/config.md, so every field needs one.

Every mistake in a configuration raises a `ConfigError` (a ValueError; an unknown key or preset is also a
KeyError) whose message names the key and, for a misspelt name, the closest known one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import secrets
import time
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddetr import io

log = logging.getLogger(__name__)
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
BACKBONE_NORMS = ("frozen_bn", "group_norm")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says which key and why."""


class UnknownNameError(ConfigError, KeyError):
    """An unknown section, field or preset; the message lists the known ones and the closest match."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """' (did you mean X?)' for the known name closest to `name`, or '' when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


@dataclass
class ModelConfig:
    backbone: str = "resnet50"  # resnet18, resnet34, resnet50 or resnet101 (torchvision); 18 and 34 for small CPU runs
    dilation: bool = False  # DC5: dilate the last stage (stride 16 instead of 32)
    # "imagenet" (torchvision's ImageNet-1k file, fetched once into the torch hub cache), a local .pth path or a
    # URL; "none" (or None): random init, and then no backbone stage is frozen. The paper starts from ImageNet.
    pretrained_backbone: str | None = "imagenet"
    # The backbone's normalization: "frozen_bn" (official: ImageNet statistics, fixed) or "group_norm" (GroupNorm(32),
    # trained: for a backbone trained from scratch, where frozen batch norm at random init is the identity).
    backbone_norm: str = "frozen_bn"
    # Fine-tune from: an official .pth, a ddetr checkpoint folder or a Hugging Face model folder (weights only).
    init_from: str = ""
    num_feature_levels: int = 4  # 1: single scale (C5 only); >= 3: C3-C5 plus strided extra levels
    d_model: int = 256  # width of every feature and query in the transformer
    enc_layers: int = 6  # encoder layers
    dec_layers: int = 6  # decoder layers
    dim_feedforward: int = 1024  # hidden width of each layer's feed-forward network
    dropout: float = 0.1  # dropout in the transformer layers
    nheads: int = 8  # attention heads (d_model must divide by it)
    dec_n_points: int = 4  # sampling points per head and feature level in the decoder's deformable attention
    enc_n_points: int = 4  # sampling points per head and feature level in the encoder's deformable attention
    num_queries: int = 300  # object queries (detections per image); also the proposals kept in two-stage mode
    with_box_refine: bool = False  # iterative box refinement: each decoder layer refines the boxes of the one before
    two_stage: bool = False  # the encoder proposes the decoder's first boxes (needs with_box_refine)
    # Two-stage: the IoU above which a proposal is set aside for a better-scoring one before the decoder gets its
    # num_queries (greedy NMS over the encoder's proposals); 0 keeps the plain top-k of the paper.
    proposal_nms: float = 0.0
    aux_loss: bool = True  # a loss on every decoder layer's output, not only the last one's
    # Classifier outputs: the largest category id + 1 (`--data` sets it from the dataset). COCO's raw ids go up to 90:
    # the official release uses 91.
    num_classes: int = 91
    # Multi-scale deformable attention backend for every layer: None (environment's choice), "reference", "cpp",
    # "gather" (see ddetr.ops.ms_deform_attn.select_backend).
    msda_backend: str | None = None
    # Recompute encoder layers in the backward pass (torch.utils.checkpoint) to save activation memory.
    checkpoint_encoder: bool = False

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ConfigError(f"model.backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.backbone_norm not in BACKBONE_NORMS:
            raise ConfigError(f"model.backbone_norm must be one of {BACKBONE_NORMS}, got {self.backbone_norm!r}")
        pretrained = str(self.pretrained_backbone or "").strip().lower() not in ("", "none", "null")
        if self.backbone_norm == "group_norm" and pretrained:
            raise ConfigError(
                "model.backbone_norm=group_norm trains the backbone from scratch: set model.pretrained_backbone=none "
                "(ImageNet weights come with batch-norm statistics)"
            )
        if self.d_model % 2 or self.d_model % self.nheads:
            raise ConfigError(f"model.d_model ({self.d_model}) must be even and divisible by nheads ({self.nheads})")
        if self.d_model % 32:
            raise ConfigError(f"model.d_model ({self.d_model}) must be a multiple of 32 (GroupNorm(32) projections)")
        if self.num_feature_levels != 1 and self.num_feature_levels < 3:
            # Multi-scale uses all three backbone levels (C3-C5) and adds strided levels beyond them.
            raise ConfigError(f"model.num_feature_levels must be 1 or >= 3, got {self.num_feature_levels}")
        if not 0.0 <= self.proposal_nms < 1.0:
            raise ConfigError(f"model.proposal_nms must lie in [0, 1) (0: off), got {self.proposal_nms}")
        if self.proposal_nms and not self.two_stage:
            raise ConfigError("model.proposal_nms selects encoder proposals: it needs model.two_stage=true")
        if self.two_stage and not self.with_box_refine:
            # The paper's two-stage variant refines boxes iteratively; the official configs always pair them.
            raise ConfigError("model.two_stage=true needs model.with_box_refine=true (the paper pairs them)")


@dataclass
class LossConfig:
    set_cost_class: float = 2.0  # Hungarian matcher: weight of the classification cost
    set_cost_bbox: float = 5.0  # Hungarian matcher: weight of the L1 box cost
    set_cost_giou: float = 2.0  # Hungarian matcher: weight of the generalized IoU cost
    cls_loss_coef: float = 2.0  # weight of the focal classification loss
    bbox_loss_coef: float = 5.0  # weight of the L1 box loss
    giou_loss_coef: float = 2.0  # weight of the generalized IoU loss
    focal_alpha: float = 0.25  # alpha of the focal classification loss
    # The class cost of the matcher has its own alpha: the official matcher fixes it at 0.25 whatever the loss uses.
    matcher_focal_alpha: float = 0.25


@dataclass
class DataConfig:
    train: str = ""  # shard directory (or URI) of the training split; "" for none
    val: str = ""  # shard directory (or URI) of the validation split; "" for none
    scale: float = 1.0  # multiplies every transform size of the paper (0.2: shorter sides 96..160 for CPU runs)
    # Training: the probability of a random crop before the resize (the paper's 0.5; 0: never). Short schedules fit
    # faster without crops and multi_scale (the demo).
    crop_p: float = 0.5
    # Training: each image resized to a random shorter side (the paper's 480..800, times scale); false: every image
    # at the validation size.
    multi_scale: bool = True
    loader_workers: int = 2  # DataLoader processes of the single-process engine
    map_cpus: float = 0.5  # CPUs per Ray Data decode task: below 1 so that 2-CPU machines do not starve
    # A shard whose footer or row count is wrong stops the run before its first step, naming the file; with
    # this on, its images are left out and counted in a warning instead.
    skip_unreadable_shards: bool = False
    # No batch for this long ends the run with an error that names the likely cause, instead of a silent hang.
    watchdog_s: float = 600.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.crop_p <= 1.0:
            raise ConfigError(f"data.crop_p is a probability, between 0 and 1; got {self.crop_p}")


@dataclass
class TrainConfig:
    epochs: int = 50  # passes over the training split
    lr_drop: int = 40  # epoch at which every learning rate is multiplied by 0.1
    batch_size: int = 2  # images per worker and micro-batch
    # Images per optimizer step over all workers, reached by gradient accumulation; 0: batch_size x workers.
    # The official results use 32 (8 GPUs x 2 images x 2 nodes); smaller totals are reported to cost AP.
    total_batch_size: int = 0
    lr: float = 2e-4  # AdamW learning rate of the transformer and the heads
    lr_backbone: float = 2e-5  # learning rate of the backbone; 0 freezes it
    lr_linear_proj_mult: float = 0.1  # sampling_offsets and reference_points learn 10x slower
    weight_decay: float = 1e-4  # AdamW weight decay
    clip_max_norm: float = 0.1  # gradients clipped to this total norm; 0: no clipping
    # A step whose gradient norm is NaN or infinite is skipped (weights, optimizer and EMA untouched); this many in
    # a row stop the run with NonFiniteLossError: one bad batch is survived, a diverged model is not trained on.
    max_nonfinite_steps: int = 3
    amp: str = "auto"  # "auto" (bf16 on CUDA, off on CPU), "bf16", "fp16", "off"
    amp_eval: bool = False  # validate under train.amp's autocast too (default: fp32, as `ddetr eval`)
    # EMA of the weights, validated and deployed instead of the raw ones; 0: off. About 0.9997 at 32 images per
    # step; for k times the total batch use decay ** k (the same span in images). See ddetr/train/ema.py.
    ema_decay: float = 0.0
    ema_warmup_steps: int = 2000  # the decay ramps up as 1 - exp(-step / ema_warmup_steps)
    seed: int = 42  # seeds the initialization, the data order and the augmentation
    eval_every: int = 1  # epochs between COCO evaluations (the last epoch is always evaluated)
    checkpoint_every_steps: int = 0  # also checkpoint every N optimizer steps inside an epoch (0: per epoch only)
    keep_checkpoints: int = 2  # checkpoints kept: this many best by val/AP, plus the latest
    max_steps_per_epoch: int = 0  # cut epochs short (smoke tests); 0: whole epochs
    log_every: int = 10  # optimizer steps between console progress lines
    # Ray Train workers; -1: one per GPU when the cluster has or can add GPUs (at most 8), else 2 CPU workers. 0: the
    # loop runs in the driver process (debugging). Decided from what the cluster can become (ddetr/train/resources.py).
    num_workers: int = -1
    min_workers: int = 0  # > 0: elastic, starts with at least min_workers and grows to num_workers
    elastic_resize_interval_s: float = 60.0  # elastic: how often Ray checks whether more workers fit now
    use_gpu: str = "auto"  # "auto": a GPU per worker when the cluster has or can add GPUs; "true" / "false" force it
    # CPUs each worker holds; 0: derived from the cluster (1 with GPUs; on CPUs, what is left after one decode task
    # of data.map_cpus per worker, split between the workers).
    cpus_per_worker: float = 0.0
    max_failures: int = 3  # worker failures to recover from (from the latest checkpoint)
    max_preemption_failures: int = -1  # node preemptions (spot reclaims) to recover from; -1: any number
    # Worker-group starts that may fail (e.g. waiting for nodes) before the run gives up, each waiting up to
    # worker_start_timeout_s: 60 x 60 s lets a cold cluster take an hour to bring its GPU nodes up.
    controller_failure_limit: int = 60
    worker_start_timeout_s: float = 60.0  # how long one worker-group start waits for its workers
    storage_path: str = "runs"  # local folder or URI (s3://, gs://) for checkpoints and results
    # How rank 0 hands a checkpoint to Ray Train: "sync" (every rank waits for the upload), "async" (training goes on
    # while it uploads), "auto": async to object storage, sync to a local folder.
    checkpoint_upload: str = "auto"
    name: str = ""  # the run's folder under storage_path; "": <preset>-<time>, new each time. The same name continues.
    draw_images: int = 4  # validation images drawn with their detections at each evaluation (RUN/images/); 0: none
    tracker: str = "none"  # experiment tracking from rank 0: "mlflow", "wandb" or "none" (ddetr/train/tracking.py)
    # mlflow: the tracking URI (http://host:5000, file:///folder; "": $MLFLOW_TRACKING_URI); wandb: "offline", a
    # server URL, or "": W&B's own setting.
    tracker_uri: str = ""
    tracker_project: str = ""  # the MLflow experiment or W&B project ("": ddetr); the run is named train.name

    def __post_init__(self) -> None:
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ConfigError(f"train.amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size must be at least 1, got {self.batch_size}")
        if self.max_nonfinite_steps < 1:
            raise ConfigError(f"train.max_nonfinite_steps must be at least 1, got {self.max_nonfinite_steps}")
        # Configs saved before use_gpu took "auto" hold a bool.
        self.use_gpu = {"1": "true", "0": "false", "yes": "true", "no": "false"}.get(
            str(self.use_gpu).lower(), str(self.use_gpu).lower()
        )
        if self.use_gpu not in ("auto", "true", "false"):
            raise ConfigError(f"train.use_gpu must be auto, true or false, got {self.use_gpu!r}")
        if self.checkpoint_upload not in ("auto", "sync", "async"):
            raise ConfigError(f"train.checkpoint_upload must be auto, sync or async, got {self.checkpoint_upload!r}")
        if self.num_workers < -1:
            raise ConfigError(f"train.num_workers must be -1 (auto), 0 (in the driver) or more, got {self.num_workers}")
        if self.cpus_per_worker < 0:
            raise ConfigError(
                f"train.cpus_per_worker must be >= 0 (0: derived from the cluster), got {self.cpus_per_worker}"
            )
        if self.tracker not in ("none", "mlflow", "wandb"):
            raise ConfigError(f"train.tracker must be none, mlflow or wandb, got {self.tracker!r}")
        if self.draw_images < 0:
            raise ConfigError(f"train.draw_images must be >= 0 (0: none), got {self.draw_images}")


@dataclass
class Config:
    """Top-level configuration; sections are added here (data, train) and picked up by to/from_dict."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of JSON types: {"model": {...}, "loss": {...}, "data": {...}, "train": {...}}."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Inverse of `to_dict`; unknown sections or fields raise an UnknownNameError naming them."""
        kwargs = {}
        sections = {f.name: f for f in dataclasses.fields(cls)}
        for name, values in d.items():
            if name not in sections:
                raise UnknownNameError(f"unknown config section {name!r}{did_you_mean(name, sections)}")
            section_type = _field_types(cls)[name]
            known = {f.name for f in dataclasses.fields(section_type)}
            unknown = sorted(set(values) - known)
            if unknown:
                raise UnknownNameError(f"unknown config key {name}.{unknown[0]}{did_you_mean(unknown[0], known)}")
            kwargs[name] = section_type(**values)
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _field_types(cls: type) -> dict[str, Any]:
    # Resolve the string annotations that `from __future__ import annotations` leaves behind.
    return typing.get_type_hints(cls)


def _value_of(value: Any, annotation: Any) -> Any:
    """`value` as a field of type `annotation` (bool, int, float, str, or Optional of one).

    Text (an override, or what YAML reads as text) is parsed: "2e-4", "true". A scalar read from YAML or JSON is
    checked: an int is a float too, a bool or a number is text ("use_gpu: true"). Raises ValueError naming the type
    expected.
    """
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if type(None) in args and value is None:
            return None
        (annotation,) = [a for a in args if a is not type(None)]
    if annotation not in (bool, int, float, str):
        raise ConfigError(f"fields of type {annotation} cannot be set from text")
    if isinstance(value, str):
        if annotation is not bool:
            with contextlib.suppress(ValueError):
                return annotation(value)
        elif value.lower() in ("true", "1", "yes", "on"):
            return True
        elif value.lower() in ("false", "0", "no", "off"):
            return False
    elif isinstance(value, bool):
        if annotation in (bool, str):
            return value if annotation is bool else str(value).lower()
    elif isinstance(value, (int, float)) and annotation is not bool:
        if annotation is not int or isinstance(value, int):  # 2.5 is no int
            return annotation(value)
    raise ValueError(f"expected a value of type {annotation.__name__}")


def _convert(text: str, annotation: Any, key: str) -> Any:
    """Parse an override's text into the field's type (bool, int, float, str, or Optional of one)."""
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(
        annotation
    )
    try:
        return _value_of(None if optional and text.lower() in ("none", "null") else text, annotation)
    except ValueError as e:
        raise ConfigError(f"override {key}={text!r}: {e}") from None


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """Return a copy of `cfg` with flat `section.field=value` overrides applied, values converted to the field type.

    Raises:
        UnknownNameError: an unknown section or field, named with the closest known one.
        ConfigError: a malformed override, a value that does not parse as the field's type, or a bad combination.
    """
    sections = {name: getattr(cfg, name) for name in (f.name for f in dataclasses.fields(cfg))}
    changes: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ConfigError(f"override {item!r} must look like section.field=value, e.g. model.num_queries=100")
        if section not in sections:
            raise UnknownNameError(f"override {item!r}: unknown section {section!r}{did_you_mean(section, sections)}")
        hints = _field_types(type(sections[section]))
        if name not in hints:
            suggestion = did_you_mean(key, [f"{section}.{k}" for k in hints])
            raise UnknownNameError(f"override {item!r}: unknown key {key}{suggestion}")
        changes[section][name] = _convert(text.strip(), hints[name], key)
    # dataclasses.replace re-runs __post_init__, so a bad combination is reported here.
    return dataclasses.replace(cfg, **{s: dataclasses.replace(sections[s], **c) for s, c in changes.items() if c})


# Presets: the paper's variants (Table 1 / 2 of the paper) plus a tiny CPU model. Each returns a fresh Config.
def single_scale() -> Config:
    return Config(model=ModelConfig(num_feature_levels=1))


def single_scale_dc5() -> Config:
    return Config(model=ModelConfig(num_feature_levels=1, dilation=True))


def deformable_detr() -> Config:
    return Config()


def box_refine() -> Config:
    return Config(model=ModelConfig(with_box_refine=True))


def two_stage() -> Config:
    return Config(model=ModelConfig(with_box_refine=True, two_stage=True))


def tiny() -> Config:
    """ResNet-18, d_model 64, 2+2 layers, 30 queries: a fraction of a second per step at 64x96 on a CPU."""
    model = ModelConfig(
        backbone="resnet18",
        d_model=64,
        enc_layers=2,
        dec_layers=2,
        dim_feedforward=256,
        nheads=4,
        num_queries=30,
        dropout=0.0,  # no dropout: the tiny model is for quick, deterministic runs
        pretrained_backbone="none",  # runs anywhere, with nothing to download
    )
    return Config(model=model)


PRESETS: dict[str, Callable[[], Config]] = {
    "single_scale": single_scale,
    "single_scale_dc5": single_scale_dc5,
    "deformable_detr": deformable_detr,
    "box_refine": box_refine,
    "two_stage": two_stage,
    "tiny": tiny,
}


def get_preset(name: str) -> Config:
    """A fresh Config for a named preset; an unknown name raises a KeyError listing the names."""
    if name not in PRESETS:
        raise UnknownNameError(
            f"unknown preset {name!r}{did_you_mean(name, PRESETS)}; the presets: {', '.join(PRESETS)}"
        )
    return PRESETS[name]()


def run_time() -> str:
    """The unique part of a default run name: the time (sortable), then 4 random hex digits for runs started at once."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def named(cfg: Config, prefix: str = "run") -> Config:
    """`cfg` itself when it names its run, else a copy named `<prefix>-<time>` (a new run folder)."""
    if cfg.train.name:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, name=f"{prefix}-{run_time()}"))


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


def read_config_file(path: str, preset: str | None = None) -> tuple[Config, str]:
    """A config file read onto its base: (the config, the name a new run is named after: the base preset's; for a
    full config `preset`, else "run").

    The file (YAML, or JSON when it ends in .json) is a mapping of sections to the keys that differ from a base:

        preset: two_stage          # the base (default: `preset`, else deformable_detr)
        model: {num_queries: 100}

    A file without `preset:` that holds every section is a full config (`Config.to_json()`, a checkpoint's
    config.json, a sweep's best_config.json): its keys go onto the dataclass defaults.

    Raises:
        ConfigError: the file cannot be read or parsed, an unknown or ill-typed key, a bad combination, or a preset
            other than `preset`; the message names the file and the key.
    """
    where = f"config file {path}"
    values = _read_mapping(path, where)
    named_preset = values.pop("preset", None)
    if named_preset is not None and not isinstance(named_preset, str):
        raise ConfigError(f"{where}: preset must be a preset's name ({', '.join(PRESETS)}), got {named_preset!r}")
    if named_preset and preset and named_preset != preset:
        raise ConfigError(f"{where} names preset {named_preset} but --preset {preset} was given: keep one of them")
    sections = [f.name for f in dataclasses.fields(Config)]
    if named_preset is None and set(sections) <= set(values):
        base, base_name = Config(), preset or "run"
    else:
        base_name = named_preset or preset or "deformable_detr"
        try:
            base = get_preset(base_name)
        except UnknownNameError as e:
            raise UnknownNameError(f"{where}: {e}") from None
    return _merge(base, values, where), base_name


def _read_mapping(path: str, where: str) -> dict[str, Any]:
    """The file's top-level mapping ({} for an empty file); unreadable or malformed text is a ConfigError."""
    import yaml

    try:
        text = io.read_text(path)
    except FileNotFoundError:
        raise ConfigError(f"cannot read config file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        values = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"cannot read config file {path}: not valid JSON: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"cannot read config file {path}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of sections (model:, train:, ...), got {type(values).__name__}")
    return {str(k): v for k, v in values.items()}


def _merge(base: Config, values: dict[str, Any], where: str) -> Config:
    """`base` with a file's `{section: {key: value}}` set on it, each value checked against its field's type."""
    sections = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    merged: dict[str, Any] = {}
    yaml_booleans = []  # text fields given an unquoted on/off/yes/no, which YAML reads as a boolean
    for name, items in values.items():
        if name not in sections:
            owner = [s for s in sections if name in _field_types(type(sections[s]))]
            hint = f" (put it under {owner[0]}:)" if owner else did_you_mean(name, sections)
            raise UnknownNameError(f"{where}: unknown section {name!r}{hint}")
        if not isinstance(items, dict):
            raise ConfigError(f"{where}: section {name} must be a mapping of keys to values, got {items!r}")
        hints = _field_types(type(sections[name]))
        changes = {}
        for key, value in items.items():
            full = f"{name}.{key}"
            if key not in hints:
                suggestion = did_you_mean(full, [f"{name}.{k}" for k in hints])
                raise UnknownNameError(f"{where}: unknown key {full}{suggestion}")
            try:
                changes[key] = _value_of(value, hints[key])
            except ValueError as e:
                raise ConfigError(f"{where}: {full}: {e}, got {value!r}") from None
            if isinstance(value, bool) and hints[key] is str:
                yaml_booleans.append(full)
        try:  # dataclasses.replace re-runs __post_init__: a bad value or combination is found here
            merged[name] = dataclasses.replace(sections[name], **changes)
        except ConfigError as e:
            hint = f" ({', '.join(yaml_booleans)}: YAML reads unquoted on/off/yes/no as booleans; quote them)"
            raise ConfigError(f"{where}: {e}{hint if yaml_booleans else ''}") from None
    return dataclasses.replace(base, **merged)


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
        from ddetr.data.shards import read_metadata

        defaults.append(f"model.num_classes={read_metadata(train or val).num_classes}")
    cfg = apply_overrides(cfg, [*defaults, *overrides])
    if said:  # once the config stands: a mistake stays one line
        log.info("%s", said)
    return named(cfg, base_name) if name_run else cfg
