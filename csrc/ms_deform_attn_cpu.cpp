// CPU kernels of ddetr::ms_deform_attn_forward / ms_deform_attn_backward.
//
// Layout: value (N, S, M, D) keeps the D channels of one head at one position contiguous, so every bilinear corner
// is one contiguous run of D values; the inner loops run over those channels and are left to the compiler's
// vectoriser (4 corners fused into one pass, so the accumulator is loaded and stored once per point).
// Accumulation is in at::opmath_type (float for float/half/bfloat16, double for double). The channel count of the
// paper's configuration (D = 32: 256 channels over 8 heads) gets its own instantiation with a compile-time trip count,
// which the compiler unrolls into a few full-width vector operations; other D use the same code with a runtime count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

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

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const MSDAShape s =
      check_msda_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const at::Tensor value_c = value.contiguous();
  const at::Tensor shapes = spatial_shapes.to(at::kLong).contiguous();
  const at::Tensor starts = level_start_index.to(at::kLong).contiguous();
  const at::Tensor loc = sampling_locations.to(coord_type(value)).contiguous();
  const at::Tensor attn = attention_weights.to(coord_type(value)).contiguous();
  at::Tensor out = at::empty({s.N, s.Lq, s.M * s.D}, value.options());
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
  const at::ScalarType acc_type = coord_type(value);
  const at::Tensor loc = sampling_locations.to(acc_type).contiguous();
  const at::Tensor attn = attention_weights.to(acc_type).contiguous();
  // Positions that no point reads keep their zero, so grad_value must start zeroed.
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_loc = at::empty(loc.sizes(), loc.options());
  at::Tensor grad_attn = at::empty(attn.sizes(), attn.options());
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
