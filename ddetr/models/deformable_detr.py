"""Deformable DETR: backbone -> input projections -> deformable transformer -> class and box heads."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ddetr.models import box_ops
from ddetr.models.backbone import Joiner
from ddetr.models.deformable_decoder import inverse_sigmoid
from ddetr.models.deformable_transformer import DeformableTransformer
from ddetr.models.hybrid import OneToManyQueries


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU in between (the box head: 3 layers, d_model -> d_model -> 4)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, dims[1:] + [output_dim], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class DeformableDETR(nn.Module):
    """The detector. Heads are kept per decoder layer in `class_embed` / `bbox_embed` (num_pred entries: the
    decoder layers, plus one for the encoder proposals in two-stage mode); without box refinement all entries
    are the same module, so their weights are shared but the state dict still names every entry, as the
    official release does.

    Args:
        backbone: `Joiner` of ResNet and position encoding.
        transformer: the deformable transformer (its `level_embed` has `num_feature_levels` rows).
        num_classes: K, sigmoid logits per query (no background logit).
        num_queries: Q.
        num_feature_levels: L; levels beyond the backbone's are 3x3 stride-2 convolutions of the previous one.
        aux_loss: also return every decoder layer's predictions.
        with_box_refine: per-layer heads, each refining the previous layer's boxes.
        two_stage: queries from encoder proposals (needs per-layer heads to be meaningful; see the presets).
        mixed_query_selection: two-stage with learned content queries (`query_embed`, (Q, d_model)) beside the
            proposals' positional ones; a variant of its own, which the official and Hugging Face formats lack.
        num_queries_one_to_many: T > 0 adds hybrid matching's one-to-many group while training (`hybrid.py`):
            its outputs are the extra "one_to_many" entry; in eval mode the model is the plain one.
        look_forward_twice: layer d's boxes stay attached to layer d-1's refinement in the outputs (training only
            changes: the values are the same); needs with_box_refine.
    """

    def __init__(
        self,
        backbone: Joiner,
        transformer: DeformableTransformer,
        num_classes: int,
        num_queries: int,
        num_feature_levels: int,
        aux_loss: bool = True,
        with_box_refine: bool = False,
        two_stage: bool = False,
        mixed_query_selection: bool = False,
        num_queries_one_to_many: int = 0,
        look_forward_twice: bool = False,
    ) -> None:
        super().__init__()
        if mixed_query_selection != transformer.mixed_query_selection:
            raise ValueError("DeformableDETR: mixed_query_selection must match the transformer's")
        if look_forward_twice and not with_box_refine:
            raise ValueError("look forward twice trains each layer's box refinement: it needs with_box_refine")
        self.num_queries, self.num_feature_levels = num_queries, num_feature_levels
        self.transformer = transformer
        hidden_dim = transformer.d_model
        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)  # (positional, content) per query
        elif mixed_query_selection:
            self.query_embed = nn.Embedding(num_queries, hidden_dim)  # content only: positions come from proposals
        self.num_queries_one_to_many = num_queries_one_to_many
        if num_queries_one_to_many and (not two_stage or mixed_query_selection):
            # The one-to-many group's own learned rows, kept out of the shipped weights (two-stage without mixed
            # selection takes its queries from the proposals and learns nothing extra).
            width = hidden_dim if two_stage else hidden_dim * 2
            self.one_to_many = OneToManyQueries(num_queries_one_to_many, width)
        self.input_proj = self._input_projections(backbone.num_channels, hidden_dim, num_feature_levels)
        self.backbone = backbone
        self.aux_loss, self.with_box_refine, self.two_stage = aux_loss, with_box_refine, two_stage
        self.mixed_query_selection = mixed_query_selection
        transformer.decoder.look_forward_twice = look_forward_twice

        # Focal-loss prior: every logit starts at p = 0.01, so the many background queries do not swamp the loss.
        prior_prob = 0.01
        nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)

        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            # Initial boxes (before any refinement) are small: sigmoid(-2) ~ 0.12 of the image.
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList([class_embed] * num_pred)
            self.bbox_embed = nn.ModuleList([bbox_embed] * num_pred)
        if two_stage:
            self.transformer.decoder.class_embed = self.class_embed
            # Proposals already carry a size (0.05 * 2^level), so heads start from it unchanged.
            for box_embed in self.bbox_embed:
                nn.init.zeros_(box_embed.layers[-1].bias[2:])

    @staticmethod
    def _input_projections(in_channels: list[int], hidden_dim: int, num_feature_levels: int) -> nn.ModuleList:
        """1x1 conv + GroupNorm per backbone level, then 3x3 stride-2 conv + GroupNorm per extra level."""
        projs = [
            nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim))
            for c in in_channels[:num_feature_levels]
        ]
        channels = in_channels[-1]
        for _ in range(num_feature_levels - len(in_channels)):
            projs.append(
                nn.Sequential(
                    nn.Conv2d(channels, hidden_dim, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, hidden_dim)
                )
            )
            channels = hidden_dim
        return nn.ModuleList(projs)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        """
        Args:
            images: (B, 3, H, W) a padded, normalised batch.
            mask: (B, H, W) bool, True at padding; None when nothing is padded.

        Returns:
            dict with "pred_logits" (B, Q, K) logits; "pred_boxes" (B, Q, 4) (cx, cy, w, h) in [0, 1] of the
            valid image; "aux_outputs" (with aux_loss) a list of n_dec - 1 such dicts from the earlier decoder
            layers; "enc_outputs" (two-stage) {"pred_logits" (B, S, K), "pred_boxes" (B, S, 4)} per encoder pixel;
            "one_to_many" (training with hybrid matching only) "pred_logits" (B, T', K), "pred_boxes" (B, T', 4)
            and "aux_outputs" of the one-to-many group (T' = T, or the proposals left beyond Q in two-stage).
        """
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        features, pos = self.backbone(images, mask)
        srcs = [proj(x) for proj, (x, _) in zip(self.input_proj, features, strict=False)]  # extra levels come below
        masks = [m for _, m in features]
        for lvl in range(len(features), self.num_feature_levels):
            # Extra levels: strided convs of C5 (the first), then of the previous extra level.
            src = self.input_proj[lvl](features[-1][0] if lvl == len(features) else srcs[-1])
            m = F.interpolate(mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
            srcs.append(src)
            masks.append(m)
            pos.append(self.backbone[1](m).to(src.dtype))

        return self.forward_transformer(srcs, masks, pos)

    def forward_transformer(self, srcs: list[torch.Tensor], masks: list[torch.Tensor], pos: list[torch.Tensor]) -> dict:
        """The part after the input projections, which never reads padded positions.

        Args:
            srcs: L projected maps (B, D, H_l, W_l); masks: L masks (B, H_l, W_l); pos: L encodings (B, D, H_l, W_l).

        Returns:
            the dict of `forward`.
        """
        # Hybrid matching's one-to-many group exists only while training: in eval mode this is the plain model.
        num_one_to_many = self.num_queries_one_to_many if self.training else 0
        query_embeds = None if self.two_stage and not self.mixed_query_selection else self.query_embed.weight
        if num_one_to_many and hasattr(self, "one_to_many"):
            query_embeds = torch.cat([query_embeds, self.one_to_many.query_embed.weight])  # (Q + T, 2D or D)
        hs, init_reference, inter_references, enc_class, enc_coord_unact = self.transformer(
            srcs, masks, pos, query_embeds, num_one_to_many
        )

        outputs_classes, outputs_coords = [], []
        for lvl in range(hs.shape[0]):
            reference = inverse_sigmoid(init_reference if lvl == 0 else inter_references[lvl - 1])
            tmp = self.bbox_embed[lvl](hs[lvl])  # (B, Q, 4) offsets in logit space
            if reference.shape[-1] == 4:
                tmp = tmp + reference
            else:
                tmp = torch.cat([tmp[..., :2] + reference, tmp[..., 2:]], -1)
            outputs_classes.append(self.class_embed[lvl](hs[lvl]))
            outputs_coords.append(tmp.sigmoid())

        Q = self.num_queries
        if hs.shape[2] == Q:  # the plain model (the only one in eval mode: no slicing in its graph)
            out = self._layer_outputs(outputs_classes, outputs_coords)
        else:  # the one-to-many group follows the Q queries of the model
            out = self._layer_outputs([c[:, :Q] for c in outputs_classes], [b[:, :Q] for b in outputs_coords])
            out["one_to_many"] = self._layer_outputs(
                [c[:, Q:] for c in outputs_classes], [b[:, Q:] for b in outputs_coords]
            )
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_class, "pred_boxes": enc_coord_unact.sigmoid()}
        return out

    def _layer_outputs(self, classes: list[torch.Tensor], coords: list[torch.Tensor]) -> dict:
        """The last layer's "pred_logits" and "pred_boxes", with the earlier layers' as "aux_outputs" (aux_loss)."""
        out: dict = {"pred_logits": classes[-1], "pred_boxes": coords[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": a, "pred_boxes": b} for a, b in zip(classes[:-1], coords[:-1], strict=True)
            ]
        return out


class PostProcess(nn.Module):
    """Model outputs -> detections in image coordinates (the COCO evaluation format)."""

    def __init__(self, num_select: int = 100) -> None:
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """
        Args:
            outputs: the model's dict ("pred_logits" (B, Q, K), "pred_boxes" (B, Q, 4)).
            target_sizes: (B, 2) original (h, w) of each image.

        Returns:
            B dicts with "scores" (N,), "labels" (N,) int64 and "boxes" (N, 4) absolute xyxy, N = min(100, Q*K),
            best first. Scores are sigmoids: a query may report several classes.
        """
        scores, labels, boxes = self.batched(outputs["pred_logits"], outputs["pred_boxes"], target_sizes)
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes, strict=True)]

    def batched(
        self, logits: torch.Tensor, boxes: torch.Tensor, target_sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward` as three batch tensors: scores (B, N), labels (B, N) and boxes (B, N, 4) (what ONNX exports).

        Args:
            logits: (B, Q, K); boxes: (B, Q, 4) (cx, cy, w, h) in [0, 1]; target_sizes: (B, 2) (h, w).
        """
        B, Q, K = logits.shape
        prob = logits.sigmoid().view(B, Q * K)
        scores, index = torch.topk(prob, min(self.num_select, Q * K), dim=1)
        query, labels = index // K, index % K
        boxes = torch.gather(box_ops.box_cxcywh_to_xyxy(boxes), 1, query[..., None].expand(-1, -1, 4))
        img_h, img_w = target_sizes.unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1).to(boxes.dtype)
        return scores, labels, boxes * scale[:, None, :]
