// Memory-layout helpers shared by the CPU and CUDA builds of the BoostLU ops (ATen only, no CUDA headers).
#pragma once
#include <ATen/ATen.h>

namespace bgtrain {

inline bool layout_channels_last(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Output of an elementwise op in the layout of its input, with exactly the strides the fake (meta) kernel in
// library.py promises (empty_like would copy arbitrary strides of size-1 dims).
inline at::Tensor empty_in_layout(const at::Tensor& t) {
  return at::empty(t.sizes(), t.options().memory_format(layout_channels_last(t) ? at::MemoryFormat::ChannelsLast
                                                                                : at::MemoryFormat::Contiguous));
}

// grad and x have the same element order in memory (what the flat elementwise kernels need).
inline void check_same_layout(const at::Tensor& grad, const at::Tensor& x) {
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.dtype() == x.dtype() &&
                  (layout_channels_last(x) ? grad.is_contiguous(at::MemoryFormat::ChannelsLast) : grad.is_contiguous()),
              "boostlu backward: grad must have the shape, dtype and memory layout of x");
}

}  // namespace bgtrain
