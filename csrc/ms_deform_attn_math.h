// Per-sample math of multi-scale deformable attention, shared by the CPU and the CUDA kernels.
//
// One sampling point reads a bilinear mix of (up to) four neighbouring values of one level. The convention is
// grid_sample's align_corners=False with zero padding: a normalised location (x, y) in [0, 1] maps to pixel
// coordinates w = x * W - 0.5, h = y * H - 0.5, pixel centres sit at integers, and corners outside the map read 0.
//
// The kernels only move channels around (gather, dot, axpy); every decision about coordinates, bounds, weights and
// their derivatives is made here, once, so what the CPU tests prove about it holds for the GPU code too.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MSDA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MSDA_HOST_DEVICE inline
#endif

namespace ddetr {

// Keeps a parameter out of template argument deduction: the index type follows the BilinearPoint argument.
template <typename T>
struct NonDeduced {
  using type = T;
};

// The four corners of one sampling point, in the order (top-left, top-right, bottom-left, bottom-right).
// index_t is int64_t on the CPU; the CUDA kernels use int32_t, which needs H * W < 2^31 (checked per level there).
template <typename coord_t, typename index_t = int64_t>
struct BilinearPoint {
  index_t index[4];  // flat position y * W + x of each corner inside its level; -1 where the corner is outside
  coord_t weight[4];  // bilinear weight of each corner; 0 where the corner is outside
  coord_t lh, lw;     // fractional parts of h and w (distance from the top-left corner)
};

// Fill `pt` for the normalised location (x, y) on an H x W level. Returns false when no corner lies inside
// the map, in which case the point contributes nothing and has zero gradients; the test is written so that NaN
// and huge coordinates also land here, before any float -> int conversion.
template <typename coord_t, typename index_t>
MSDA_HOST_DEVICE bool bilinear_point(coord_t x, coord_t y, typename NonDeduced<index_t>::type H,
                                     typename NonDeduced<index_t>::type W, BilinearPoint<coord_t, index_t>& pt) {
  const coord_t h = y * static_cast<coord_t>(H) - coord_t(0.5);
  const coord_t w = x * static_cast<coord_t>(W) - coord_t(0.5);
  // A corner at row h_low + 1 is inside iff h >= -1; one at row h_low iff h < H. Same for w.
  if (!(h >= coord_t(-1) && h < static_cast<coord_t>(H) && w >= coord_t(-1) && w < static_cast<coord_t>(W))) {
    return false;
  }
  const coord_t h_floor = std::floor(h);
  const coord_t w_floor = std::floor(w);
  const index_t h_low = static_cast<index_t>(h_floor);
  const index_t w_low = static_cast<index_t>(w_floor);
  const index_t h_high = h_low + 1;
  const index_t w_high = w_low + 1;
  pt.lh = h - h_floor;
  pt.lw = w - w_floor;
  const coord_t hh = coord_t(1) - pt.lh;
  const coord_t hw = coord_t(1) - pt.lw;
  const bool top = h_low >= 0, bottom = h_high < H, left = w_low >= 0, right = w_high < W;
  pt.index[0] = (top && left) ? h_low * W + w_low : -1;
  pt.index[1] = (top && right) ? h_low * W + w_high : -1;
  pt.index[2] = (bottom && left) ? h_high * W + w_low : -1;
  pt.index[3] = (bottom && right) ? h_high * W + w_high : -1;
  pt.weight[0] = pt.index[0] >= 0 ? hh * hw : coord_t(0);
  pt.weight[1] = pt.index[1] >= 0 ? hh * pt.lw : coord_t(0);
  pt.weight[2] = pt.index[2] >= 0 ? pt.lh * hw : coord_t(0);
  pt.weight[3] = pt.index[3] >= 0 ? pt.lh * pt.lw : coord_t(0);
  return true;
}

// Gradients of one point's contribution `attn * sample` to the loss, given `dots[k]` = <grad_output, value at
// corner k> summed over the channels this caller holds (0 for corners outside; linear in the channels, so partial
// results over channel slices may simply be added afterwards).
//   grad_attn = sum_k weight_k * dots_k
//   grad_x    = attn * d(sample)/dw * dw/dx, with dw/dx = W; likewise grad_y with H.
// The derivatives of the corner weights follow from weight_0 = (1 - lh)(1 - lw), weight_1 = (1 - lh) lw,
// weight_2 = lh (1 - lw), weight_3 = lh lw; outside corners have dots_k = 0 and drop out.
template <typename coord_t, typename index_t>
MSDA_HOST_DEVICE void bilinear_point_grads(const BilinearPoint<coord_t, index_t>& pt, const coord_t dots[4],
                                           coord_t attn, typename NonDeduced<index_t>::type H,
                                           typename NonDeduced<index_t>::type W, coord_t& grad_attn,
                                           coord_t& grad_x, coord_t& grad_y) {
  const coord_t hh = coord_t(1) - pt.lh;
  const coord_t hw = coord_t(1) - pt.lw;
  grad_attn = pt.weight[0] * dots[0] + pt.weight[1] * dots[1] + pt.weight[2] * dots[2] + pt.weight[3] * dots[3];
  const coord_t d_dw = hh * (dots[1] - dots[0]) + pt.lh * (dots[3] - dots[2]);
  const coord_t d_dh = hw * (dots[2] - dots[0]) + pt.lw * (dots[3] - dots[1]);
  grad_x = attn * d_dw * static_cast<coord_t>(W);
  grad_y = attn * d_dh * static_cast<coord_t>(H);
}

// Whether a level of H x W positions starting at value row `start` fits in S rows. A level that does not is read
// as empty (no sample, zero gradients): inconsistent spatial_shapes / level_start_index, which only direct op calls
// can pass (the Python checks are skipped there and under torch.compile), then cannot read or write out of bounds.
// Compared in int64 and bounded before the product, so hostile values cannot overflow the test itself.
MSDA_HOST_DEVICE bool level_fits(int64_t H, int64_t W, int64_t start, int64_t S) {
  return H >= 0 && W >= 0 && start >= 0 && H <= S && W <= S && start <= S && H * W <= S - start;
}

// Flat index of one sampling point in (N, Lq, M, L, P): the layout of attention_weights, and of
// sampling_locations without its trailing (x, y).
MSDA_HOST_DEVICE int64_t point_index(int64_t n, int64_t q, int64_t m, int64_t l, int64_t p, int64_t Lq, int64_t M,
                                     int64_t L, int64_t P) {
  return (((n * Lq + q) * M + m) * L + l) * P + p;
}

}  // namespace ddetr
