// CUDA kernels of ddetr::ms_deform_attn_forward / ms_deform_attn_backward (float, double, half, bfloat16).
//
// Work split: a "group" of G threads (a power of two, at most a warp) serves one (image, query, head); each thread
// owns a 16-byte vector of VEC channels (4 floats, 8 halves, 2 doubles), so the corner rows of D contiguous channels
// are read with full-width loads. Coordinates and bilinear weights come from ms_deform_attn_math.h, computed once per
// point by each thread. Accumulation is in at::opmath_type (float, or double); sampling locations and attention
// weights arrive in that type too. When D is not a multiple of VEC or a pointer is not 16-byte aligned, the same
// kernels run with VEC = 1. All offsets are 64-bit and the whole batch is one launch.
//
// Backward: the location and attention-weight gradients of a point are partial sums over the group's channels,
// reduced with warp shuffles in a fixed order (no shared memory, no atomics). grad_value is scattered with fp32 (or
// fp64) atomicAdd into a zeroed buffer and cast afterwards; with deterministic=true it is instead gathered: the
// (point, corner) pairs are stable-sorted by the value row they touch, and one group per value row sums its
// contributions in that fixed order, so the result is bitwise reproducible.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
// c10's stream header rather than ATen/cuda/CUDAContext.h: the latter pulls in cuBLAS and cuSPARSE headers that a
// toolkit with only nvcc and cudart lacks, and the kernels need neither.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ms_deform_attn.h"
#include "ms_deform_attn_math.h"

namespace ddetr {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

template <typename scalar_t, int VEC>
__device__ __forceinline__ Pack<scalar_t, VEC> load_pack(const scalar_t* ptr) {
  return *reinterpret_cast<const Pack<scalar_t, VEC>*>(ptr);
}

// Threads per group: enough vectors to cover D, rounded up to a power of two so groups tile a warp, at most 32.
// Channels beyond G * VEC are handled by `chunks` rounds.
struct GroupShape {
  int G;
  int64_t chunks;
};

inline GroupShape group_shape(int64_t D, int vec) {
  const int64_t vectors = (D + vec - 1) / vec;
  int G = 1;
  while (G < 32 && G < vectors) G *= 2;
  return {G, (vectors + G - 1) / G};
}

inline int64_t blocks_for(int64_t threads) { return (threads + kThreads - 1) / kThreads; }

// One group per (n, q, m, chunk of channels): every output element is written exactly once, so out is not zeroed.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                   const int64_t* __restrict__ starts, const at::opmath_type<scalar_t>* __restrict__ loc,
                   const at::opmath_type<scalar_t>* __restrict__ attn, scalar_t* __restrict__ out, MSDAShape s, int G,
                   int64_t chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t group = tid / G;
  const int64_t lane = tid % G;
  if (group >= s.N * s.Lq * s.M * chunks) return;
  const int64_t nqm = group / chunks;  // (n * Lq + q) * M + m
  const int64_t c0 = ((group % chunks) * G + lane) * VEC;
  if (c0 >= s.D) return;  // no shuffles in the forward: idle lanes may leave
  const int64_t m = nqm % s.M;
  const int64_t n = nqm / (s.M * s.Lq);
  const int64_t MD = s.M * s.D;
  acc_t acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = acc_t(0);
  for (int64_t l = 0; l < s.L; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    const scalar_t* level = value + ((n * s.S + starts[l]) * s.M + m) * s.D + c0;
    for (int64_t p = 0; p < s.P; ++p) {
      const int64_t idx = (nqm * s.L + l) * s.P + p;
      BilinearPoint<acc_t> pt;
      if (!bilinear_point(loc[2 * idx], loc[2 * idx + 1], H, W, pt)) continue;
      const acc_t a = attn[idx];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (pt.index[k] < 0) continue;
        const Pack<scalar_t, VEC> v = load_pack<scalar_t, VEC>(level + pt.index[k] * MD);
        const acc_t wk = a * pt.weight[k];
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += wk * static_cast<acc_t>(v.v[i]);
      }
    }
  }
  Pack<scalar_t, VEC> o;
#pragma unroll
  for (int i = 0; i < VEC; ++i) o.v[i] = static_cast<scalar_t>(acc[i]);
  *reinterpret_cast<Pack<scalar_t, VEC>*>(out + nqm * s.D + c0) = o;
}

// One group per (n, q, m). grad_value_acc is null in deterministic mode (grad_value is then gathered separately).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ value,
                    const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                    const at::opmath_type<scalar_t>* __restrict__ loc, const at::opmath_type<scalar_t>* __restrict__ attn,
                    at::opmath_type<scalar_t>* __restrict__ grad_value_acc, at::opmath_type<scalar_t>* __restrict__ grad_loc,
                    at::opmath_type<scalar_t>* __restrict__ grad_attn, MSDAShape s, int G, int64_t chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t group = tid / G;
  const int lane = static_cast<int>(tid % G);
  // Whole groups leave together; the lanes that stay all take part in the shuffles below.
  if (group >= s.N * s.Lq * s.M) return;
  const int warp_lane = static_cast<int>(threadIdx.x % 32);
  const unsigned mask = G == 32 ? 0xffffffffu : (((1u << G) - 1u) << (warp_lane / G * G));
  const int64_t m = group % s.M;
  const int64_t n = group / (s.M * s.Lq);
  const int64_t MD = s.M * s.D;
  const scalar_t* go = grad_out + group * s.D;
  for (int64_t l = 0; l < s.L; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    const int64_t level_offset = ((n * s.S + starts[l]) * s.M + m) * s.D;
    for (int64_t p = 0; p < s.P; ++p) {
      const int64_t idx = (group * s.L + l) * s.P + p;
      BilinearPoint<acc_t> pt;
      // The same for every lane of the group, so the group stays converged for the shuffles.
      if (!bilinear_point(loc[2 * idx], loc[2 * idx + 1], H, W, pt)) {
        if (lane == 0) grad_loc[2 * idx] = grad_loc[2 * idx + 1] = grad_attn[idx] = acc_t(0);
        continue;
      }
      const acc_t a = attn[idx];
      acc_t dots[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const int64_t c0 = (chunk * G + lane) * VEC;
        if (c0 >= s.D) break;
        const Pack<scalar_t, VEC> g = load_pack<scalar_t, VEC>(go + c0);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (pt.index[k] < 0) continue;
          const int64_t offset = level_offset + pt.index[k] * MD + c0;
          const Pack<scalar_t, VEC> v = load_pack<scalar_t, VEC>(value + offset);
          const acc_t wk = a * pt.weight[k];
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const acc_t gi = static_cast<acc_t>(g.v[i]);
            dots[k] += gi * static_cast<acc_t>(v.v[i]);
            if (grad_value_acc != nullptr) atomicAdd(grad_value_acc + offset + i, wk * gi);
          }
        }
      }
      acc_t ga, gx, gy;
      bilinear_point_grads(pt, dots, a, H, W, ga, gx, gy);
      for (int delta = G / 2; delta > 0; delta /= 2) {
        ga += __shfl_xor_sync(mask, ga, delta);
        gx += __shfl_xor_sync(mask, gx, delta);
        gy += __shfl_xor_sync(mask, gy, delta);
      }
      if (lane == 0) {
        grad_attn[idx] = ga;
        grad_loc[2 * idx] = gx;
        grad_loc[2 * idx + 1] = gy;
      }
    }
  }
}

// Deterministic grad_value, step 1: the value row ((n * S + s) * M + m) that each (point, corner) pair adds to,
// or the sentinel N * S * M (sorted last) for corners outside the map.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    corner_rows_kernel(const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                       const acc_t* __restrict__ loc, int64_t* __restrict__ rows, MSDAShape s) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t points = s.N * s.Lq * s.M * s.L * s.P;
  if (e >= 4 * points) return;
  const int64_t idx = e / 4;
  const int k = static_cast<int>(e % 4);
  const int64_t l = (idx / s.P) % s.L;
  const int64_t m = (idx / (s.P * s.L)) % s.M;
  const int64_t n = idx / (s.P * s.L * s.M * s.Lq);
  BilinearPoint<acc_t> pt;
  const bool any = bilinear_point(loc[2 * idx], loc[2 * idx + 1], shapes[2 * l], shapes[2 * l + 1], pt);
  rows[e] = (any && pt.index[k] >= 0) ? (n * s.S + starts[l] + pt.index[k]) * s.M + m : s.N * s.S * s.M;
}

// Deterministic grad_value, step 2: one group per value row sums its (point, corner) pairs in sorted order and
// writes the row once (rows nobody reads get zeros), in the value's dtype.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    gather_grad_value_kernel(const scalar_t* __restrict__ grad_out, const int64_t* __restrict__ shapes,
                             const at::opmath_type<scalar_t>* __restrict__ loc,
                             const at::opmath_type<scalar_t>* __restrict__ attn, const int64_t* __restrict__ order,
                             const int64_t* __restrict__ segments, scalar_t* __restrict__ grad_value, MSDAShape s,
                             int G, int64_t chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t group = tid / G;
  const int64_t lane = tid % G;
  if (group >= s.N * s.S * s.M * chunks) return;
  const int64_t row = group / chunks;
  const int64_t c0 = ((group % chunks) * G + lane) * VEC;
  if (c0 >= s.D) return;
  acc_t acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = acc_t(0);
  for (int64_t j = segments[row]; j < segments[row + 1]; ++j) {
    const int64_t e = order[j];
    const int64_t idx = e / 4;
    const int k = static_cast<int>(e % 4);
    const int64_t l = (idx / s.P) % s.L;
    BilinearPoint<acc_t> pt;
    bilinear_point(loc[2 * idx], loc[2 * idx + 1], shapes[2 * l], shapes[2 * l + 1], pt);
    const acc_t wk = attn[idx] * pt.weight[k];
    const Pack<scalar_t, VEC> g = load_pack<scalar_t, VEC>(grad_out + idx / (s.L * s.P) * s.D + c0);
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] += wk * static_cast<acc_t>(g.v[i]);
  }
  Pack<scalar_t, VEC> o;
#pragma unroll
  for (int i = 0; i < VEC; ++i) o.v[i] = static_cast<scalar_t>(acc[i]);
  *reinterpret_cast<Pack<scalar_t, VEC>*>(grad_value + row * s.D + c0) = o;
}

inline bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

template <typename scalar_t>
constexpr int vector_width() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const MSDAShape s =
      check_msda_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const at::Tensor value_c = value.contiguous();
  const at::Tensor shapes = spatial_shapes.to(at::kLong).contiguous();
  const at::Tensor starts = level_start_index.to(at::kLong).contiguous();
  const at::Tensor loc = sampling_locations.to(coord_type(value)).contiguous();
  const at::Tensor attn = attention_weights.to(coord_type(value)).contiguous();
  at::Tensor out = at::empty({s.N, s.Lq, s.M * s.D}, value.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = vector_width<scalar_t>();
    const bool vec = s.D % kVec == 0 && aligned16(value_c) && aligned16(out);
    const GroupShape gs = group_shape(s.D, vec ? kVec : 1);
    const int64_t blocks = blocks_for(s.N * s.Lq * s.M * gs.chunks * gs.G);
    auto kernel = vec ? forward_kernel<scalar_t, kVec> : forward_kernel<scalar_t, 1>;
    kernel<<<blocks, kThreads, 0, stream>>>(value_c.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
                                            starts.const_data_ptr<int64_t>(), loc.const_data_ptr<acc_t>(),
                                            attn.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), s, gs.G,
                                            gs.chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    bool deterministic) {
  const MSDAShape s =
      check_msda_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({s.N, s.Lq, s.M * s.D}), "grad_output must be (N, Lq, M * D) = (",
              s.N, ", ", s.Lq, ", ", s.M * s.D, "), got ", grad_output.sizes());
  const c10::cuda::CUDAGuard guard(value.device());
  const at::Tensor value_c = value.contiguous();
  const at::Tensor grad_c = grad_output.to(value.scalar_type()).contiguous();
  const at::Tensor shapes = spatial_shapes.to(at::kLong).contiguous();
  const at::Tensor starts = level_start_index.to(at::kLong).contiguous();
  const at::ScalarType acc_type = coord_type(value);
  const at::Tensor loc = sampling_locations.to(acc_type).contiguous();
  const at::Tensor attn = attention_weights.to(acc_type).contiguous();
  at::Tensor grad_loc = at::empty(loc.sizes(), loc.options());
  at::Tensor grad_attn = at::empty(attn.sizes(), attn.options());
  // Atomics need a zeroed accumulator in the accumulation type; the deterministic gather writes every row itself.
  at::Tensor grad_value_acc = deterministic ? at::Tensor() : at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_value = deterministic ? at::empty(value.sizes(), value.options()) : grad_value_acc;
  if (grad_output.numel() == 0 || value.numel() == 0) {
    return {at::zeros_like(value), at::zeros_like(sampling_locations), at::zeros_like(attention_weights)};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = vector_width<scalar_t>();
    const bool vec = s.D % kVec == 0 && aligned16(value_c) && aligned16(grad_c) &&
                     (deterministic ? aligned16(grad_value) : true);
    const GroupShape gs = group_shape(s.D, vec ? kVec : 1);
    // The group loops over its channel chunks itself: the shuffles need one group per (n, q, m).
    auto kernel = vec ? backward_kernel<scalar_t, kVec> : backward_kernel<scalar_t, 1>;
    kernel<<<blocks_for(s.N * s.Lq * s.M * gs.G), kThreads, 0, stream>>>(
        grad_c.const_data_ptr<scalar_t>(), value_c.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
        starts.const_data_ptr<int64_t>(), loc.const_data_ptr<acc_t>(), attn.const_data_ptr<acc_t>(),
        deterministic ? nullptr : grad_value_acc.mutable_data_ptr<acc_t>(), grad_loc.mutable_data_ptr<acc_t>(),
        grad_attn.mutable_data_ptr<acc_t>(), s, gs.G, gs.chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (deterministic) {
      const int64_t pairs = 4 * s.N * s.Lq * s.M * s.L * s.P;
      at::Tensor rows = at::empty({pairs}, shapes.options());
      if (pairs > 0) {
        corner_rows_kernel<acc_t><<<blocks_for(pairs), kThreads, 0, stream>>>(
            shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(), loc.const_data_ptr<acc_t>(),
            rows.mutable_data_ptr<int64_t>(), s);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      // A stable sort keeps the pairs of one row in their original order: a fixed summation order.
      auto [sorted_rows, order] = at::sort(rows, /*stable=*/true, /*dim=*/0, /*descending=*/false);
      const at::Tensor segments = at::searchsorted(sorted_rows, at::arange(s.N * s.S * s.M + 1, rows.options()));
      const int64_t blocks = blocks_for(s.N * s.S * s.M * gs.chunks * gs.G);
      auto gather = vec ? gather_grad_value_kernel<scalar_t, kVec> : gather_grad_value_kernel<scalar_t, 1>;
      gather<<<blocks, kThreads, 0, stream>>>(grad_c.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
                                              loc.const_data_ptr<acc_t>(), attn.const_data_ptr<acc_t>(),
                                              order.const_data_ptr<int64_t>(), segments.const_data_ptr<int64_t>(),
                                              grad_value.mutable_data_ptr<scalar_t>(), s, gs.G, gs.chunks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_value.to(value.scalar_type()), grad_loc.to(sampling_locations.scalar_type()),
          grad_attn.to(attention_weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddetr, CUDA, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace ddetr
