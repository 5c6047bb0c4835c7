"""Pure-PyTorch multi-scale deformable attention: the oracle and the fallback of the compiled op.

`ms_deform_attn_reference` runs anywhere autograd runs. It samples one feature level at a time with
`grid_sample` and accumulates the weighted samples into the output, so the largest temporary is one level's
samples rather than all levels stacked. `ms_deform_attn_naive` is a per-point loop written from the
definition; it exists only to check the reference in tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention with `grid_sample` (bilinear, zero padding, align_corners=False).

    Args:
        value: (N, S, M, D) values of all levels, flattened level after level.
        spatial_shapes: (L, 2) integer (H, W) of each level.
        level_start_index: (L,) integer offset of each level in S.
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y) in [0, 1]; outside points read zeros.
        attention_weights: (N, Lq, M, L, P).

    Returns:
        (N, Lq, M * D) the attention-weighted sum of the bilinear samples.
    """
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    # grid_sample's align_corners=False maps -1/+1 to the outer pixel edges: x_pix = loc * W - 0.5.
    grids = 2 * sampling_locations - 1
    output = value.new_zeros(N * M, D, Lq)
    for level, ((H, W), start) in enumerate(zip(shapes, starts, strict=True)):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        value_l = value[:, start : start + H * W].permute(0, 2, 3, 1).reshape(N * M, D, H, W)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid_l = grids[:, :, :, level].transpose(1, 2).reshape(N * M, Lq, P, 2)
        sampled = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        # sampled: (N*M, D, Lq, P); weights: (N, Lq, M, P) -> (N*M, 1, Lq, P)
        weights_l = attention_weights[:, :, :, level].transpose(1, 2).reshape(N * M, 1, Lq, P)
        output = output + (sampled * weights_l).sum(-1)
    # (N*M, D, Lq) -> (N, Lq, M*D)
    return output.view(N, M * D, Lq).transpose(1, 2).contiguous()


def ms_deform_attn_naive(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The definition, one sampling point at a time (slow; for tests on tiny shapes only).

    Same arguments and result as `ms_deform_attn_reference`.
    """
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    out = value.new_zeros(N, Lq, M, D)
    for n in range(N):
        for q in range(Lq):
            for m in range(M):
                for level in range(L):
                    H, W = (int(v) for v in spatial_shapes[level])
                    start = int(level_start_index[level])
                    for p in range(P):
                        x, y = sampling_locations[n, q, m, level, p].tolist()
                        w = attention_weights[n, q, m, level, p]
                        out[n, q, m] += w * _bilinear(
                            value[n, start : start + H * W, m], H, W, x * W - 0.5, y * H - 0.5
                        )
    return out.view(N, Lq, M * D)


def _bilinear(v: torch.Tensor, H: int, W: int, x: float, y: float) -> torch.Tensor:
    """Bilinear sample of v (H*W, D) at pixel coordinates (x, y), reading zeros outside the map."""
    x0, y0 = int(torch.floor(torch.tensor(x))), int(torch.floor(torch.tensor(y)))
    fx, fy = x - x0, y - y0
    acc = v.new_zeros(v.shape[-1])
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yy, xx = y0 + dy, x0 + dx
            if 0 <= yy < H and 0 <= xx < W:
                acc = acc + wy * wx * v[yy * W + xx]
    return acc
