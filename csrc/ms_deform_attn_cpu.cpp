// CPU kernels of ddetr::ms_deform_attn_forward / ms_deform_attn_backward.
//
// Layout: value (N, S, M, D) keeps the D channels of one head at one position contiguous, so every bilinear corner
// is one contiguous run of D values; the inner loops run over those channels and are left to the compiler's
// vectoriser (4 corners fused into one pass, so the accumulator is loaded and stored once per point).
// Accumulation is in at::opmath_type (float for float/half/bfloat16, double for double). The channel count of the
// paper's configuration (D = 32: 256 channels over 8 heads) gets its own instantiation with a compile-time trip count,
// which the compiler unrolls into a few full-width vector operations; other D use the same code with a runtime count.
// With AVX2 + FMA, float values of D = 32 take a hand-vectorised path (the second half of this file): 8 points'
// coordinates at a time, and accumulators kept in registers. Every path keeps one fixed summation order, so results
// are reproducible.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DDETR_MSDA_AVX2 1
#endif

#include "ms_deform_attn.h"
#include "ms_deform_attn_math.h"

namespace ddetr {
namespace {

// acc[c] += sum_k w[k] * v[k][c]; outside corners point at a row of zeros with weight 0 so the loop has no branch.
template <int kD, typename scalar_t, typename acc_t>
inline void gather_axpy4(acc_t* __restrict__ acc, const scalar_t* const* v, const acc_t* w, int64_t dynamic_D) {
  const int64_t D = kD > 0 ? kD : dynamic_D;
  const scalar_t* __restrict__ v0 = v[0];
  const scalar_t* __restrict__ v1 = v[1];
  const scalar_t* __restrict__ v2 = v[2];
  const scalar_t* __restrict__ v3 = v[3];
  const acc_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  for (int64_t c = 0; c < D; ++c) {
    acc[c] += w0 * static_cast<acc_t>(v0[c]) + w1 * static_cast<acc_t>(v1[c]) + w2 * static_cast<acc_t>(v2[c]) +
              w3 * static_cast<acc_t>(v3[c]);
  }
}

// dots[k] = <g, v[k]>, and gv[k][c] += w[k] * g[c]: the two channel loops of the backward, fused into one pass.
template <int kD, typename scalar_t, typename acc_t>
inline void dots_and_scatter4(const acc_t* __restrict__ g, const scalar_t* const* v, acc_t* const* gv,
                              const acc_t* w, acc_t* dots, int64_t dynamic_D) {
  const int64_t D = kD > 0 ? kD : dynamic_D;
  const scalar_t* __restrict__ v0 = v[0];
  const scalar_t* __restrict__ v1 = v[1];
  const scalar_t* __restrict__ v2 = v[2];
  const scalar_t* __restrict__ v3 = v[3];
  acc_t* __restrict__ gv0 = gv[0];
  acc_t* __restrict__ gv1 = gv[1];
  acc_t* __restrict__ gv2 = gv[2];
  acc_t* __restrict__ gv3 = gv[3];
  const acc_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  acc_t d0 = 0, d1 = 0, d2 = 0, d3 = 0;
  // The simd reduction lets the compiler split the sums over vector lanes (a fixed order, so still reproducible).
#pragma omp simd reduction(+ : d0, d1, d2, d3)
  for (int64_t c = 0; c < D; ++c) {
    const acc_t gc = g[c];
    d0 += gc * static_cast<acc_t>(v0[c]);
    d1 += gc * static_cast<acc_t>(v1[c]);
    d2 += gc * static_cast<acc_t>(v2[c]);
    d3 += gc * static_cast<acc_t>(v3[c]);
    gv0[c] += w0 * gc;
    gv1[c] += w1 * gc;
    gv2[c] += w2 * gc;
    gv3[c] += w3 * gc;
  }
  dots[0] = d0;
  dots[1] = d1;
  dots[2] = d2;
  dots[3] = d3;
}

// Ask for the cache lines of `bytes` at `ptr` ahead of use.
inline void prefetch_row(const void* ptr, int64_t bytes) {
  const char* p = static_cast<const char*>(ptr);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b);
}

template <typename scalar_t, int kD>
void forward_kernel(const at::Tensor& value, const int64_t* shapes, const int64_t* starts, const at::Tensor& loc,
                    const at::Tensor& attn, at::Tensor& out, const MSDAShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* value_ptr = value.const_data_ptr<scalar_t>();
  const acc_t* loc_ptr = loc.const_data_ptr<acc_t>();
  const acc_t* attn_ptr = attn.const_data_ptr<acc_t>();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  const int64_t MD = s.M * s.D;
  // One row = one query of one image: M * L * P points of 4 * D multiply-adds each.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, s.M * s.L * s.P * s.D));
  at::parallel_for(0, s.N * s.Lq, grain, [&](int64_t begin, int64_t end) {
    const int64_t LP = s.L * s.P;
    std::vector<acc_t> acc(s.D);
    const std::vector<scalar_t> zeros(s.D, scalar_t(0));
    std::vector<const scalar_t*> corners(4 * LP);  // per point of one (query, head): 4 corner rows ...
    std::vector<acc_t> weights(4 * LP);             // ... and their weights, attention included
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / s.Lq;
      for (int64_t m = 0; m < s.M; ++m) {
        // Pass 1: coordinates and corner rows of all L * P points. Pass 2: the channel loops, branch-free.
        const int64_t first_point = (row * s.M + m) * LP;
        for (int64_t l = 0; l < s.L; ++l) {
          const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
          const scalar_t* level = value_ptr + ((n * s.S + starts[l]) * s.M + m) * s.D;
          for (int64_t p = 0; p < s.P; ++p) {
            const int64_t idx = first_point + l * s.P + p;
            const int64_t j = 4 * (l * s.P + p);
            BilinearPoint<acc_t> pt;
            const bool any = bilinear_point(loc_ptr[2 * idx], loc_ptr[2 * idx + 1], H, W, pt);
            const acc_t a = attn_ptr[idx];
            for (int k = 0; k < 4; ++k) {
              const bool inside = any && pt.index[k] >= 0;
              corners[j + k] = inside ? level + pt.index[k] * MD : zeros.data();
              weights[j + k] = inside ? a * pt.weight[k] : acc_t(0);
            }
          }
        }
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < 4 * LP; j += 4) gather_axpy4<kD>(acc.data(), &corners[j], &weights[j], s.D);
        scalar_t* o = out_ptr + (row * s.M + m) * s.D;
        for (int64_t c = 0; c < s.D; ++c) o[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

constexpr int64_t kAhead = 4;  // queries of prefetch distance in the backward

// One task per (image, head): it alone writes grad_value[n, :, m, :], so there are no atomics, no races and the
// summation order is fixed: the result is bitwise reproducible for any number of threads. The price: at most N * M
// threads are busy (16 for the paper's batch of 2 with 8 heads).
template <typename scalar_t, int kD>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& value, const int64_t* shapes,
                     const int64_t* starts, const at::Tensor& loc, const at::Tensor& attn, at::Tensor& grad_value_acc,
                     at::Tensor& grad_loc, at::Tensor& grad_attn, const MSDAShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* value_ptr = value.const_data_ptr<scalar_t>();
  const scalar_t* grad_out_ptr = grad_out.const_data_ptr<scalar_t>();
  const acc_t* loc_ptr = loc.const_data_ptr<acc_t>();
  const acc_t* attn_ptr = attn.const_data_ptr<acc_t>();
  acc_t* gv_ptr = grad_value_acc.mutable_data_ptr<acc_t>();
  const int64_t MD = s.M * s.D;
  acc_t* grad_loc_ptr = grad_loc.mutable_data_ptr<acc_t>();
  acc_t* grad_attn_ptr = grad_attn.mutable_data_ptr<acc_t>();
  at::parallel_for(0, s.N * s.M, 1, [&](int64_t begin, int64_t end) {
    const int64_t LP = s.L * s.P;
    std::vector<acc_t> g(s.D), sink(s.D);
    const std::vector<scalar_t> zeros(s.D, scalar_t(0));
    std::vector<BilinearPoint<acc_t>> points(LP);
    std::vector<char> any(LP);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / s.M, m = task % s.M;
      for (int64_t q = 0; q < s.Lq; ++q) {
        const int64_t first_point = point_index(n, q, m, 0, 0, s.Lq, s.M, s.L, s.P);
        // This task reads and writes the per-point rows of its head only: 1/M of every query's data, a stride the
        // hardware prefetcher loses at each page boundary. Ask for the rows of a query a few steps ahead instead.
        if (q + kAhead < s.Lq) {
          const int64_t ahead = first_point + kAhead * s.M * LP;
          prefetch_row(loc_ptr + 2 * ahead, 2 * LP * sizeof(acc_t));
          prefetch_row(attn_ptr + ahead, LP * sizeof(acc_t));
          prefetch_row(grad_loc_ptr + 2 * ahead, 2 * LP * sizeof(acc_t));
          prefetch_row(grad_attn_ptr + ahead, LP * sizeof(acc_t));
          prefetch_row(grad_out_ptr + ((n * s.Lq + q + kAhead) * s.M + m) * s.D, s.D * sizeof(scalar_t));
        }
        // Pass 1: coordinates of the query's L * P points.
        for (int64_t l = 0; l < s.L; ++l) {
          for (int64_t p = 0; p < s.P; ++p) {
            const int64_t j = l * s.P + p, idx = first_point + j;
            any[j] = bilinear_point(loc_ptr[2 * idx], loc_ptr[2 * idx + 1], shapes[2 * l], shapes[2 * l + 1],
                                    points[j]);
          }
        }
        // Pass 2: the channel loops and the point gradients.
        const scalar_t* go = grad_out_ptr + ((n * s.Lq + q) * s.M + m) * s.D;
        for (int64_t c = 0; c < s.D; ++c) g[c] = static_cast<acc_t>(go[c]);
        for (int64_t l = 0; l < s.L; ++l) {
          const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
          const int64_t level_offset = ((n * s.S + starts[l]) * s.M + m) * s.D;
          for (int64_t p = 0; p < s.P; ++p) {
            const int64_t j = l * s.P + p, idx = first_point + j;
            if (!any[j]) {
              grad_loc_ptr[2 * idx] = grad_loc_ptr[2 * idx + 1] = grad_attn_ptr[idx] = acc_t(0);
              continue;
            }
            const BilinearPoint<acc_t>& pt = points[j];
            const acc_t a = attn_ptr[idx];
            const scalar_t* v[4];
            acc_t* gv[4];
            acc_t w[4], dots[4];
            for (int k = 0; k < 4; ++k) {
              // Outside corners read zeros and scatter into a scratch row that is never read.
              const bool inside = pt.index[k] >= 0;
              v[k] = inside ? value_ptr + level_offset + pt.index[k] * MD : zeros.data();
              gv[k] = inside ? gv_ptr + level_offset + pt.index[k] * MD : sink.data();
              w[k] = a * pt.weight[k];
            }
            dots_and_scatter4<kD>(g.data(), v, gv, w, dots, s.D);
            bilinear_point_grads(pt, dots, a, H, W, grad_attn_ptr[idx], grad_loc_ptr[2 * idx],
                                 grad_loc_ptr[2 * idx + 1]);
          }
        }
      }
    }
  });
}

#if DDETR_MSDA_AVX2
// --- The float fast path (AVX2 + FMA, D a multiple of 8: the paper's D = 32) ---
//
// The points of one (query, head) are laid out structure-of-arrays in chunks of 8, one vector lane per point, so
// their coordinates, corner weights and corner rows are computed 8 at a time by interior_points8, which is right
// for points with all four corners inside their level (nearly all of them, in the encoder). The others (a corner
// outside, a NaN coordinate), and every point of a last chunk shorter than 8, are redone one by one with
// bilinear_point, so every bound, NaN and outside decision stays in the shared header. The channel loops keep a
// (query, head)'s accumulators in registers, and the backward reduces a point's four dot products together.

// float channels of one head, kD / 8 full AVX registers: the fast path of the paper's D = 32.
template <int kD>
struct ChannelOpsAvx2 {
  static constexpr int kV = kD / 8;

  // out[c] = sum_i weights[i] * row_i[c] over `slots` corner rows, row_i = head + offsets[i] (zeros where the
  // offset is -1); the accumulators never leave the registers.
  static inline void gather(float* __restrict__ out, const float* head, const float* zeros, const int64_t* offsets,
                            const float* weights, int64_t slots) {
    __m256 acc[kV];
    for (int i = 0; i < kV; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < slots; ++j) {
      const __m256 w = _mm256_broadcast_ss(weights + j);
      const float* v = offsets[j] >= 0 ? head + offsets[j] : zeros;
      for (int i = 0; i < kV; ++i) acc[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8 * i), acc[i]);
    }
    for (int i = 0; i < kV; ++i) _mm256_storeu_ps(out + 8 * i, acc[i]);
  }

  // dots[k] = <g, v[k]> and gv[k][c] += w[k] * g[c], corner after corner (outside corners share one scratch row,
  // so each corner's scatter is finished before the next one's starts).
  static inline void dots_and_scatter(const __m256* g, const float* const* v, float* const* gv, const float* w,
                                      float* dots) {
    __m256 d[4];
    for (int k = 0; k < 4; ++k) {
      const __m256 wk = _mm256_set1_ps(w[k]);
      float* __restrict__ gvk = gv[k];
      __m256 dk = _mm256_mul_ps(g[0], _mm256_loadu_ps(v[k]));
      for (int i = 1; i < kV; ++i) dk = _mm256_fmadd_ps(g[i], _mm256_loadu_ps(v[k] + 8 * i), dk);
      for (int i = 0; i < kV; ++i) {
        _mm256_storeu_ps(gvk + 8 * i, _mm256_fmadd_ps(wk, g[i], _mm256_loadu_ps(gvk + 8 * i)));
      }
      d[k] = dk;
    }
    // Lane sums of the four dots at once: [d0 d1 d2 d3] in one register after two horizontal adds and a fold.
    const __m256 h01 = _mm256_hadd_ps(d[0], d[1]);
    const __m256 h23 = _mm256_hadd_ps(d[2], d[3]);
    const __m256 h = _mm256_hadd_ps(h01, h23);
    _mm_storeu_ps(dots, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
};

// Per-point constants of one (query, head), point j = l * P + p, widened so that one vector load serves 8 lanes.
struct LaneLevels {
  std::vector<float> H, W, H1, W1;  // the level's height and width, and both minus 1, as floats
  std::vector<int32_t> Wi, start;   // its width, and the position of its first value in S
  std::vector<int64_t> H64, W64;
  explicit LaneLevels(const int64_t* shapes, const int64_t* starts, int64_t L, int64_t P)
      : H(L * P), W(L * P), H1(L * P), W1(L * P), Wi(L * P), start(L * P), H64(L * P), W64(L * P) {
    for (int64_t j = 0; j < L * P; ++j) {
      const int64_t l = j / P;
      H64[j] = shapes[2 * l], W64[j] = shapes[2 * l + 1];
      H[j] = static_cast<float>(H64[j]), W[j] = static_cast<float>(W64[j]);
      H1[j] = H[j] - 1.0f, W1[j] = W[j] - 1.0f;
      Wi[j] = static_cast<int32_t>(W64[j]), start[j] = static_cast<int32_t>(starts[l]);
    }
  }
};

// The fast path's int32 positions and float-exact sizes hold for S < 2^31 and levels under 2^24 a side.
inline bool fits_fast_path(const int64_t* shapes, int64_t L, int64_t S) {
  for (int64_t l = 0; l < L; ++l) {
    if (shapes[2 * l] >= (int64_t(1) << 24) || shapes[2 * l + 1] >= (int64_t(1) << 24)) return false;
  }
  return S < (int64_t(1) << 31);
}

// The points of one (query, head) in chunks of 8 (the last may be shorter): corner k of point j0 + i of the chunk
// of n points from j0 is slot 4 * j0 + k * n + i.
struct PointTable {
  std::vector<int64_t> offset;  // (4 L P) corner row in elements from the head's first value; -1 outside
  std::vector<float> weight;    // (4 L P) bilinear weight of the corner; 0 outside
  std::vector<float> lh, lw;    // (L P) fractional parts of h and w
  std::vector<char> any;        // (L P) whether a corner of the point lies inside
  explicit PointTable(int64_t LP) : offset(4 * LP), weight(4 * LP), lh(LP), lw(LP), any(LP) {}
};

// bilinear_point's arithmetic for 8 points whose four corners all lie inside (the lane-wise 0 <= h < H - 1 and
// 0 <= w < W - 1 are its top, bottom, left and right tests together; h = y * H - 0.5 is fused there by the compiler
// too). Writes every lane, and returns the mask of the lanes it got right: the others (a corner outside, or a NaN
// coordinate) must be written again by bilinear_point.
inline int interior_points8(const float* xy, const LaneLevels& lv, int64_t j0, int64_t MD, PointTable& t) {
  const __m256 lo = _mm256_loadu_ps(xy), hi = _mm256_loadu_ps(xy + 8);  // (x, y) pairs of the 8 points
  const auto gather_lanes = [](__m256 v) {  // x0 x1 x4 x5 | x2 x3 x6 x7 -> x0 ... x7
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), _MM_SHUFFLE(3, 1, 2, 0)));
  };
  const __m256 x = gather_lanes(_mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0)));
  const __m256 y = gather_lanes(_mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1)));
  const __m256 half = _mm256_set1_ps(-0.5f), zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  const __m256 h = _mm256_fmadd_ps(y, _mm256_loadu_ps(&lv.H[j0]), half);
  const __m256 w = _mm256_fmadd_ps(x, _mm256_loadu_ps(&lv.W[j0]), half);
  const __m256 inside = _mm256_and_ps(
      _mm256_and_ps(_mm256_cmp_ps(h, zero, _CMP_GE_OQ), _mm256_cmp_ps(h, _mm256_loadu_ps(&lv.H1[j0]), _CMP_LT_OQ)),
      _mm256_and_ps(_mm256_cmp_ps(w, zero, _CMP_GE_OQ), _mm256_cmp_ps(w, _mm256_loadu_ps(&lv.W1[j0]), _CMP_LT_OQ)));
  const int mask = _mm256_movemask_ps(inside);
  if (mask == 0) return 0;
  const __m256 h_floor = _mm256_floor_ps(h), w_floor = _mm256_floor_ps(w);
  const __m256 lh = _mm256_sub_ps(h, h_floor), lw = _mm256_sub_ps(w, w_floor);
  const __m256 hh = _mm256_sub_ps(one, lh), hw = _mm256_sub_ps(one, lw);
  float* weight = &t.weight[4 * j0];
  _mm256_storeu_ps(weight, _mm256_mul_ps(hh, hw));
  _mm256_storeu_ps(weight + 8, _mm256_mul_ps(hh, lw));
  _mm256_storeu_ps(weight + 16, _mm256_mul_ps(lh, hw));
  _mm256_storeu_ps(weight + 24, _mm256_mul_ps(lh, lw));
  _mm256_storeu_ps(&t.lh[j0], lh);
  _mm256_storeu_ps(&t.lw[j0], lw);
  std::fill(&t.any[j0], &t.any[j0] + 8, char(1));
  // Positions in S of the four corners, then their rows in elements (64-bit: positions times M * D may not fit 32).
  const __m256i Wi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&lv.Wi[j0]));
  const __m256i top_left = _mm256_add_epi32(
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&lv.start[j0])),
      _mm256_add_epi32(_mm256_mullo_epi32(_mm256_cvttps_epi32(h_floor), Wi), _mm256_cvttps_epi32(w_floor)));
  const __m256i one_i = _mm256_set1_epi32(1), MDv = _mm256_set1_epi64x(MD);
  const __m256i corner[4] = {top_left, _mm256_add_epi32(top_left, one_i), _mm256_add_epi32(top_left, Wi),
                             _mm256_add_epi32(_mm256_add_epi32(top_left, Wi), one_i)};
  int64_t* offset = &t.offset[4 * j0];
  for (int k = 0; k < 4; ++k) {
    const __m256i low = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(corner[k]));
    const __m256i high = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(corner[k], 1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(offset + 8 * k), _mm256_mul_epi32(low, MDv));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(offset + 8 * k + 4), _mm256_mul_epi32(high, MDv));
  }
  return mask;
}

// Point i of the chunk of n points from j0, through bilinear_point.
inline void fill_point(const float* xy, const LaneLevels& lv, int64_t j0, int64_t n, int64_t i, int64_t MD,
                       PointTable& t) {
  const int64_t j = j0 + i;
  BilinearPoint<float> pt;
  const bool any = bilinear_point(xy[2 * j], xy[2 * j + 1], lv.H64[j], lv.W64[j], pt);
  t.any[j] = any;
  t.lh[j] = any ? pt.lh : 0.0f;
  t.lw[j] = any ? pt.lw : 0.0f;
  for (int k = 0; k < 4; ++k) {
    const bool inside = any && pt.index[k] >= 0;
    t.offset[4 * j0 + k * n + i] = inside ? (lv.start[j] + pt.index[k]) * MD : -1;
    t.weight[4 * j0 + k * n + i] = inside ? pt.weight[k] : 0.0f;
  }
}

// Fill `t` for the L * P points whose (x, y) pairs start at `xy`.
inline void fill_points(const float* xy, const LaneLevels& lv, int64_t LP, int64_t MD, PointTable& t) {
  for (int64_t j0 = 0; j0 < LP; j0 += 8) {
    const int64_t n = std::min<int64_t>(8, LP - j0);
    const int mask = n == 8 ? interior_points8(xy + 2 * j0, lv, j0, MD, t) : 0;
    if (mask == 0xFF) continue;
    for (int64_t i = 0; i < n; ++i) {
      if (!((mask >> i) & 1)) fill_point(xy, lv, j0, n, i, MD, t);
    }
  }
}

template <int kD>
void forward_kernel_avx2(const at::Tensor& value, const int64_t* shapes, const int64_t* starts, const at::Tensor& loc,
                         const at::Tensor& attn, at::Tensor& out, const MSDAShape& s) {
  const float* value_ptr = value.const_data_ptr<float>();
  const float* loc_ptr = loc.const_data_ptr<float>();
  const float* attn_ptr = attn.const_data_ptr<float>();
  float* out_ptr = out.mutable_data_ptr<float>();
  const int64_t MD = s.M * kD, LP = s.L * s.P;
  const LaneLevels lv(shapes, starts, s.L, s.P);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, s.M * LP * kD));
  at::parallel_for(0, s.N * s.Lq, grain, [&](int64_t begin, int64_t end) {
    PointTable t(LP);
    const std::vector<float> zeros(kD, 0.0f);
    std::vector<float> weights(4 * LP);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / s.Lq;
      for (int64_t m = 0; m < s.M; ++m) {
        const int64_t first_point = (row * s.M + m) * LP;
        fill_points(loc_ptr + 2 * first_point, lv, LP, MD, t);
        for (int64_t j0 = 0; j0 < LP; j0 += 8) {  // corner weights times the point's attention, chunk by chunk
          const int64_t count = std::min<int64_t>(8, LP - j0);
          for (int k = 0; k < 4; ++k) {
            for (int64_t i = 0; i < count; ++i) {
              weights[4 * j0 + k * count + i] = attn_ptr[first_point + j0 + i] * t.weight[4 * j0 + k * count + i];
            }
          }
        }
        const float* head = value_ptr + (n * s.S * s.M + m) * kD;
        ChannelOpsAvx2<kD>::gather(out_ptr + (row * s.M + m) * kD, head, zeros.data(), t.offset.data(),
                                   weights.data(), 4 * LP);
      }
    }
  });
}

// As backward_kernel: one task per (image, head), which alone writes its part of grad_value.
template <int kD>
void backward_kernel_avx2(const at::Tensor& grad_out, const at::Tensor& value, const int64_t* shapes,
                          const int64_t* starts, const at::Tensor& loc, const at::Tensor& attn,
                          at::Tensor& grad_value, at::Tensor& grad_loc, at::Tensor& grad_attn, const MSDAShape& s) {
  const float* value_ptr = value.const_data_ptr<float>();
  const float* grad_out_ptr = grad_out.const_data_ptr<float>();
  const float* loc_ptr = loc.const_data_ptr<float>();
  const float* attn_ptr = attn.const_data_ptr<float>();
  float* gv_ptr = grad_value.mutable_data_ptr<float>();
  float* grad_loc_ptr = grad_loc.mutable_data_ptr<float>();
  float* grad_attn_ptr = grad_attn.mutable_data_ptr<float>();
  const int64_t MD = s.M * kD, LP = s.L * s.P;
  const LaneLevels lv(shapes, starts, s.L, s.P);
  at::parallel_for(0, s.N * s.M, 1, [&](int64_t begin, int64_t end) {
    PointTable t(LP);
    const std::vector<float> zeros(kD, 0.0f);
    std::vector<float> sink(kD);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / s.M, m = task % s.M;
      const float* head = value_ptr + (n * s.S * s.M + m) * kD;
      float* grad_head = gv_ptr + (n * s.S * s.M + m) * kD;
      for (int64_t q = 0; q < s.Lq; ++q) {
        const int64_t first_point = point_index(n, q, m, 0, 0, s.Lq, s.M, s.L, s.P);
        if (q + kAhead < s.Lq) {  // see backward_kernel
          const int64_t ahead = first_point + kAhead * s.M * LP;
          prefetch_row(loc_ptr + 2 * ahead, 2 * LP * sizeof(float));
          prefetch_row(attn_ptr + ahead, LP * sizeof(float));
          prefetch_row(grad_loc_ptr + 2 * ahead, 2 * LP * sizeof(float));
          prefetch_row(grad_attn_ptr + ahead, LP * sizeof(float));
          prefetch_row(grad_out_ptr + ((n * s.Lq + q + kAhead) * s.M + m) * kD, kD * sizeof(float));
        }
        fill_points(loc_ptr + 2 * first_point, lv, LP, MD, t);
        const float* go = grad_out_ptr + ((n * s.Lq + q) * s.M + m) * kD;
        __m256 g[kD / 8];
        for (int i = 0; i < kD / 8; ++i) g[i] = _mm256_loadu_ps(go + 8 * i);
        for (int64_t j = 0; j < LP; ++j) {
          const int64_t idx = first_point + j;
          if (!t.any[j]) {
            grad_loc_ptr[2 * idx] = grad_loc_ptr[2 * idx + 1] = grad_attn_ptr[idx] = 0.0f;
            continue;
          }
          const int64_t j0 = j & ~int64_t(7), count = std::min<int64_t>(8, LP - j0), first_slot = 4 * j0 + (j - j0);
          const float a = attn_ptr[idx];
          BilinearPoint<float> pt;  // what bilinear_point_grads reads: the weights and the fractional parts
          pt.lh = t.lh[j];
          pt.lw = t.lw[j];
          const float* v[4];
          float* gv[4];
          float w[4], dots[4];
          for (int k = 0; k < 4; ++k) {
            const int64_t offset = t.offset[first_slot + k * count];
            pt.weight[k] = t.weight[first_slot + k * count];
            v[k] = offset >= 0 ? head + offset : zeros.data();
            gv[k] = offset >= 0 ? grad_head + offset : sink.data();
            w[k] = a * pt.weight[k];
          }
          ChannelOpsAvx2<kD>::dots_and_scatter(g, v, gv, w, dots);
          bilinear_point_grads(pt, dots, a, lv.H64[j], lv.W64[j], grad_attn_ptr[idx], grad_loc_ptr[2 * idx],
                               grad_loc_ptr[2 * idx + 1]);
        }
      }
    }
  });
}
#endif  // DDETR_MSDA_AVX2

// The level table lies on the host here: check it against S once per call (a direct op call, or one under
// torch.compile, skips the Python check), so an inconsistent table is an error, not an out-of-bounds access.
static void check_levels_on_host(const at::Tensor& shapes, const at::Tensor& starts, const MSDAShape& s) {
  const int64_t* hw = shapes.const_data_ptr<int64_t>();
  const int64_t* start = starts.const_data_ptr<int64_t>();
  for (int64_t l = 0; l < s.L; ++l) {
    TORCH_CHECK(level_fits(hw[2 * l], hw[2 * l + 1], start[l], s.S), "level ", l, " of spatial_shapes (", hw[2 * l],
                " x ", hw[2 * l + 1], ") starting at level_start_index ", start[l], " does not fit in value's S = ", s.S);
  }
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const MSDAShape s =
      check_msda_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const at::Tensor value_c = value.contiguous();
  const at::Tensor shapes = spatial_shapes.to(at::kLong).contiguous();
  const at::Tensor starts = level_start_index.to(at::kLong).contiguous();
  check_levels_on_host(shapes, starts, s);
  const at::Tensor loc = sampling_locations.to(coord_type(value)).contiguous();
  const at::Tensor attn = attention_weights.to(coord_type(value)).contiguous();
  at::Tensor out = at::empty({s.N, s.Lq, s.M * s.D}, value.options());
#if DDETR_MSDA_AVX2
  if (value.scalar_type() == at::kFloat && s.D == 32 && fits_fast_path(shapes.const_data_ptr<int64_t>(), s.L, s.S)) {
    forward_kernel_avx2<32>(value_c, shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(), loc, attn,
                            out, s);
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    const auto run = [&](auto kernel) {
      kernel(value_c, shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(), loc, attn, out, s);
    };
    s.D == 32 ? run(forward_kernel<scalar_t, 32>) : run(forward_kernel<scalar_t, 0>);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    bool /*deterministic: the CPU kernel always is*/) {
  const MSDAShape s =
      check_msda_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({s.N, s.Lq, s.M * s.D}), "grad_output must be (N, Lq, M * D) = (",
              s.N, ", ", s.Lq, ", ", s.M * s.D, "), got ", grad_output.sizes());
  const at::Tensor value_c = value.contiguous();
  const at::Tensor grad_c = grad_output.to(value.scalar_type()).contiguous();
  const at::Tensor shapes = spatial_shapes.to(at::kLong).contiguous();
  const at::Tensor starts = level_start_index.to(at::kLong).contiguous();
  check_levels_on_host(shapes, starts, s);
  const at::ScalarType acc_type = coord_type(value);
  const at::Tensor loc = sampling_locations.to(acc_type).contiguous();
  const at::Tensor attn = attention_weights.to(acc_type).contiguous();
  // Positions that no point reads keep their zero, so grad_value must start zeroed.
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_loc = at::empty(loc.sizes(), loc.options());
  at::Tensor grad_attn = at::empty(attn.sizes(), attn.options());
#if DDETR_MSDA_AVX2
  if (value.scalar_type() == at::kFloat && s.D == 32 && fits_fast_path(shapes.const_data_ptr<int64_t>(), s.L, s.S)) {
    backward_kernel_avx2<32>(grad_c, value_c, shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(), loc,
                             attn, grad_value, grad_loc, grad_attn, s);
    return {grad_value, grad_loc.to(sampling_locations.scalar_type()), grad_attn.to(attention_weights.scalar_type())};
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    const auto run = [&](auto kernel) {
      kernel(grad_c, value_c, shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(), loc, attn,
             grad_value, grad_loc, grad_attn, s);
    };
    s.D == 32 ? run(backward_kernel<scalar_t, 32>) : run(backward_kernel<scalar_t, 0>);
  });
  return {grad_value.to(value.scalar_type()),
          grad_loc.to(sampling_locations.scalar_type()),
          grad_attn.to(attention_weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddetr, CPU, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace ddetr
