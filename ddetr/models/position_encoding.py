"""Sine position encoding of a feature map, computed from its padding mask (Attention Is All You Need, in 2D)."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine of the row and column index of every valid pixel, at `num_pos_feats` frequencies per axis.

    With `normalize`, indices are rescaled to (0, scale] by the number of valid rows/columns of each image, so
    an image has the same encoding alone as inside a padded batch. Deformable DETR centres the pixels (the
    -0.5 offset) before normalising.

    Args:
        num_pos_feats: features per axis; the output has 2 * num_pos_feats channels (y first, then x).
        temperature: base of the frequency progression.
        normalize: rescale the indices by the valid extent.
        scale: the range after normalisation (2π by default).
    """

    def __init__(
        self, num_pos_feats: int = 64, temperature: float = 10000.0, normalize: bool = False, scale: float | None = None
    ) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask (B, H, W) True at padding -> (B, 2 * num_pos_feats, H, W) float32."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)  # (B, H, W): 1-based row index among valid rows
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t  # (B, H, W, F)
        pos_y = y_embed[:, :, :, None] / dim_t
        # Interleave sin (even features) and cos (odd features).
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
