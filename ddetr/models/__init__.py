"""Deformable DETR: backbone, deformable transformer, heads, matcher, criterion, post-processing, checkpoints.

Importing this package builds nothing and downloads nothing.
"""

from ddetr.models.build import build_criterion, build_detector, build_model
from ddetr.models.checkpoint import config_from_official_args, load_official_checkpoint, read_checkpoint
from ddetr.models.criterion import SetCriterion, build_weight_dict, sigmoid_focal_loss
from ddetr.models.deformable_detr import DeformableDETR, PostProcess
from ddetr.models.matcher import HungarianMatcher

__all__ = [
    "DeformableDETR",
    "HungarianMatcher",
    "PostProcess",
    "SetCriterion",
    "build_criterion",
    "build_detector",
    "build_model",
    "build_weight_dict",
    "config_from_official_args",
    "load_official_checkpoint",
    "read_checkpoint",
    "sigmoid_focal_loss",
]
