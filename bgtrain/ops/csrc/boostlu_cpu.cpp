// CPU kernels of BoostLU and BoostLU+GAP, with the same semantics and sign-mask layout as the CUDA build
// (boostlu_common.h). Sums accumulate in at::acc_type<T, /*is_cuda=*/false>: fp64 for fp32 inputs, so the fp32
// result is the correctly rounded mean of the boosted values.
#include <torch/extension.h>

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <tuple>
#include <vector>

#include "boostlu_common.h"
#include "boostlu_layout.h"

namespace bgtrain {
namespace {

void check_dense(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "bgtrain boostlu CPU op: ", what, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous() || (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)),
              "bgtrain boostlu CPU op: ", what, " must be contiguous or channels-last (bgtrain/ops/library.py "
              "normalises layouts before calling the extension)");
}

template <typename scalar_t, typename op_t>
inline op_t boosted(scalar_t v, op_t alpha) {
  const op_t a = static_cast<op_t>(v);
  return a > op_t(0) ? static_cast<op_t>(static_cast<scalar_t>(a * alpha)) : a;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pool_forward_cpu(const at::Tensor& cam, double alpha, bool save_mask) {
  TORCH_CHECK(cam.dim() == 4, "boostlu_pool: expected a (B, C, H, W) CAM, got shape ", cam.sizes());
  check_dense(cam, "cam");
  const int64_t B = cam.size(0), C = cam.size(1), HW = cam.size(2) * cam.size(3);
  const bool cl = layout_channels_last(cam);
  auto out = at::empty({B, C}, cam.options());
  auto mask = at::zeros({save_mask ? mask_words(B, C, HW, cl) : 0}, cam.options().dtype(at::kInt));
  if (B * C == 0) return {out, mask};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cam.scalar_type(), "boostlu_pool_forward_cpu", [&] {
    using op_t = at::opmath_type<scalar_t>;
    using acc_t = at::acc_type<scalar_t, false>;
    const op_t a = static_cast<op_t>(alpha);
    const scalar_t* x = cam.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    uint32_t* m = save_mask ? reinterpret_cast<uint32_t*>(mask.data_ptr<int32_t>()) : nullptr;
    if (!cl) {
      const int64_t words = ceil_div(HW, 32);
      at::parallel_for(0, B * C, 64, [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane) {
          const scalar_t* p = x + plane * HW;
          acc_t acc = 0;
          for (int64_t i = 0; i < HW; ++i) {
            acc += static_cast<acc_t>(boosted(p[i], a));
            if (m != nullptr && static_cast<op_t>(p[i]) > op_t(0)) m[plane * words + i / 32] |= 1u << (i % 32);
          }
          o[plane] = static_cast<scalar_t>(acc / static_cast<acc_t>(HW));
        }
      });
    } else {
      const int64_t words = ceil_div(C, 32);
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> acc(C);
        for (int64_t b = begin; b < end; ++b) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t s = 0; s < HW; ++s) {
            const scalar_t* row = x + (b * HW + s) * C;
            for (int64_t c = 0; c < C; ++c) {
              acc[c] += static_cast<acc_t>(boosted(row[c], a));
              if (m != nullptr && static_cast<op_t>(row[c]) > op_t(0)) {
                m[(b * HW + s) * words + c / 32] |= 1u << (c % 32);
              }
            }
          }
          for (int64_t c = 0; c < C; ++c) o[b * C + c] = static_cast<scalar_t>(acc[c] / static_cast<acc_t>(HW));
        }
      });
    }
  });
  return {out, mask};
}

at::Tensor pool_backward_cpu(const at::Tensor& grad, const at::Tensor& mask, double alpha, int64_t H, int64_t W,
                             bool channels_last) {
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous() && grad.device().is_cpu(),
              "boostlu_pool backward: grad must be a contiguous (B, C) CPU tensor");
  const int64_t B = grad.size(0), C = grad.size(1), HW = H * W;
  TORCH_CHECK(mask.scalar_type() == at::kInt && mask.is_contiguous() &&
                  mask.numel() == mask_words(B, C, HW, channels_last),
              "boostlu_pool backward: the sign mask was not saved (forward ran without grad?) or has the wrong size");
  auto out = at::empty({B, C, H, W}, grad.options().memory_format(
                                         channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "boostlu_pool_backward_cpu", [&] {
    using op_t = at::opmath_type<scalar_t>;
    const op_t a = static_cast<op_t>(alpha);
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const uint32_t* m = reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>());
    scalar_t* o = out.data_ptr<scalar_t>();
    // Same two roundings as the reference's eager autograd: g / HW, then * alpha (see boostlu_common.h).
    auto plain = [&](int64_t bc) { return static_cast<scalar_t>(static_cast<op_t>(g[bc]) / static_cast<op_t>(HW)); };
    auto boost = [&](scalar_t p) { return static_cast<scalar_t>(static_cast<op_t>(p) * a); };
    if (!channels_last) {
      const int64_t words = ceil_div(HW, 32);
      at::parallel_for(0, B * C, 64, [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane) {
          const scalar_t p = plain(plane), q = boost(p);
          for (int64_t i = 0; i < HW; ++i) {
            o[plane * HW + i] = ((m[plane * words + i / 32] >> (i % 32)) & 1u) ? q : p;
          }
        }
      });
    } else {
      const int64_t words = ceil_div(C, 32);
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> p(C), q(C);
        for (int64_t b = begin; b < end; ++b) {
          for (int64_t c = 0; c < C; ++c) {
            p[c] = plain(b * C + c);
            q[c] = boost(p[c]);
          }
          for (int64_t s = 0; s < HW; ++s) {
            const uint32_t* mw = m + (b * HW + s) * words;
            scalar_t* row = o + (b * HW + s) * C;
            for (int64_t c = 0; c < C; ++c) row[c] = ((mw[c / 32] >> (c % 32)) & 1u) ? q[c] : p[c];
          }
        }
      });
    }
  });
  return out;
}

at::Tensor boostlu_forward_cpu(const at::Tensor& x, double alpha) {
  check_dense(x, "x");
  auto y = empty_in_layout(x);
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "boostlu_forward_cpu", [&] {
    using op_t = at::opmath_type<scalar_t>;
    const op_t a = static_cast<op_t>(alpha);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const op_t v = static_cast<op_t>(xp[i]);
        yp[i] = v > op_t(0) ? static_cast<scalar_t>(v * a) : xp[i];
      }
    });
  });
  return y;
}

at::Tensor boostlu_backward_cpu(const at::Tensor& grad, const at::Tensor& x, double alpha) {
  check_dense(x, "x");
  check_dense(grad, "grad");
  check_same_layout(grad, x);
  auto gx = empty_in_layout(x);
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "boostlu_backward_cpu", [&] {
    using op_t = at::opmath_type<scalar_t>;
    const op_t a = static_cast<op_t>(alpha);
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = gx.data_ptr<scalar_t>();
    at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        op[i] = static_cast<op_t>(xp[i]) > op_t(0) ? static_cast<scalar_t>(static_cast<op_t>(gp[i]) * a) : gp[i];
      }
    });
  });
  return gx;
}

}  // namespace bgtrain

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bgtrain BoostLU CPU kernels (see bgtrain/ops/csrc/boostlu_common.h)";
  m.def("pool_forward", &bgtrain::pool_forward_cpu, "BoostLU+GAP forward -> (logits, sign mask)");
  m.def("pool_backward", &bgtrain::pool_backward_cpu, "BoostLU+GAP backward from the sign mask");
  m.def("boostlu_forward", &bgtrain::boostlu_forward_cpu, "elementwise BoostLU");
  m.def("boostlu_backward", &bgtrain::boostlu_backward_cpu, "elementwise BoostLU backward");
}
