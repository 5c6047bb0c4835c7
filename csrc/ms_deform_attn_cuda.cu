// CUDA kernels of ddetr::ms_deform_attn_forward / ms_deform_attn_backward (float, double, half, bfloat16).
//
// Work split: a "group" of G threads (a power of two, at most a warp) serves one (image, query, head); each thread
// owns VEC contiguous channels (the widest of 16, 8, 4 or 2 bytes that divides D and the pointers' alignment), so
// the corner rows of D contiguous channels are read with full-width loads. Coordinates and bilinear weights come
// from ms_deform_attn_math.h, computed once per point by each thread. Accumulation is in at::opmath_type (float, or
// double); sampling locations and attention weights arrive in that type too. Offsets inside a level are int32 and
// each level has one 64-bit base; the host checks the sizes that makes safe. The whole batch is one launch.
//
// Per point, a thread computes the corner indices, then issues the (up to) four corner loads before it uses any of
// them: corners outside the map are predicated off rather than branched around, so four loads are in flight.
//
// Every kernel checks each level against S on the device (H, W >= 0, start + H * W <= S): a level that disagrees
// is read as empty (zero output, zero gradients) instead of reading or writing out of bounds. That costs a few
// integer operations per level and no host synchronisation.
//
// Backward: the location and attention-weight gradients of a point are partial sums over the group's channels,
// reduced with warp shuffles in a fixed order (no shared memory, no atomics). grad_value is scattered with atomics
// into a zeroed accumulator and cast afterwards: fp32 vector atomics (float4 / float2, sm_90) for fp32, bf16 and
// fp16, one per corner and 4 channels; fp64 atomics for double. With deterministic=true the accumulator is int64
// fixed point instead: integer addition is associative, so the result does not depend on the order of the atomics
// and is bitwise reproducible. Its scale is a power of two chosen on the device from a bound on every row's sum
// (max|grad_output| * sum|attention_weights|, both deterministic reductions), so nothing overflows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
// c10's stream header rather than ATen/cuda/CUDAContext.h: the latter pulls in cuBLAS and cuSPARSE headers that a
// toolkit with only nvcc and cudart lacks, and the kernels need neither.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cmath>
#include <type_traits>

#include "ms_deform_attn.h"
#include "ms_deform_attn_math.h"

// Blocks of 256 threads the backward must fit per SM: 3 caps it at 80 registers (65536 / 768, rounded down to a
// multiple of 8). Overridable at compile time, e.g. to show the register-budget check fail.
#ifndef MSDA_BACKWARD_MIN_BLOCKS
#define MSDA_BACKWARD_MIN_BLOCKS 3
#endif

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

// A corner's channels, or zeros when the corner is outside: a predicated load, so the four loads of a point can be
// issued back to back (a clamped index would read the next level's first row on an empty level).
template <typename scalar_t, int VEC>
__device__ __forceinline__ Pack<scalar_t, VEC> load_corner(const scalar_t* ptr, bool inside) {
  Pack<scalar_t, VEC> v;
  if (inside) {
    v = load_pack<scalar_t, VEC>(ptr);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) v.v[i] = scalar_t(0);
  }
  return v;
}

// One level as the kernels see it: its shape and first row, or an empty level when these disagree with S.
struct Level {
  int H, W, start;
  bool valid;
};

__device__ __forceinline__ Level read_level(const int64_t* shapes, const int64_t* starts, int l, int64_t S) {
  const int64_t H = shapes[2 * l], W = shapes[2 * l + 1], start = starts[l];
  if (!level_fits(H, W, start, S)) return Level{0, 0, 0, false};
  return Level{static_cast<int>(H), static_cast<int>(W), static_cast<int>(start), true};
}

// grad_value accumulation of one corner: VEC contributions at p (p is VEC-aligned: a fresh buffer, offsets are
// multiples of VEC). fp32 uses sm_90's vector atomics (one REDG.E.ADD.F32x4 per 4 channels, whole sectors).
template <int VEC>
__device__ __forceinline__ void atomic_add_channels(float* p, const float (&c)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      atomicAdd(reinterpret_cast<float4*>(p + i), make_float4(c[i], c[i + 1], c[i + 2], c[i + 3]));
    }
    return;
  } else if constexpr (VEC == 2) {
    atomicAdd(reinterpret_cast<float2*>(p), make_float2(c[0], c[1]));
    return;
  }
#endif
#pragma unroll
  for (int i = 0; i < VEC; ++i) atomicAdd(p + i, c[i]);
}

template <int VEC>
__device__ __forceinline__ void atomic_add_channels(double* p, const double (&c)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) atomicAdd(p + i, c[i]);
}

// Deterministic mode: the contributions in int64 fixed point (scale a power of two, so c * scale is exact and only
// the rounding to an integer is lost); two's-complement sums are exact whatever the order.
template <typename acc_t, int VEC>
__device__ __forceinline__ void atomic_add_channels(unsigned long long* p, const acc_t (&c)[VEC], acc_t scale) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    long long q;
    if constexpr (std::is_same_v<acc_t, double>) {
      q = __double2ll_rn(c[i] * scale);
    } else {
      q = __float2ll_rn(c[i] * scale);
    }
    atomicAdd(p + i, static_cast<unsigned long long>(q));
  }
}

// Fixed-point scale of the deterministic backward, from bound = max|grad_output| * sum|attention_weights| >= every
// row's |sum| and every contribution: 2^shift with |bound| * 2^shift < 2^62. scale[0] = 2^shift, scale[1] = its
// inverse, or NaN when the bound is not finite (a NaN or Inf gradient: the result is then NaN everywhere).
template <typename acc_t>
__global__ void fixed_point_scale_kernel(const acc_t* __restrict__ grad_max, const acc_t* __restrict__ attn_sum,
                                         acc_t* __restrict__ scale) {
  const acc_t bound = grad_max[0] * attn_sum[0];
  if (!isfinite(bound)) {
    scale[0] = acc_t(0);
    scale[1] = acc_t(NAN);
    return;
  }
  int e = 0;
  frexp(bound, &e);  // bound < 2^e
  constexpr int kMaxShift = std::is_same_v<acc_t, double> ? 1022 : 126;  // 2^shift and 2^-shift stay normal
  const int shift = max(-kMaxShift, min(kMaxShift, 62 - e));
  scale[0] = ldexp(acc_t(1), shift);
  scale[1] = ldexp(acc_t(1), -shift);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fixed_point_finish_kernel(const long long* __restrict__ sums, const at::opmath_type<scalar_t>* __restrict__ scale,
                              scalar_t* __restrict__ grad_value, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inverse = scale[1];
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    grad_value[i] = static_cast<scalar_t>(static_cast<acc_t>(sums[i]) * inverse);
  }
}

// Launch geometry shared by host and kernels: G = 1 << log2G threads per group, enough vectors to cover D rounded
// up to a power of two (so groups tile a warp and a block), at most 32; channels beyond G * VEC take `chunks`
// rounds.
struct GroupShape {
  int log2G;
  int chunks;
};

inline GroupShape group_shape(int64_t D, int vec) {
  const int64_t vectors = (D + vec - 1) / vec;
  int log2G = 0;
  while (log2G < 5 && (int64_t{1} << log2G) < vectors) ++log2G;
  return {log2G, static_cast<int>((vectors + (1 << log2G) - 1) >> log2G)};
}

// Sizes, in int32 where the kernels index in int32.
struct Sizes {
  int S, M, D, Lq, L, P, MD, groups;  // groups: N * Lq * M for the backward, times chunks for the forward
};

// One group per (n, q, m, chunk of channels): every output element is written exactly once, so out is not zeroed.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                   const int64_t* __restrict__ starts, const at::opmath_type<scalar_t>* __restrict__ loc,
                   const at::opmath_type<scalar_t>* __restrict__ attn, scalar_t* __restrict__ out, Sizes z, int log2G,
                   int chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  const int group = static_cast<int>(blockIdx.x) * (kThreads >> log2G) + static_cast<int>(threadIdx.x >> log2G);
  if (group >= z.groups) return;
  const int lane = static_cast<int>(threadIdx.x) & ((1 << log2G) - 1);
  const int nqm = group / chunks;  // (n * Lq + q) * M + m
  const int c0 = (((group - nqm * chunks) << log2G) + lane) * VEC;
  if (c0 >= z.D) return;  // no shuffles in the forward: idle lanes may leave
  const int m = nqm % z.M;
  const int n = nqm / (z.M * z.Lq);
  const int64_t first_point = static_cast<int64_t>(nqm) * (z.L * z.P);
  const acc_t* loc_g = loc + 2 * first_point;
  const acc_t* attn_g = attn + first_point;
  const scalar_t* value_nm = value + (static_cast<int64_t>(n) * z.S * z.M + m) * z.D + c0;
  acc_t acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = acc_t(0);
  for (int l = 0; l < z.L; ++l) {
    const Level lv = read_level(shapes, starts, l, z.S);
    for (int p = 0; p < z.P; ++p) {
      const int j = l * z.P + p;
      BilinearPoint<acc_t, int> pt;
      if (!lv.valid || !bilinear_point<acc_t, int>(loc_g[2 * j], loc_g[2 * j + 1], lv.H, lv.W, pt)) continue;
      const acc_t a = attn_g[j];
      Pack<scalar_t, VEC> v[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        v[k] = load_corner<scalar_t, VEC>(value_nm + static_cast<int64_t>(lv.start + max(pt.index[k], 0)) * z.MD,
                                          pt.index[k] >= 0);
      }
      const acc_t w0 = a * pt.weight[0], w1 = a * pt.weight[1], w2 = a * pt.weight[2], w3 = a * pt.weight[3];
      // One expression per channel over the four corners: its first use needs all four loads, so they are issued
      // together rather than each right before its own multiply-adds.
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        acc[i] += w0 * static_cast<acc_t>(v[0].v[i]) + w1 * static_cast<acc_t>(v[1].v[i]) +
                  w2 * static_cast<acc_t>(v[2].v[i]) + w3 * static_cast<acc_t>(v[3].v[i]);
      }
    }
  }
  Pack<scalar_t, VEC> o;
#pragma unroll
  for (int i = 0; i < VEC; ++i) o.v[i] = static_cast<scalar_t>(acc[i]);
  *reinterpret_cast<Pack<scalar_t, VEC>*>(out + static_cast<int64_t>(nqm) * z.D + c0) = o;
}

// One group per (n, q, m). grad_value_acc has value's shape: acc_t for the atomic path, int64 fixed point (scaled by
// scale[0]) when kFixed.
template <typename scalar_t, int VEC, bool kFixed>
__global__ void __launch_bounds__(kThreads, MSDA_BACKWARD_MIN_BLOCKS)
    backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ value,
                    const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                    const at::opmath_type<scalar_t>* __restrict__ loc,
                    const at::opmath_type<scalar_t>* __restrict__ attn,
                    std::conditional_t<kFixed, unsigned long long, at::opmath_type<scalar_t>>* __restrict__
                        grad_value_acc,
                    const at::opmath_type<scalar_t>* __restrict__ scale,
                    at::opmath_type<scalar_t>* __restrict__ grad_loc, at::opmath_type<scalar_t>* __restrict__ grad_attn,
                    Sizes z, int log2G, int chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  const int group = static_cast<int>(blockIdx.x) * (kThreads >> log2G) + static_cast<int>(threadIdx.x >> log2G);
  // Whole groups leave together (groups tile the block); the lanes that stay all take part in the shuffles below.
  if (group >= z.groups) return;
  const int G = 1 << log2G;
  const int lane = static_cast<int>(threadIdx.x) & (G - 1);
  const unsigned mask = G == 32 ? 0xffffffffu : (((1u << G) - 1u) << (static_cast<int>(threadIdx.x) & 31 & ~(G - 1)));
  const int m = group % z.M;
  const int n = group / (z.M * z.Lq);
  const int64_t first_point = static_cast<int64_t>(group) * (z.L * z.P);
  const acc_t* loc_g = loc + 2 * first_point;
  const acc_t* attn_g = attn + first_point;
  acc_t* grad_loc_g = grad_loc + 2 * first_point;
  acc_t* grad_attn_g = grad_attn + first_point;
  const scalar_t* go = grad_out + static_cast<int64_t>(group) * z.D;
  const int64_t nm_offset = (static_cast<int64_t>(n) * z.S * z.M + m) * z.D;  // row (n, 0, m) of value
  acc_t fixed_scale = acc_t(0);
  if constexpr (kFixed) fixed_scale = scale[0];
  for (int l = 0; l < z.L; ++l) {
    const Level lv = read_level(shapes, starts, l, z.S);
    for (int p = 0; p < z.P; ++p) {
      const int j = l * z.P + p;
      BilinearPoint<acc_t, int> pt;
      // The same for every lane of the group, so the group stays converged for the shuffles.
      if (!lv.valid || !bilinear_point<acc_t, int>(loc_g[2 * j], loc_g[2 * j + 1], lv.H, lv.W, pt)) {
        if (lane == 0) grad_loc_g[2 * j] = grad_loc_g[2 * j + 1] = grad_attn_g[j] = acc_t(0);
        continue;
      }
      const acc_t a = attn_g[j];
      int64_t corner[4];  // offset of each corner's row (n, start + index, m) in value and grad_value_acc
#pragma unroll
      for (int k = 0; k < 4; ++k) corner[k] = nm_offset + static_cast<int64_t>(lv.start + max(pt.index[k], 0)) * z.MD;
      acc_t dots[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      for (int chunk = 0; chunk < chunks; ++chunk) {
        const int c0 = ((chunk << log2G) + lane) * VEC;
        if (c0 >= z.D) break;
        const Pack<scalar_t, VEC> g = load_pack<scalar_t, VEC>(go + c0);
        Pack<scalar_t, VEC> v[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) v[k] = load_corner<scalar_t, VEC>(value + corner[k] + c0, pt.index[k] >= 0);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const acc_t wk = a * pt.weight[k];
          acc_t contribution[VEC];
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const acc_t gi = static_cast<acc_t>(g.v[i]);
            dots[k] += gi * static_cast<acc_t>(v[k].v[i]);
            contribution[i] = wk * gi;
          }
          if (pt.index[k] >= 0) {
            if constexpr (kFixed) {
              atomic_add_channels<acc_t, VEC>(grad_value_acc + corner[k] + c0, contribution, fixed_scale);
            } else {
              atomic_add_channels<VEC>(grad_value_acc + corner[k] + c0, contribution);
            }
          }
        }
      }
      acc_t ga, gx, gy;
      bilinear_point_grads<acc_t, int>(pt, dots, a, lv.H, lv.W, ga, gx, gy);
      for (int delta = G >> 1; delta > 0; delta >>= 1) {
        ga += __shfl_xor_sync(mask, ga, delta);
        gx += __shfl_xor_sync(mask, gx, delta);
        gy += __shfl_xor_sync(mask, gy, delta);
      }
      if (lane == 0) {
        grad_attn_g[j] = ga;
        grad_loc_g[2 * j] = gx;
        grad_loc_g[2 * j + 1] = gy;
      }
    }
  }
}

inline bool aligned(const at::Tensor& t, size_t bytes) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % bytes == 0;
}

// The widest VEC (channels per thread, at most 16 bytes) that divides D and keeps every pointer aligned; offsets
// are multiples of D, so the bases decide.
template <typename scalar_t>
int pick_vector_width(int64_t D, std::initializer_list<const at::Tensor*> tensors) {
  for (int vec = static_cast<int>(16 / sizeof(scalar_t)); vec > 1; vec /= 2) {
    bool ok = D % vec == 0;
    for (const at::Tensor* t : tensors) ok = ok && aligned(*t, vec * sizeof(scalar_t));
    if (ok) return vec;
  }
  return 1;
}

// Calls f(std::integral_constant<int, VEC>) for the VEC chosen at run time.
template <typename scalar_t, typename F>
void dispatch_vector_width(int vec, F&& f) {
  constexpr int kMax = static_cast<int>(16 / sizeof(scalar_t));
  switch (vec) {
    case 8:
      if constexpr (kMax >= 8) return f(std::integral_constant<int, 8>{});
      break;
    case 4:
      if constexpr (kMax >= 4) return f(std::integral_constant<int, 4>{});
      break;
    case 2:
      return f(std::integral_constant<int, 2>{});
    default:
      break;
  }
  f(std::integral_constant<int, 1>{});
}

// Host-side size checks that make the kernels' int32 indexing safe (any realistic input passes them).
Sizes kernel_sizes(const MSDAShape& s, int64_t groups) {
  TORCH_CHECK(s.N * s.S * s.M < INT_MAX && s.M * s.D < INT_MAX && s.L * s.P < INT_MAX && groups < INT_MAX,
              "ms_deform_attn on CUDA indexes rows and groups in int32: N * S * M (", s.N * s.S * s.M,
              "), M * D, L * P and N * Lq * M * chunks (", groups, ") must stay below 2^31; split the batch");
  // Every thread of the last block computes its group index before the bounds test, up to a block past `groups`.
  TORCH_CHECK(groups <= INT_MAX - kThreads, "ms_deform_attn on CUDA indexes groups in int32: N * Lq * M * chunks (",
              groups, ") must stay at most 2^31 - 1 - ", kThreads, " (a block of headroom); split the batch");
  return {static_cast<int>(s.S), static_cast<int>(s.M), static_cast<int>(s.D), static_cast<int>(s.Lq),
          static_cast<int>(s.L), static_cast<int>(s.P), static_cast<int>(s.M * s.D), static_cast<int>(groups)};
}

inline unsigned blocks_for(int64_t threads) {
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= INT_MAX, "ms_deform_attn on CUDA: ", blocks, " blocks exceed the grid limit");
  return static_cast<unsigned>(blocks);
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
    const int vec = pick_vector_width<scalar_t>(s.D, {&value_c, &out});
    dispatch_vector_width<scalar_t>(vec, [&](auto vec_c) {
      constexpr int kVec = decltype(vec_c)::value;
      const GroupShape gs = group_shape(s.D, kVec);
      const Sizes z = kernel_sizes(s, s.N * s.Lq * s.M * gs.chunks);
      forward_kernel<scalar_t, kVec><<<blocks_for(int64_t{z.groups} << gs.log2G), kThreads, 0, stream>>>(
          value_c.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
          loc.const_data_ptr<acc_t>(), attn.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), z, gs.log2G,
          gs.chunks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
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
  TORCH_CHECK(grad_output.device() == value.device(), "grad_output must be on value's device ", value.device(),
              ", got ", grad_output.device());
  if (grad_output.numel() == 0 || value.numel() == 0) {
    // Contiguous like the kernel's results (and the fake kernel's), whatever the inputs' strides.
    return {at::zeros(value.sizes(), value.options()),
            at::zeros(sampling_locations.sizes(), sampling_locations.options()),
            at::zeros(attention_weights.sizes(), attention_weights.options())};
  }
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
  // Atomics need a zeroed accumulator: acc_t, or int64 fixed point in deterministic mode.
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(deterministic ? at::kLong : acc_type));
  at::Tensor grad_value = grad_value_acc;
  at::Tensor scale;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (deterministic) {
      // Reductions without temporaries of grad_output's size, and without a host synchronisation.
      const at::Tensor grad_max = at::linalg_vector_norm(grad_c, INFINITY, {}, false, acc_type);
      const at::Tensor attn_sum = at::linalg_vector_norm(attn, 1, {}, false, acc_type);
      scale = at::empty({2}, attn.options());
      fixed_point_scale_kernel<acc_t><<<1, 1, 0, stream>>>(
          grad_max.const_data_ptr<acc_t>(), attn_sum.const_data_ptr<acc_t>(), scale.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int vec = pick_vector_width<scalar_t>(s.D, {&value_c, &grad_c});
    dispatch_vector_width<scalar_t>(vec, [&](auto vec_c) {
      constexpr int kVec = decltype(vec_c)::value;
      const GroupShape gs = group_shape(s.D, kVec);
      // The group loops over its channel chunks itself: the shuffles need one group per (n, q, m).
      const Sizes z = kernel_sizes(s, s.N * s.Lq * s.M);
      const unsigned blocks = blocks_for(int64_t{z.groups} << gs.log2G);
      if (deterministic) {
        backward_kernel<scalar_t, kVec, true><<<blocks, kThreads, 0, stream>>>(
            grad_c.const_data_ptr<scalar_t>(), value_c.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
            starts.const_data_ptr<int64_t>(), loc.const_data_ptr<acc_t>(), attn.const_data_ptr<acc_t>(),
            reinterpret_cast<unsigned long long*>(grad_value_acc.mutable_data_ptr<int64_t>()),
            scale.const_data_ptr<acc_t>(), grad_loc.mutable_data_ptr<acc_t>(), grad_attn.mutable_data_ptr<acc_t>(), z,
            gs.log2G, gs.chunks);
      } else {
        backward_kernel<scalar_t, kVec, false><<<blocks, kThreads, 0, stream>>>(
            grad_c.const_data_ptr<scalar_t>(), value_c.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
            starts.const_data_ptr<int64_t>(), loc.const_data_ptr<acc_t>(), attn.const_data_ptr<acc_t>(),
            grad_value_acc.mutable_data_ptr<acc_t>(), nullptr, grad_loc.mutable_data_ptr<acc_t>(),
            grad_attn.mutable_data_ptr<acc_t>(), z, gs.log2G, gs.chunks);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (deterministic) {
      grad_value = at::empty(value.sizes(), value.options());
      const int64_t n = grad_value.numel();
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65536));
      fixed_point_finish_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          reinterpret_cast<const long long*>(grad_value_acc.const_data_ptr<int64_t>()), scale.const_data_ptr<acc_t>(),
          grad_value.mutable_data_ptr<scalar_t>(), n);
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
