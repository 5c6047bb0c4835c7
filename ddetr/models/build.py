"""`build_model`: a typed config in, the detector, its criterion and its post-processor out."""

from __future__ import annotations

from ddetr.config import Config, LossConfig, ModelConfig
from ddetr.models.backbone import build_backbone
from ddetr.models.criterion import SetCriterion, build_weight_dict
from ddetr.models.deformable_detr import DeformableDETR, PostProcess
from ddetr.models.deformable_transformer import build_deformable_transformer
from ddetr.models.matcher import build_matcher


def build_detector(m: ModelConfig) -> DeformableDETR:
    """The model alone (no criterion), e.g. for inference or to read a checkpoint's keys."""
    backbone = build_backbone(
        m.backbone,
        m.d_model,
        multi_scale=m.num_feature_levels > 1,
        dilation=m.dilation,
        pretrained=m.pretrained_backbone,
    )
    transformer = build_deformable_transformer(
        d_model=m.d_model,
        nheads=m.nheads,
        enc_layers=m.enc_layers,
        dec_layers=m.dec_layers,
        dim_feedforward=m.dim_feedforward,
        dropout=m.dropout,
        num_feature_levels=m.num_feature_levels,
        dec_n_points=m.dec_n_points,
        enc_n_points=m.enc_n_points,
        two_stage=m.two_stage,
        num_queries=m.num_queries,
        msda_backend=m.msda_backend,
        checkpoint_encoder=m.checkpoint_encoder,
    )
    return DeformableDETR(
        backbone,
        transformer,
        num_classes=m.num_classes,
        num_queries=m.num_queries,
        num_feature_levels=m.num_feature_levels,
        aux_loss=m.aux_loss,
        with_box_refine=m.with_box_refine,
        two_stage=m.two_stage,
    )


def build_criterion(m: ModelConfig, loss: LossConfig) -> SetCriterion:
    matcher = build_matcher(loss.set_cost_class, loss.set_cost_bbox, loss.set_cost_giou, loss.focal_alpha)
    weight_dict = build_weight_dict(
        loss.cls_loss_coef,
        loss.bbox_loss_coef,
        loss.giou_loss_coef,
        m.dec_layers,
        aux_loss=m.aux_loss,
        two_stage=m.two_stage,
    )
    return SetCriterion(m.num_classes, matcher, weight_dict, focal_alpha=loss.focal_alpha)


def build_model(cfg: Config) -> tuple[DeformableDETR, SetCriterion, dict[str, PostProcess]]:
    """-> (model, criterion, {"bbox": PostProcess()}), the three pieces the training engine needs.

    `criterion.weight_dict` holds the loss weights and `criterion.total_loss(losses)` their weighted sum.
    """
    return build_detector(cfg.model), build_criterion(cfg.model, cfg.loss), {"bbox": PostProcess()}
