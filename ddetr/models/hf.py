"""Hugging Face `DeformableDetrForObjectDetection` folders, both ways: `read_hf` and `write_hf`.

A folder holds `config.json` (the architecture, `id2label`, a timm ResNet `backbone_config`) and
`model.safetensors`. The layout is that of transformers 5.x: the ResNet is timm's (torchvision's names under
`model.backbone.conv_encoder.model.`), the decoder's self-attention has separate q/k/v projections, and heads
that transformers ties are stored once:

    base             class_embed.0, bbox_embed.0 (one head for every decoder layer, as ours)
    box refinement   class_embed.0 (transformers ties the class heads), model.decoder.bbox_embed.{0..5}
    two-stage        model.decoder.class_embed.{0..6}, model.decoder.bbox_embed.{0..6}

Our box-refinement model has one class head per decoder layer; the format has room for one, so `write_hf`
stores the last layer's (the one that makes the detections) and the earlier layers' auxiliary logits are
those of that head after a round trip. Everything else maps one to one, and transformers 5.24 gives the
outputs of ours to float rounding (checked for all five paper variants at small sizes), with two exceptions
that are refused or documented: a DC5 ResNet-18/34 (timm dilates the first block of the last stage, ours keeps
torchvision's convention; refused both ways) and two-stage on padded batches (ddetr ranks padded proposals
last, transformers as the official code, so a padded image may get other proposals).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch

from ddetr import io
from ddetr.config import ConfigError, ModelConfig
from ddetr.models.build import build_detector
from ddetr.models.deformable_detr import DeformableDETR

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HF_BACKBONE = "model.backbone.conv_encoder.model."

# Per-layer renames (ours -> transformers), applied to `transformer.{encoder,decoder}.layers.{i}.` suffixes.
_ENCODER_LAYER = {
    "norm1.": "self_attn_layer_norm.",
    "linear1.": "fc1.",
    "linear2.": "fc2.",
    "norm2.": "final_layer_norm.",
}
_DECODER_LAYER = {
    "cross_attn.": "encoder_attn.",
    "norm1.": "encoder_attn_layer_norm.",
    "norm2.": "self_attn_layer_norm.",
    "linear1.": "fc1.",
    "linear2.": "fc2.",
    "norm3.": "final_layer_norm.",
}
_TRANSFORMER_TOP = (
    "level_embed",
    "reference_points.",
    "enc_output.",
    "enc_output_norm.",
    "pos_trans.",
    "pos_trans_norm.",
)


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder holding config.json and model.safetensors."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def _num_pred(m: ModelConfig) -> int:
    return m.dec_layers + (1 if m.two_stage else 0)


def _rename_layer(rest: str, table: dict[str, str]) -> str:
    for ours, theirs in table.items():
        if rest.startswith(ours):
            return theirs + rest[len(ours) :]
    return rest  # self_attn.* / sampling_offsets etc. keep their names


def to_hf_state_dict(model: DeformableDETR, m: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict under transformers' names (heads stored as the module docstring says)."""
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith("backbone.0.body."):
            out[HF_BACKBONE + k.removeprefix("backbone.0.body.")] = v
        elif k.startswith("input_proj."):
            out["model." + k] = v
        elif k == "query_embed.weight":
            out["model.query_position_embeddings.weight"] = v
        elif k.startswith("transformer.encoder.layers."):
            i, rest = k.removeprefix("transformer.encoder.layers.").split(".", 1)
            out[f"model.encoder.layers.{i}.{_rename_layer(rest, _ENCODER_LAYER)}"] = v
        elif k.startswith("transformer.decoder.layers."):
            i, rest = k.removeprefix("transformer.decoder.layers.").split(".", 1)
            prefix = f"model.decoder.layers.{i}."
            if rest.startswith("self_attn.in_proj_"):
                kind = rest.removeprefix("self_attn.in_proj_")  # weight (3D, D) or bias (3D,): q, k, v stacked
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3), strict=True):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part
            else:
                out[prefix + _rename_layer(rest, _DECODER_LAYER)] = v
        elif k.startswith("transformer.") and k.removeprefix("transformer.").startswith(_TRANSFORMER_TOP):
            out["model." + k.removeprefix("transformer.")] = v
    # Heads. Ours name every entry (shared ones too); the format keeps what transformers does not tie.
    n = _num_pred(m)
    head = {k: v for k, v in state.items() if k.startswith(("class_embed.", "bbox_embed."))}
    if m.two_stage:
        out.update({"model.decoder." + k: v for k, v in head.items()})
    elif m.with_box_refine:
        out.update({"model.decoder." + k: v for k, v in head.items() if k.startswith("bbox_embed.")})
        last = n - 1
        for name in ("weight", "bias"):
            out[f"class_embed.0.{name}"] = state[f"class_embed.{last}.{name}"]
        heads = [state[f"class_embed.{i}.weight"] for i in range(n)]
        if not heads[-1].is_meta and any(not torch.equal(h, heads[-1]) for h in heads):
            log.warning(
                "the Hugging Face box-refinement layout stores one class head: writing the last decoder layer's "
                "(the detections are unchanged; the earlier layers' auxiliary logits will come from it)"
            )
    else:
        out.update({k: v for k, v in head.items() if k.startswith(("class_embed.0.", "bbox_embed.0."))})
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf_state_dict(hf: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers' names -> ours (inverse of `to_hf_state_dict`); shared heads are named for every entry.

    Heads stored per layer (older transformers saved every clone) are taken as they are.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    enc_back = {v: k for k, v in _ENCODER_LAYER.items()}
    dec_back = {v: k for k, v in _DECODER_LAYER.items()}
    for k, v in hf.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.startswith(HF_BACKBONE):
            out["backbone.0.body." + k.removeprefix(HF_BACKBONE)] = v
        elif k.startswith("model.input_proj."):
            out[k.removeprefix("model.")] = v
        elif k == "model.query_position_embeddings.weight":
            out["query_embed.weight"] = v
        elif k.startswith("model.encoder.layers."):
            i, rest = k.removeprefix("model.encoder.layers.").split(".", 1)
            out[f"transformer.encoder.layers.{i}.{_rename_layer(rest, enc_back)}"] = v
        elif k.startswith("model.decoder.layers."):
            i, rest = k.removeprefix("model.decoder.layers.").split(".", 1)
            proj = rest.split(".")[1] if rest.startswith("self_attn.") else ""
            if proj in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault((i, rest.rsplit(".", 1)[1]), {})[proj] = v
            else:
                out[f"transformer.decoder.layers.{i}.{_rename_layer(rest, dec_back)}"] = v
        elif k.removeprefix("model.").startswith(_TRANSFORMER_TOP):
            out["transformer." + k.removeprefix("model.")] = v
    for (i, kind), parts in qkv.items():
        out[f"transformer.decoder.layers.{i}.self_attn.in_proj_{kind}"] = torch.cat(
            [parts["q_proj"], parts["k_proj"], parts["v_proj"]]
        )
    # Heads: the per-layer entry if stored, else the one transformers ties it to.
    for head, suffixes in (("class_embed", ("weight", "bias")), ("bbox_embed", _MLP_SUFFIXES)):
        for i in range(_num_pred(m)):
            for suffix in suffixes:
                candidates = [f"model.decoder.{head}.{i}.{suffix}", f"{head}.{i}.{suffix}", f"{head}.0.{suffix}"]
                found = next((c for c in candidates if c in hf), None)
                if found is not None:
                    out[f"{head}.{i}.{suffix}"] = hf[found]
    # The decoder holds the same head modules under a second name, as in the official release.
    for k in list(out):
        if (m.with_box_refine and k.startswith("bbox_embed.")) or (m.two_stage and k.startswith("class_embed.")):
            out["transformer.decoder." + k] = out[k]
    return out


_BASIC_BLOCK = ("resnet18", "resnet34")
_MLP_SUFFIXES = tuple(f"layers.{j}.{p}" for j in range(3) for p in ("weight", "bias"))


def hf_config_to_model_config(config: dict, base: ModelConfig | None = None) -> ModelConfig:
    """A ModelConfig from a transformers `DeformableDetrConfig` dict.

    Raises:
        ConfigError: a feature we do not implement (another backbone family, learned position encoding,
            encoder and decoder of different widths or heads).
    """
    backbone = config.get("backbone_config") or {}
    name = backbone.get("backbone") or config.get("backbone") or "resnet50"
    problems = []
    if name.split(".")[0] not in ("resnet18", "resnet34", "resnet50", "resnet101"):
        problems.append(f"backbone {name!r} (ddetr has torchvision/timm ResNet-18/34/50/101)")
    if config.get("position_embedding_type", "sine") != "sine":
        problems.append(f"position_embedding_type {config['position_embedding_type']!r} (ddetr has sine)")
    for a, b in (("encoder_ffn_dim", "decoder_ffn_dim"), ("encoder_attention_heads", "decoder_attention_heads")):
        if config.get(a, 0) != config.get(b, 0):
            problems.append(f"{a}={config.get(a)} != {b}={config.get(b)}")
    if config.get("dilation") and name.split(".")[0] in _BASIC_BLOCK:
        problems.append(f"dilation with {name} (timm dilates its basic blocks unlike torchvision)")
    if problems:
        raise ConfigError("Hugging Face config not supported by ddetr: " + "; ".join(problems))
    id2label = config.get("id2label") or {}
    return dataclasses.replace(
        base or ModelConfig(),
        backbone=name.split(".")[0],
        dilation=bool(config.get("dilation", False)),
        num_feature_levels=config["num_feature_levels"],
        d_model=config["d_model"],
        enc_layers=config["encoder_layers"],
        dec_layers=config["decoder_layers"],
        dim_feedforward=config["encoder_ffn_dim"],
        dropout=config.get("dropout", 0.1),
        nheads=config["encoder_attention_heads"],
        dec_n_points=config["decoder_n_points"],
        enc_n_points=config["encoder_n_points"],
        num_queries=config["num_queries"],
        with_box_refine=bool(config.get("with_box_refine", False)),
        two_stage=bool(config.get("two_stage", False)),
        aux_loss=bool(config.get("auxiliary_loss", True)),
        num_classes=len(id2label) if id2label else config.get("num_labels", 91),
    )


def hf_config(m: ModelConfig, id2label: dict[int, str]) -> dict:
    """The config.json of a `DeformableDetrForObjectDetection` equivalent to `m` (transformers 5.x fields).

    Raises:
        ConfigError: DC5 with ResNet-18/34, which timm builds differently; a group-norm backbone; proposal NMS;
            mixed query selection (one line on the command line).
    """
    if m.mixed_query_selection:
        raise ConfigError(
            "cannot export model.mixed_query_selection=true: the Hugging Face model takes two-stage content queries "
            "from the proposals and has no learned ones (export it as ONNX, or serve the checkpoint itself)"
        )
    if m.proposal_nms:
        raise ConfigError(
            f"cannot export model.proposal_nms={m.proposal_nms}: the Hugging Face model keeps the plain top-k of the "
            "encoder's proposals, so its detections would differ"
        )
    if m.backbone_norm != "frozen_bn":
        raise ConfigError(
            f"cannot export a backbone with model.backbone_norm={m.backbone_norm}: the Hugging Face model's timm "
            "ResNet uses (frozen) batch norm"
        )
    if m.dilation and m.backbone in _BASIC_BLOCK:
        raise ConfigError(
            f"cannot export a DC5 {m.backbone}: timm's dilated basic blocks differ from ours (ResNet-50/101 export)"
        )
    stages = ["layer2", "layer3", "layer4"] if m.num_feature_levels > 1 else ["layer4"]
    return {
        "architectures": ["DeformableDetrForObjectDetection"],
        "model_type": "deformable_detr",
        "backbone_config": {
            "model_type": "timm_backbone",
            "backbone": m.backbone,
            "num_channels": 3,
            "features_only": True,
            "use_pretrained_backbone": False,
            "freeze_batch_norm_2d": False,
            "out_indices": [int(s[-1]) for s in stages],
            "out_features": stages,
            "stage_names": ["act1", "layer1", "layer2", "layer3", "layer4"],
            "output_stride": 16 if m.dilation else None,
        },
        "dilation": m.dilation,
        "num_channels": 3,
        "num_feature_levels": m.num_feature_levels,
        "d_model": m.d_model,
        "encoder_layers": m.enc_layers,
        "decoder_layers": m.dec_layers,
        "encoder_ffn_dim": m.dim_feedforward,
        "decoder_ffn_dim": m.dim_feedforward,
        "encoder_attention_heads": m.nheads,
        "decoder_attention_heads": m.nheads,
        "encoder_n_points": m.enc_n_points,
        "decoder_n_points": m.dec_n_points,
        "num_queries": m.num_queries,
        "two_stage_num_proposals": m.num_queries,
        "with_box_refine": m.with_box_refine,
        "two_stage": m.two_stage,
        "auxiliary_loss": m.aux_loss,
        "position_embedding_type": "sine",
        "activation_function": "relu",
        "dropout": m.dropout,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0,
        "is_encoder_decoder": True,
        "return_intermediate": True,
        "tie_word_embeddings": True,  # transformers ties the heads as the module docstring lists
        "disable_custom_kernels": True,
        "id2label": {str(i): name for i, name in sorted(id2label.items())},
        "label2id": {name: i for i, name in sorted(id2label.items(), reverse=True)},
        "dtype": "float32",
    }


def write_hf(model: DeformableDETR, cfg: ModelConfig, folder: str | os.PathLike, id2label: dict[int, str]) -> Path:
    """Write `folder/config.json` and `folder/model.safetensors`, each whole or not at all (`io.atomic_write`).

    Args:
        id2label: class index -> name for every one of the `cfg.num_classes` logits (gaps: "N/A").

    Returns:
        the folder.
    """
    from safetensors.torch import save

    if set(id2label) != set(range(cfg.num_classes)):
        raise ConfigError(f"id2label must name each of the {cfg.num_classes} classes 0..{cfg.num_classes - 1}")
    config = hf_config(cfg, id2label)
    folder = Path(folder)
    state = {k: v.cpu() for k, v in to_hf_state_dict(model, cfg).items()}
    io.atomic_write(folder / WEIGHTS_FILE, save(state, metadata={"format": "pt"}))
    io.atomic_write(folder / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def read_hf(folder: str | os.PathLike) -> tuple[DeformableDETR, ModelConfig, dict[int, str]]:
    """A `DeformableDETR` with the weights of a Hugging Face folder, its ModelConfig and its `id2label`.

    The backbone counts as pretrained (its stem and layer1 freeze when fine-tuning); nothing is fetched.

    Raises:
        FileNotFoundError: not a folder with config.json and model.safetensors.
        ConfigError: an architecture ddetr does not implement.
        RuntimeError: the weights do not fit the config (the message lists the keys).
    """
    from safetensors.torch import load_file

    if not is_hf_folder(folder):
        raise FileNotFoundError(
            f"{os.fspath(folder)!r} is not a Hugging Face model folder ({CONFIG_FILE} + {WEIGHTS_FILE})"
        )
    config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    arch = config.get("architectures") or ["DeformableDetrForObjectDetection"]
    if (
        config.get("model_type", "deformable_detr") != "deformable_detr"
        or "DeformableDetrForObjectDetection" not in arch
    ):
        raise ConfigError(f"{os.fspath(folder)!r} holds {arch}, not a DeformableDetrForObjectDetection")
    m = hf_config_to_model_config(config, ModelConfig(pretrained_backbone="imagenet"))
    model = build_detector(m, load_backbone_weights=False)
    state = from_hf_state_dict(load_file(str(Path(folder) / WEIGHTS_FILE)), m)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        raise RuntimeError(
            f"Hugging Face weights in {os.fspath(folder)!r} do not fit its config: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}, shapes (file vs config) {mismatched[:10]}"
        )
    model.load_state_dict(state)
    id2label = {int(i): name for i, name in (config.get("id2label") or {}).items()}
    return model, m, id2label
