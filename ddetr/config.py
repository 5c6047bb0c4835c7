"""Typed configuration: dataclasses with the official defaults, flat overrides and the paper's presets.

The defaults are those of the official release's `main.py` (COCO, ResNet-50, 4 levels, 300 queries).
`Config.to_dict()` is plain JSON (it becomes Ray's `train_loop_config` and is saved in checkpoints) and
`Config.from_dict` reads it back. Overrides are flat `section.field=value` strings:

    cfg = apply_overrides(get_preset("box_refine"), ["model.num_queries=100", "loss.cls_loss_coef=3"])
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")


@dataclass
class ModelConfig:
    backbone: str = "resnet50"  # one of BACKBONES; 18/34 are for small CPU runs
    dilation: bool = False  # DC5: dilate the last stage (stride 16 instead of 32)
    # Path, URL or "imagenet" (torchvision's ImageNet weights). None: random init; training jobs set it.
    pretrained_backbone: str | None = None
    num_feature_levels: int = 4  # 1: single scale (C5 only); >1: C3-C5 plus strided extra levels
    d_model: int = 256
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    nheads: int = 8
    dec_n_points: int = 4
    enc_n_points: int = 4
    num_queries: int = 300  # also the number of proposals kept in two-stage mode
    with_box_refine: bool = False
    two_stage: bool = False
    aux_loss: bool = True
    num_classes: int = 91  # COCO's raw category ids go up to 90; the official release uses 91 logits
    # Multi-scale deformable attention backend for every layer: None (environment's choice), "reference", "cpp".
    msda_backend: str | None = None
    # Recompute encoder layers in the backward pass (torch.utils.checkpoint) to save activation memory.
    checkpoint_encoder: bool = False

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"model.backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.d_model % 2 or self.d_model % self.nheads:
            raise ValueError(f"model.d_model ({self.d_model}) must be even and divisible by nheads ({self.nheads})")
        if self.d_model % 32:
            raise ValueError(f"model.d_model ({self.d_model}) must be a multiple of 32 (GroupNorm(32) projections)")
        if self.num_feature_levels != 1 and self.num_feature_levels < 3:
            # Multi-scale uses all three backbone levels (C3-C5) and adds strided levels beyond them.
            raise ValueError(f"model.num_feature_levels must be 1 or >= 3, got {self.num_feature_levels}")


@dataclass
class LossConfig:
    # Matching costs of the Hungarian matcher.
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    # Loss weights.
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    focal_alpha: float = 0.25


@dataclass
class DataConfig:
    train: str = ""  # shard directory (or URI) of the training split; "" for none
    val: str = ""  # shard directory (or URI) of the validation split; "" for none
    scale: float = 1.0  # multiplies every transform size of the paper (0.2: shorter sides 96..160 for CPU runs)
    loader_workers: int = 2  # DataLoader processes of the single-process engine
    map_cpus: float = 0.5  # CPUs per Ray Data decode task: below 1 so that 2-CPU machines do not starve


@dataclass
class TrainConfig:
    epochs: int = 50
    lr_drop: int = 40  # epoch at which every learning rate is multiplied by 0.1
    batch_size: int = 2  # images per worker and micro-batch
    # Images per optimizer step over all workers, reached by gradient accumulation; 0: batch_size x workers.
    # The official results use 32 (8 GPUs x 2 images x 2 nodes); smaller totals are reported to cost AP.
    total_batch_size: int = 0
    lr: float = 2e-4
    lr_backbone: float = 2e-5
    lr_linear_proj_mult: float = 0.1  # sampling_offsets and reference_points learn 10x slower
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    amp: str = "auto"  # "auto" (bf16 on CUDA, off on CPU), "bf16", "fp16", "off"
    seed: int = 42
    eval_every: int = 1  # epochs between COCO evaluations (the last epoch is always evaluated)
    checkpoint_every_steps: int = 0  # also checkpoint every N optimizer steps inside an epoch (0: per epoch only)
    keep_checkpoints: int = 2  # best by val AP, plus the latest
    max_steps_per_epoch: int = 0  # cut epochs short (smoke tests); 0: whole epochs
    log_every: int = 10  # optimizer steps between console progress lines
    # Ray Train
    num_workers: int = 2
    min_workers: int = 0  # > 0: elastic, starts with at least min_workers and grows to num_workers
    elastic_resize_interval_s: float = 60.0  # elastic: how often Ray checks whether more workers fit now
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 3  # worker failures to recover from (from the latest checkpoint)
    storage_path: str = "runs"  # local folder or URI (s3://, gs://) for checkpoints and results
    name: str = "ddetr"

    def __post_init__(self) -> None:
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"train.amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size must be at least 1, got {self.batch_size}")


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
        """Inverse of `to_dict`; unknown sections or fields raise a KeyError naming them."""
        kwargs = {}
        sections = {f.name: f for f in dataclasses.fields(cls)}
        for name, values in d.items():
            if name not in sections:
                raise KeyError(f"unknown config section {name!r}; known: {sorted(sections)}")
            section_type = _field_types(cls)[name]
            known = {f.name for f in dataclasses.fields(section_type)}
            unknown = sorted(set(values) - known)
            if unknown:
                raise KeyError(f"unknown field(s) {unknown} in config section {name!r}; known: {sorted(known)}")
            kwargs[name] = section_type(**values)
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _field_types(cls: type) -> dict[str, Any]:
    # Resolve the string annotations that `from __future__ import annotations` leaves behind.
    return typing.get_type_hints(cls)


def _convert(text: str, annotation: Any, key: str) -> Any:
    """Parse an override's text into the field's type (bool, int, float, str, or Optional of one)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if type(None) in args and text.lower() in ("none", "null"):
            return None
        (annotation,) = [a for a in args if a is not type(None)]
    try:
        if annotation is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError(text)
        if annotation in (int, float, str):
            return annotation(text)
    except ValueError:
        raise ValueError(f"override {key}={text!r}: expected a value of type {annotation.__name__}") from None
    raise TypeError(f"override {key}: fields of type {annotation} cannot be set from the command line")


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """Return a copy of `cfg` with flat `section.field=value` overrides applied, values converted to the field type.

    Raises:
        KeyError: an unknown section or field, named with the known ones.
        ValueError: a malformed override or a value that does not parse as the field's type.
    """
    sections = {name: getattr(cfg, name) for name in (f.name for f in dataclasses.fields(cfg))}
    changes: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"override {item!r} must look like section.field=value, e.g. model.num_queries=100")
        if section not in sections:
            raise KeyError(f"override {item!r}: unknown section {section!r}; known: {sorted(sections)}")
        hints = _field_types(type(sections[section]))
        if name not in hints:
            raise KeyError(f"override {item!r}: unknown key {key!r}; known in {section}: {sorted(hints)}")
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
        raise KeyError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()
