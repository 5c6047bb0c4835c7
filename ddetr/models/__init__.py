"""Deformable DETR: backbone, deformable transformer, heads, matcher, criterion, post-processing, checkpoints.

Importing this package builds nothing and downloads nothing.
"""

from ddetr.models.build import build_criterion, build_detector, build_model
from ddetr.models.checkpoint import config_from_official_args, load_official_checkpoint, read_checkpoint
from ddetr.models.criterion import SetCriterion, build_weight_dict, sigmoid_focal_loss
from ddetr.models.deformable_detr import DeformableDETR, PostProcess
from ddetr.models.hf import read_hf, write_hf
from ddetr.models.matcher import HungarianMatcher
from ddetr.models.weights import export_hf, init_from, load_detector, read_weights

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
    "export_hf",
    "init_from",
    "load_detector",
    "load_official_checkpoint",
    "read_checkpoint",
    "read_hf",
    "read_weights",
    "sigmoid_focal_loss",
    "write_hf",
]
