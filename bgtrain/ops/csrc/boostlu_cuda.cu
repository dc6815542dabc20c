// CUDA kernels of BoostLU and BoostLU+GAP. See boostlu_common.h for the exact semantics and the mask layout.
//
// boostlu_pool saves a 1-bit sign mask for its backward instead of the CAM: the CAM is the output of the 1x1
// classifier conv, whose own backward needs the conv input and weight, not the CAM, so keeping the CAM alive would
// cost B*C*HW elements of memory (125 MB in bf16 at 64x5000x14x14) only for this op. The mask is 1/16 of that in
// bf16 and the backward then reads 1/8 byte per element instead of 2.
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h): those pull in cuBLAS/cuSPARSE headers, which a
// minimal CUDA toolkit lacks, and they slow the build down.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <tuple>

#include "boostlu_common.h"
#include "boostlu_layout.h"

namespace bgtrain {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarpsPerBlock = 8;    // NCHW kernels: one warp per (b, c) plane
constexpr int kUnroll = 8;           // NCHW kernels: 8 x 32 = 256 >= 196 elements in flight per warp
constexpr int kRowsPerBlock = 8;     // NHWC kernels: block = 32 channels x 8 spatial rows

// Boosted value as the reference computes it: the product is rounded to the tensor dtype before the sum.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t boosted(scalar_t v, acc_t alpha) {
  const acc_t a = static_cast<acc_t>(v);
  return a > acc_t(0) ? static_cast<acc_t>(static_cast<scalar_t>(a * alpha)) : a;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(kFull, v, off);
  return v;
}

// Contiguous CAM: one warp reduces one (b, c) plane of HW contiguous elements; lane l of step s owns hw = 32 s + l.
template <typename scalar_t, typename acc_t>
__global__ void pool_fwd_nchw(const scalar_t* __restrict__ cam, scalar_t* __restrict__ out,
                              uint32_t* __restrict__ mask, int64_t planes, int hw, int words, acc_t alpha) {
  const int lane = threadIdx.x & 31;
  const int64_t plane = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (plane >= planes) return;  // warp-uniform
  const scalar_t* p = cam + plane * hw;
  acc_t acc = acc_t(0);
  for (int chunk = 0; chunk < hw; chunk += 32 * kUnroll) {
    scalar_t v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // issue every load before using any (memory-level parallelism)
      const int i = chunk + u * 32 + lane;
      v[u] = i < hw ? p[i] : scalar_t(0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int base = chunk + u * 32;
      if (base >= hw) break;  // warp-uniform
      acc += boosted(v[u], alpha);
      if (mask != nullptr) {
        const unsigned bits = __ballot_sync(kFull, static_cast<acc_t>(v[u]) > acc_t(0));
        if (lane == 0) mask[plane * words + base / 32] = bits;
      }
    }
  }
  acc = warp_sum(acc);
  if (lane == 0) out[plane] = static_cast<scalar_t>(acc * (acc_t(1) / static_cast<acc_t>(hw)));
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void grad_pair(scalar_t g, int hw, acc_t alpha, scalar_t& plain, scalar_t& boost) {
  // The reference's mean backward rounds g / HW to the dtype, then the where/mul backward rounds g_s * alpha.
  // torch's CUDA kernels divide by a scalar as a multiply by its reciprocal; do the same to round identically.
  plain = static_cast<scalar_t>(static_cast<acc_t>(g) * (acc_t(1) / static_cast<acc_t>(hw)));
  boost = static_cast<scalar_t>(static_cast<acc_t>(plain) * alpha);
}

template <typename scalar_t, typename acc_t>
__global__ void pool_bwd_nchw(const scalar_t* __restrict__ grad, const uint32_t* __restrict__ mask,
                              scalar_t* __restrict__ out, int64_t planes, int hw, int words, acc_t alpha) {
  const int lane = threadIdx.x & 31;
  const int64_t plane = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (plane >= planes) return;
  scalar_t plain, boost;
  grad_pair<scalar_t, acc_t>(grad[plane], hw, alpha, plain, boost);
  scalar_t* o = out + plane * hw;
  const uint32_t* m = mask + plane * words;
  for (int base = lane; base - lane < hw; base += 32) {
    const uint32_t bits = __ldg(m + (base - lane) / 32);  // same word for the whole warp: one broadcast load
    if (base < hw) o[base] = ((bits >> lane) & 1u) ? boost : plain;
  }
}

// Channels-last CAM, memory (B, HW, C): a block owns 32 consecutive channels of one image; lanes run along c, so
// every load is coalesced, and the 8 warps split HW and meet in shared memory.
template <typename scalar_t, typename acc_t>
__global__ void pool_fwd_nhwc(const scalar_t* __restrict__ cam, scalar_t* __restrict__ out,
                              uint32_t* __restrict__ mask, int C, int hw, int cwords, acc_t alpha) {
  __shared__ acc_t partial[kRowsPerBlock][32];
  const int lane = threadIdx.x, row = threadIdx.y;
  const int c = blockIdx.x * 32 + lane;
  const int64_t b = blockIdx.y;
  const bool valid = c < C;
  const scalar_t* p = cam + b * hw * static_cast<int64_t>(C) + c;
  acc_t acc = acc_t(0);
#pragma unroll 4
  for (int s = row; s < hw; s += kRowsPerBlock) {  // bounds are warp-uniform: the ballot below sees 32 lanes
    const scalar_t v = valid ? p[static_cast<int64_t>(s) * C] : scalar_t(0);
    acc += boosted(v, alpha);
    if (mask != nullptr) {
      const unsigned bits = __ballot_sync(kFull, static_cast<acc_t>(v) > acc_t(0));
      if (lane == 0) mask[(b * hw + s) * cwords + blockIdx.x] = bits;
    }
  }
  partial[row][lane] = acc;
  __syncthreads();
  if (row == 0) {
#pragma unroll
    for (int r = 1; r < kRowsPerBlock; ++r) acc += partial[r][lane];
    if (valid) out[b * C + c] = static_cast<scalar_t>(acc * (acc_t(1) / static_cast<acc_t>(hw)));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void pool_bwd_nhwc(const scalar_t* __restrict__ grad, const uint32_t* __restrict__ mask,
                              scalar_t* __restrict__ out, int C, int hw, int cwords, acc_t alpha) {
  const int lane = threadIdx.x, row = threadIdx.y;
  const int c = blockIdx.x * 32 + lane;
  const int64_t b = blockIdx.y;
  if (c >= C) return;
  scalar_t plain, boost;
  grad_pair<scalar_t, acc_t>(grad[b * C + c], hw, alpha, plain, boost);
  scalar_t* o = out + b * hw * static_cast<int64_t>(C) + c;
#pragma unroll 4
  for (int s = row; s < hw; s += kRowsPerBlock) {
    const uint32_t bits = __ldg(mask + (b * hw + s) * cwords + blockIdx.x);
    o[static_cast<int64_t>(s) * C] = ((bits >> lane) & 1u) ? boost : plain;
  }
}

// Elementwise BoostLU over the dense storage of x (any dense layout: the op is position-independent).
template <typename scalar_t, typename acc_t>
__global__ void boostlu_fwd_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t n, acc_t alpha) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc_t a = static_cast<acc_t>(x[i]);
    y[i] = a > acc_t(0) ? static_cast<scalar_t>(a * alpha) : x[i];
  }
}

template <typename scalar_t, typename acc_t>
__global__ void boostlu_bwd_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                   scalar_t* __restrict__ gx, int64_t n, acc_t alpha) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    gx[i] = static_cast<acc_t>(x[i]) > acc_t(0) ? static_cast<scalar_t>(static_cast<acc_t>(g[i]) * alpha) : g[i];
  }
}

void check_dense(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_cuda(), "bgtrain boostlu CUDA op: ", what, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous() || (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)),
              "bgtrain boostlu CUDA op: ", what, " must be contiguous or channels-last (bgtrain/ops/library.py "
              "normalises layouts before calling the extension)");
}

int elementwise_blocks(int64_t n, int threads) {
  const int64_t want = ceil_div(n, threads);
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t cap = static_cast<int64_t>(sms) * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min(want, cap)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pool_forward_cuda(const at::Tensor& cam, double alpha, bool save_mask) {
  TORCH_CHECK(cam.dim() == 4, "boostlu_pool: expected a (B, C, H, W) CAM, got shape ", cam.sizes());
  check_dense(cam, "cam");
  const c10::cuda::CUDAGuard guard(cam.device());
  const int64_t B = cam.size(0), C = cam.size(1), HW = cam.size(2) * cam.size(3);
  TORCH_CHECK(HW < (int64_t{1} << 31) && C < (int64_t{1} << 31), "boostlu_pool: H*W and C must fit in int32");
  const bool cl = layout_channels_last(cam);
  TORCH_CHECK(!cl || B <= 65535, "boostlu_pool CUDA: batch ", B, " > 65535 (grid.y limit of the channels-last kernel)");
  auto out = at::empty({B, C}, cam.options());
  auto mask = at::empty({save_mask ? mask_words(B, C, HW, cl) : 0}, cam.options().dtype(at::kInt));
  if (B * C == 0) return {out, mask};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cam.scalar_type(), "boostlu_pool_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    uint32_t* mptr = save_mask ? reinterpret_cast<uint32_t*>(mask.data_ptr<int32_t>()) : nullptr;
    if (!cl) {
      const int64_t planes = B * C;
      const int64_t blocks = ceil_div(planes, kWarpsPerBlock);
      pool_fwd_nchw<scalar_t, acc_t><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(
          cam.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), mptr, planes, static_cast<int>(HW),
          static_cast<int>(ceil_div(HW, 32)), static_cast<acc_t>(alpha));
    } else {
      const dim3 grid(static_cast<unsigned>(ceil_div(C, 32)), static_cast<unsigned>(B));
      pool_fwd_nhwc<scalar_t, acc_t><<<grid, dim3(32, kRowsPerBlock), 0, stream>>>(
          cam.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), mptr, static_cast<int>(C), static_cast<int>(HW),
          static_cast<int>(ceil_div(C, 32)), static_cast<acc_t>(alpha));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mask};
}

at::Tensor pool_backward_cuda(const at::Tensor& grad, const at::Tensor& mask, double alpha, int64_t H, int64_t W,
                              bool channels_last) {
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous(), "boostlu_pool backward: grad must be contiguous (B, C)");
  TORCH_CHECK(grad.is_cuda() && mask.is_cuda(), "boostlu_pool backward: grad and mask must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t B = grad.size(0), C = grad.size(1), HW = H * W;
  TORCH_CHECK(mask.scalar_type() == at::kInt && mask.is_contiguous() &&
                  mask.numel() == mask_words(B, C, HW, channels_last),
              "boostlu_pool backward: the sign mask was not saved (forward ran without grad?) or has the wrong size");
  TORCH_CHECK(!channels_last || B <= 65535, "boostlu_pool CUDA: batch ", B,
              " > 65535 (grid.y limit of the channels-last kernel)");
  auto out = at::empty({B, C, H, W}, grad.options().memory_format(
                                         channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* mptr = reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "boostlu_pool_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (!channels_last) {
      const int64_t planes = B * C;
      const int64_t blocks = ceil_div(planes, kWarpsPerBlock);
      pool_bwd_nchw<scalar_t, acc_t><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(
          grad.data_ptr<scalar_t>(), mptr, out.data_ptr<scalar_t>(), planes, static_cast<int>(HW),
          static_cast<int>(ceil_div(HW, 32)), static_cast<acc_t>(alpha));
    } else {
      const dim3 grid(static_cast<unsigned>(ceil_div(C, 32)), static_cast<unsigned>(B));
      pool_bwd_nhwc<scalar_t, acc_t><<<grid, dim3(32, kRowsPerBlock), 0, stream>>>(
          grad.data_ptr<scalar_t>(), mptr, out.data_ptr<scalar_t>(), static_cast<int>(C), static_cast<int>(HW),
          static_cast<int>(ceil_div(C, 32)), static_cast<acc_t>(alpha));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor boostlu_forward_cuda(const at::Tensor& x, double alpha) {
  check_dense(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = empty_in_layout(x);
  const int64_t n = x.numel();
  if (n == 0) return y;
  constexpr int threads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "boostlu_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    boostlu_fwd_kernel<scalar_t, acc_t><<<elementwise_blocks(n, threads), threads, 0,
                                          c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), n, static_cast<acc_t>(alpha));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor boostlu_backward_cuda(const at::Tensor& grad, const at::Tensor& x, double alpha) {
  check_dense(x, "x");
  check_dense(grad, "grad");
  check_same_layout(grad, x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto gx = empty_in_layout(x);
  const int64_t n = x.numel();
  if (n == 0) return gx;
  constexpr int threads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "boostlu_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    boostlu_bwd_kernel<scalar_t, acc_t><<<elementwise_blocks(n, threads), threads, 0,
                                          c10::cuda::getCurrentCUDAStream()>>>(
        grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), n, static_cast<acc_t>(alpha));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

}  // namespace bgtrain
