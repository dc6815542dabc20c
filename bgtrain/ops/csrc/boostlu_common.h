// Shared declarations of the BoostLU kernels (CPU and CUDA builds).
//
// Semantics follow bgtrain/ops/reference.py bit for bit where the reference rounds:
//   boostlu(x)          = x > 0 ? round(x * alpha) : x            (strict x > 0)
//   boostlu_pool(cam)   = round(sum_hw boostlu(cam) / HW)         (accumulated in fp32, fp64 for double)
//   d boostlu_pool      = g_s = round(g / HW);  grad_cam = cam > 0 ? round(g_s * alpha) : g_s
// where round() is the cast to the tensor dtype, as in the reference's eager autograd. The CUDA kernels divide by
// HW as torch's CUDA kernels do (multiply by the fp32 reciprocal), the CPU kernels as torch's CPU ones (divide).
//
// Sign mask layout (int32 words, bit i of a word = lane i), chosen so that each warp writes one word:
//   contiguous (B,C,H,W):     planes of HW, word[(b*C + c) * ceil(HW/32) + hw/32], bit hw%32
//   channels-last (B,H,W,C):  rows of C,    word[(b*HW + hw) * ceil(C/32) + c/32],  bit c%32
#pragma once
#include <cstdint>

namespace bgtrain {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Number of int32 words of the sign mask for a (B, C, HW) CAM in the given layout.
inline int64_t mask_words(int64_t B, int64_t C, int64_t HW, bool channels_last) {
  return channels_last ? B * HW * ceil_div(C, 32) : B * C * ceil_div(HW, 32);
}

}  // namespace bgtrain
