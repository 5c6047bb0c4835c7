"""`build_model`: a typed config in, the detector, its criterion and its post-processor out."""

from __future__ import annotations

import logging

from ddetr.config import Config, LossConfig, ModelConfig
from ddetr.models.backbone import build_backbone, has_pretrained_weights
from ddetr.models.criterion import SetCriterion, build_weight_dict
from ddetr.models.deformable_detr import DeformableDETR, PostProcess
from ddetr.models.deformable_transformer import build_deformable_transformer
from ddetr.models.matcher import build_matcher

log = logging.getLogger(__name__)
# A log record's attribute for what every rank of a run says alike (it describes the config, not the rank): the Ray
# workers' logging (`train/ray_worker.py: quiet_worker_logs`) keeps it to rank 0's console, once per run.
SAME_ON_EVERY_RANK = "same_on_every_rank"


def build_detector(
    m: ModelConfig,
    *,
    load_backbone_weights: bool = True,
    train_backbone: bool = True,
    loss: LossConfig | None = None,
) -> DeformableDETR:
    """The model alone (no criterion), e.g. for inference or to read a checkpoint's keys.

    Args:
        m: the model config; `m.pretrained_backbone` decides the backbone's weights and what is frozen.
        load_backbone_weights: False when a full checkpoint is loaded next (eval, predict, resume, init_from):
            nothing is fetched, but the same parameters are frozen as with the weights.
        train_backbone: False freezes the whole backbone (`train.lr_backbone=0`).
        loss: the training-only parts it asks for (hybrid matching's one-to-many queries, look forward twice);
            None builds the model as deployed, whose weights are a checkpoint's shipped ones.
    """
    if load_backbone_weights and not has_pretrained_weights(m.pretrained_backbone):
        log.warning(
            "model.pretrained_backbone=%s: the %s starts from random weights and every stage trains; the paper's "
            "numbers assume ImageNet weights (model.pretrained_backbone=imagenet)",
            m.pretrained_backbone,
            m.backbone,
            extra={SAME_ON_EVERY_RANK: True},
        )
    backbone = build_backbone(
        m.backbone,
        m.d_model,
        multi_scale=m.num_feature_levels > 1,
        dilation=m.dilation,
        pretrained=m.pretrained_backbone,
        train_backbone=train_backbone,
        load_weights=load_backbone_weights,
        norm=m.backbone_norm,
    )
    transformer = build_deformable_transformer(m)
    return DeformableDETR(
        backbone,
        transformer,
        num_classes=m.num_classes,
        num_queries=m.num_queries,
        num_feature_levels=m.num_feature_levels,
        aux_loss=m.aux_loss,
        with_box_refine=m.with_box_refine,
        two_stage=m.two_stage,
        mixed_query_selection=m.mixed_query_selection,
        num_queries_one_to_many=loss.one_to_many_queries if loss is not None else 0,
        look_forward_twice=loss is not None and loss.look_forward_twice,
    )


def build_criterion(m: ModelConfig, loss: LossConfig) -> SetCriterion:
    matcher = build_matcher(loss.set_cost_class, loss.set_cost_bbox, loss.set_cost_giou, loss.matcher_focal_alpha)
    weight_dict = build_weight_dict(
        loss.cls_loss_coef,
        loss.bbox_loss_coef,
        loss.giou_loss_coef,
        m.dec_layers,
        aux_loss=m.aux_loss,
        two_stage=m.two_stage,
        one_to_many_weight=loss.one_to_many_weight if loss.one_to_many_queries else 0.0,
    )
    repeat = loss.one_to_many_repeat if loss.one_to_many_queries else 0
    return SetCriterion(m.num_classes, matcher, weight_dict, focal_alpha=loss.focal_alpha, one_to_many_repeat=repeat)


def build_model(
    cfg: Config, *, load_backbone_weights: bool = True
) -> tuple[DeformableDETR, SetCriterion, dict[str, PostProcess]]:
    """-> (model, criterion, {"bbox": PostProcess()}), the three pieces the training engine needs.

    `criterion.weight_dict` holds the loss weights and `criterion.total_loss(losses)` their weighted sum. The model
    has the training-only parts of `cfg.loss` (hybrid matching, look forward twice): in eval mode it is the plain one.
    `train.lr_backbone <= 0` freezes the whole backbone, as the official `train_backbone`, so its parameters
    get no gradient and stay out of the optimizer and the clipping norm. `load_backbone_weights`: see
    `build_detector`.
    """
    model = build_detector(
        cfg.model, load_backbone_weights=load_backbone_weights, train_backbone=cfg.train.lr_backbone > 0, loss=cfg.loss
    )
    return model, build_criterion(cfg.model, cfg.loss), {"bbox": PostProcess()}
