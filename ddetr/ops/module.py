"""`MSDeformAttn`: the multi-scale deformable attention layer, parameter names as in the official release."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ddetr.ops.ms_deform_attn import ms_deform_attn


class MSDeformAttn(nn.Module):
    """Each query attends to `n_points` learned sampling points around its reference on every level.

    Args:
        d_model: channels of queries and values (split over heads).
        n_levels: feature levels L.
        nheads: attention heads M; d_model must divide by it.
        n_points: sampling points P per head and level.
        backend: passed to `ms_deform_attn` (None: the environment's choice).
    """

    def __init__(
        self, d_model: int = 256, n_levels: int = 4, nheads: int = 8, n_points: int = 4, backend: str | None = None
    ) -> None:
        super().__init__()
        if d_model % nheads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by nheads ({nheads})")
        self.d_model, self.n_levels, self.nheads, self.n_points = d_model, n_levels, nheads, n_points
        self.backend = backend
        self.sampling_offsets = nn.Linear(d_model, nheads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, nheads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialisation: offsets start on a ring, one direction per head, point i at radius i+1."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.nheads, dtype=torch.float32) * (2.0 * math.pi / self.nheads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        # Scale each direction so its larger coordinate is 1: the first point lands on a neighbouring pixel.
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid.view(self.nheads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid *= torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from queries to the flattened multi-scale values.

        Args:
            query: (N, Lq, C) queries (content + position).
            reference_points: (N, Lq, L, 2) normalised points (x, y), or (N, Lq, L, 4) boxes (cx, cy, w, h);
                with boxes the offsets are scaled by half the box size.
            input_flatten: (N, S, C) the values before projection, all levels flattened.
            input_spatial_shapes: (L, 2) integer (H, W) per level.
            input_level_start_index: (L,) offset of each level in S.
            input_padding_mask: (N, S) True at padded positions, whose values are zeroed; or None.

        Returns:
            (N, Lq, C).
        """
        N, Lq, _ = query.shape
        S = input_flatten.shape[1]
        M, L, P = self.nheads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, M, self.d_model // M)
        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        weights = F.softmax(self.attention_weights(query).view(N, Lq, M, L * P), -1).view(N, Lq, M, L, P)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: divide by (W, H) to normalise.
            normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"reference_points must end in 2 (points) or 4 (boxes), got shape {tuple(reference_points.shape)}"
            )
        out = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations, weights, self.backend)
        return self.output_proj(out)
