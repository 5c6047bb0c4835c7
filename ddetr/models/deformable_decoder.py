"""The deformable decoder: object queries attend to each other, then to a few sampled points of the encoder's memory
around their reference; with iterative refinement each layer refines the boxes of the layer before.

Module names follow the official release (`transformer.decoder.layers.i.cross_attn...`) so its checkpoints load.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ddetr.ops import MSDeformAttn


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with x clamped away from 0 and 1, so boxes at the border stay finite."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class DeformableTransformerDecoderLayer(nn.Module):
    """Query self-attention, deformable cross-attention into the memory, then a ReLU FFN; post-norm."""

    def __init__(
        self,
        *,
        d_model: int = 256,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        nheads: int = 8,
        n_points: int = 4,
        msda_backend: str | None = None,
    ) -> None:
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, num_feature_levels, nheads, n_points, backend=msda_backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, nheads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        src: torch.Tensor,
        src_spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        src_padding_mask: torch.Tensor,
        self_attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tgt, query_pos (B, Q, D); reference_points (B, Q, L, 2 or 4); src (B, S, D) -> (B, Q, D).

        self_attn_mask: (Q, Q) bool, True where query i may not attend to query j (hybrid matching's groups).
        """
        q = k = tgt + query_pos
        attn = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attn))
        tgt2 = self.cross_attn(
            tgt + query_pos, reference_points, src, src_spatial_shapes, level_start_index, src_padding_mask
        )
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2))


class DeformableTransformerDecoder(nn.Module):
    """A stack of decoder layers returning every layer's output and reference points.

    `bbox_embed` (per-layer box heads, shared with the detector) is set for iterative box refinement and
    `class_embed` for two-stage; they live here because the official state dict names them
    `transformer.decoder.bbox_embed` / `transformer.decoder.class_embed`. `look_forward_twice` (set by the
    detector, a training refinement of DINO) returns each layer's refined boxes before the detach.
    """

    def __init__(self, layer: DeformableTransformerDecoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None
        self.look_forward_twice = False

    def forward(
        self,
        tgt: torch.Tensor,
        reference_points: torch.Tensor,
        src: torch.Tensor,
        src_spatial_shapes: torch.Tensor,
        src_level_start_index: torch.Tensor,
        src_valid_ratios: torch.Tensor,
        query_pos: torch.Tensor,
        src_padding_mask: torch.Tensor,
        self_attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            tgt, query_pos: (B, Q, D) content and positional queries.
            reference_points: (B, Q, 2) points or (B, Q, 4) boxes, normalised to the valid image.
            src: (B, S, D) memory; src_valid_ratios (B, L, 2); src_padding_mask (B, S).
            self_attn_mask: (Q, Q) bool, True where query i may not attend to query j; None: all attend.

        Returns:
            hs (n_layers, B, Q, D) and references (n_layers, B, Q, 2 or 4): the reference each layer's
            output refines, i.e. the input of the next layer (detached; with `look_forward_twice` the same
            values still attached to the layer that refined them, while the next layer's input stays detached).
        """
        output = tgt
        intermediate, intermediate_refs = [], []
        for lid, layer in enumerate(self.layers):
            # Valid-image coordinates -> each level's padded coordinates.
            ratios = src_valid_ratios if reference_points.shape[-1] == 2 else torch.cat([src_valid_ratios] * 2, -1)
            reference_points_input = reference_points[:, :, None] * ratios[:, None]  # (B, Q, L, 2 or 4)
            output = layer(
                output,
                query_pos,
                reference_points_input,
                src,
                src_spatial_shapes,
                src_level_start_index,
                src_padding_mask,
                self_attn_mask,
            )
            refined = reference_points
            if self.bbox_embed is not None:
                # Iterative refinement: layer d's head refines layer d-1's box in logit space. The gradient
                # stops at the previous box (detach), as in the paper, to stabilise training.
                delta = self.bbox_embed[lid](output)
                if reference_points.shape[-1] == 4:
                    new_reference_points = (delta + inverse_sigmoid(reference_points)).sigmoid()
                else:
                    new_reference_points = torch.cat(
                        [delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1
                    ).sigmoid()
                reference_points = new_reference_points.detach()
                # Look forward twice: layer d+1's box loss also trains layer d's refinement through this box.
                refined = new_reference_points if self.look_forward_twice else reference_points
            intermediate.append(output)
            intermediate_refs.append(refined)
        return torch.stack(intermediate), torch.stack(intermediate_refs)
