"""The deformable encoder: every pixel of every level attends to a few sampled points around itself on all levels."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ddetr.ops import MSDeformAttn


class DeformableTransformerEncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then a ReLU FFN; post-norm."""

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
        self.self_attn = MSDeformAttn(d_model, num_feature_levels, nheads, n_points, backend=msda_backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor,
    ) -> torch.Tensor:
        """src, pos (B, S, D); reference_points (B, S, L, 2); padding_mask (B, S) -> (B, S, D)."""
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


class DeformableTransformerEncoder(nn.Module):
    """A stack of encoder layers; every pixel attends around its own position on every level."""

    def __init__(self, layer: DeformableTransformerEncoderLayer, num_layers: int, checkpointing: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.checkpointing = checkpointing

    @staticmethod
    def get_reference_points(level_shapes: list[tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
        """Pixel centres of every level as reference points for every level.

        Args:
            level_shapes: (H, W) per level, as numbers (symbolic ones while torch.export traces).
            valid_ratios: (B, L, 2) valid fraction (w, h) of each level.

        Returns:
            (B, S, L, 2) normalised (x, y): a centre normalised by its own level's valid extent, then
            expressed in each level's padded coordinates, so padding never shifts where a pixel looks.
        """
        refs = []
        for lvl, (H, W) in enumerate(level_shapes):
            # arange + 0.5 equals linspace(0.5, H - 0.5, H) exactly, and takes a symbolic H.
            ref_y, ref_x = torch.meshgrid(
                torch.arange(H, dtype=torch.float32, device=valid_ratios.device) + 0.5,
                torch.arange(W, dtype=torch.float32, device=valid_ratios.device) + 0.5,
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * H)  # (B, H*W)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * W)
            refs.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(refs, 1)  # (B, S, 2)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(
        self,
        src: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        pos: torch.Tensor,
        padding_mask: torch.Tensor,
        level_shapes: list[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """src, pos (B, S, D); padding_mask (B, S) -> memory (B, S, D).

        level_shapes: spatial_shapes as numbers, when the caller has them from the maps' own shapes (then a graph
        that torch.export traces keeps them symbolic: any image size); None reads them from spatial_shapes.
        """
        if level_shapes is None:
            level_shapes = [tuple(hw) for hw in spatial_shapes.tolist()]
        reference_points = self.get_reference_points(level_shapes, valid_ratios)
        output = src
        for layer in self.layers:
            args = (output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
            if self.checkpointing and self.training and torch.is_grad_enabled():
                # Recompute the layer in backward: the encoder's (B, S, D) activations dominate memory.
                output = checkpoint(layer, *args, use_reentrant=False)
            else:
                output = layer(*args)
        return output
