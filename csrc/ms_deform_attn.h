// Argument checks and shapes shared by the CPU and CUDA registrations of the ddetr::ms_deform_attn_* ops.
//
// The Python function checks its inputs with friendlier messages before calling the op; these checks keep the op
// safe when it is called directly through torch.ops.ddetr.
#pragma once

#include <ATen/ATen.h>

namespace ddetr {

struct MSDAShape {
  int64_t N, S, M, D, Lq, L, P;
};

inline MSDAShape check_msda_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                   const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                   const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2, "spatial_shapes must be (L, 2), got ",
              spatial_shapes.sizes());
  MSDAShape s{value.size(0), value.size(1), value.size(2), value.size(3), 0, spatial_shapes.size(0), 0};
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == s.L, "level_start_index must be (",
              s.L, ",), got ", level_start_index.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6, "sampling_locations must be (N, Lq, M, L, P, 2), got ",
              sampling_locations.sizes());
  s.Lq = sampling_locations.size(1);
  s.P = sampling_locations.size(4);
  TORCH_CHECK(sampling_locations.sizes() == at::IntArrayRef({s.N, s.Lq, s.M, s.L, s.P, 2}),
              "sampling_locations must be (N, Lq, M, L, P, 2) = (", s.N, ", Lq, ", s.M, ", ", s.L, ", P, 2), got ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.sizes() == at::IntArrayRef({s.N, s.Lq, s.M, s.L, s.P}),
              "attention_weights must be (N, Lq, M, L, P) = (", s.N, ", ", s.Lq, ", ", s.M, ", ", s.L, ", ", s.P,
              "), got ", attention_weights.sizes());
  TORCH_CHECK(at::isFloatingType(value.scalar_type()), "value must be floating point, got ", value.scalar_type());
  TORCH_CHECK(at::isFloatingType(sampling_locations.scalar_type()) &&
                  at::isFloatingType(attention_weights.scalar_type()),
              "sampling_locations and attention_weights must be floating point");
  TORCH_CHECK(at::isIntegralType(spatial_shapes.scalar_type(), /*includeBool=*/false) &&
                  at::isIntegralType(level_start_index.scalar_type(), /*includeBool=*/false),
              "spatial_shapes and level_start_index must be integer tensors");
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->device() == value.device(), "all inputs must be on value's device ", value.device(), ", got ",
                t->device());
  }
  return s;
}

// Sampling locations and attention weights are computed in the accumulation type (float, or double for double
// values): bf16 locations would misplace points by a good fraction of a pixel on large maps.
inline at::ScalarType coord_type(const at::Tensor& value) {
  return value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace ddetr
