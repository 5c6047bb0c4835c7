"""Multi-scale deformable attention as explicit gathers and bilinear weights: the formulation that exports.

`ms_deform_attn_gather` computes what `ms_deform_attn_reference` computes, with only integer arithmetic, `Gather`
and multiply-adds: for every sampling point it works out the four neighbouring pixels, their flat indices in S and
their bilinear weights (zero for a neighbour outside the map, the zero padding of `grid_sample`), gathers those
values from the flattened value tensor and sums them. Level sizes stay tensors throughout, so a traced graph reads
them at run time: exported to ONNX it handles any image size. It has no `GridSample`, whose translation by some
runtimes (TensorRT among them) is known to give wrong detections for deformable attention.
"""

from __future__ import annotations

import torch


def ms_deform_attn_gather(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention by gathering the four bilinear neighbours of every point.

    Same arguments and result as `ms_deform_attn_reference`:
        value: (N, S, M, D); spatial_shapes: (L, 2) integer (H, W); level_start_index: (L,) integer;
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y), outside points read zeros;
        attention_weights: (N, Lq, M, L, P).

    Returns:
        (N, Lq, M * D).
    """
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    # One row per (image, head): (N, S, M, D) -> (N*M*S, D), so one flat index picks a value vector.
    flat_value = value.permute(0, 2, 1, 3).reshape(N * M * S, D)
    # (N, Lq, M, L, P) -> (N, M, L, Lq, P): the level axis first, the points of a level contiguous.
    locations = sampling_locations.permute(0, 2, 3, 1, 4, 5)
    weights = attention_weights.permute(0, 2, 3, 1, 4)
    row_base = (torch.arange(N * M, device=value.device) * S).view(N, M, 1, 1)  # first row of each (image, head)
    output = value.new_zeros(N, M, Lq, D)
    for level in range(L):
        H, W = spatial_shapes[level, 0], spatial_shapes[level, 1]
        start = level_start_index[level]
        # align_corners=False: the map's edges are at 0 and 1, pixel centres at (i + 0.5) / W.
        x = locations[:, :, level, :, :, 0] * W.to(value.dtype) - 0.5  # (N, M, Lq, P)
        y = locations[:, :, level, :, :, 1] * H.to(value.dtype) - 0.5
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        x0, y0 = x0.long(), y0.long()
        w_level = weights[:, :, level]  # (N, M, Lq, P)
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dx, wx in ((0, 1 - fx), (1, fx)):
                xi, yi = x0 + dx, y0 + dy
                inside = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
                # Outside neighbours read a clamped (valid) index and get weight zero.
                index = start + yi.clamp(0, H - 1) * W + xi.clamp(0, W - 1)
                rows = (row_base + index).reshape(-1)
                sampled = flat_value.index_select(0, rows).view(N, M, Lq, P, D)
                corner = (wy * wx * w_level).masked_fill(~inside, 0.0)
                output = output + (sampled * corner[..., None]).sum(3)
    # (N, M, Lq, D) -> (N, Lq, M*D)
    return output.permute(0, 2, 1, 3).reshape(N, Lq, M * D)
