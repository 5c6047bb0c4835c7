// Schemas of the ddetr ops. Kernels are registered per dispatch key in ms_deform_attn_cpu.cpp and
// ms_deform_attn_cuda.cu; autograd and the fake (meta) kernels are registered from Python (ddetr/ops/build.py).
#include <torch/library.h>

TORCH_LIBRARY(ddetr, m) {
  // value (N, S, M, D), spatial_shapes (L, 2), level_start_index (L,), sampling_locations (N, Lq, M, L, P, 2),
  // attention_weights (N, Lq, M, L, P) -> (N, Lq, M * D)
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  // -> (grad_value, grad_sampling_locations, grad_attention_weights), shaped and typed like the inputs.
  // deterministic: bitwise reproducible grad_value (the CPU kernel always is; on CUDA it costs a sort).
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, bool deterministic) -> (Tensor, Tensor, Tensor)");
}
