"""The sections of a run's configuration: typed dataclasses with the official defaults, each checking its values.

The defaults are those of the official release's `main.py` (COCO, ResNet-50, 4 levels, 300 queries). The comment
beside each field is its documentation: `ddetr.config_text` turns them into the commented YAML of a resolved config
and into docs/config.md, so every field needs one. `Config.to_dict()` is plain JSON (it becomes Ray's
`train_loop_config` and is saved in checkpoints) and `Config.from_dict` reads it back.

Every mistake in a configuration raises a `ConfigError` (a ValueError; an unknown key or preset is also a
KeyError) whose message names the key and, for a misspelt name, the closest known one. This module is the ground
floor of the configuration: it imports nothing of ddetr.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

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
    # Two-stage: learned content queries beside the proposals' positional ones (DINO's mixed query selection). A
    # variant of its own: its checkpoints hold query_embed (num_queries x d_model), which neither the official release
    # nor the Hugging Face format has, so the Hugging Face export refuses it.
    mixed_query_selection: bool = False
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
        if self.mixed_query_selection and not self.two_stage:
            raise ConfigError("model.mixed_query_selection sets learned content queries on proposals: needs two_stage")


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
    # Hybrid matching (H-DETR), training only: this many extra queries (two-stage: the next proposals; else learned
    # rows) decoded beside the model's and matched to each target one_to_many_repeat times; 0: off. The deployed model
    # is the plain one. H-DETR: 1500 beside 300 queries.
    one_to_many_queries: int = 0
    one_to_many_repeat: int = 6  # hybrid matching: K, the copies of each target the extra queries are matched to
    one_to_many_weight: float = 1.0  # hybrid matching: weight of the one-to-many losses (H-DETR's lambda)
    # Look forward twice (DINO), training only: layer d's box loss also trains layer d-1's refinement (the box it
    # passes on stays detached); needs model.with_box_refine. Evaluation is unchanged.
    look_forward_twice: bool = False

    def __post_init__(self) -> None:
        if self.one_to_many_queries < 0:
            raise ConfigError(f"loss.one_to_many_queries must be >= 0 (0: off), got {self.one_to_many_queries}")
        if self.one_to_many_queries and (self.one_to_many_repeat < 1 or self.one_to_many_weight <= 0):
            raise ConfigError(
                f"hybrid matching (loss.one_to_many_queries={self.one_to_many_queries}) needs loss.one_to_many_repeat "
                f">= 1 and loss.one_to_many_weight > 0, got {self.one_to_many_repeat} and {self.one_to_many_weight}"
            )


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
        if self.eval_every < 1:
            raise ConfigError(
                f"train.eval_every must be at least 1 (the last epoch is always evaluated; data.val= trains without "
                f"evaluation), got {self.eval_every}"
            )
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

    def __post_init__(self) -> None:
        if self.loss.look_forward_twice and not self.model.with_box_refine:
            raise ConfigError("loss.look_forward_twice trains the box refinement: it needs model.with_box_refine=true")

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
            section_type = field_types(cls)[name]
            known = {f.name for f in dataclasses.fields(section_type)}
            unknown = sorted(set(values) - known)
            if unknown:
                raise UnknownNameError(f"unknown config key {name}.{unknown[0]}{did_you_mean(unknown[0], known)}")
            kwargs[name] = section_type(**values)
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def field_types(cls: type) -> dict[str, Any]:
    """{field: its type} of a config dataclass, as types rather than text."""
    # Resolve the string annotations that `from __future__ import annotations` leaves behind.
    return typing.get_type_hints(cls)
