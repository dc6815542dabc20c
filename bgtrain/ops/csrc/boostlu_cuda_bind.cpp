// Python bindings of the CUDA BoostLU kernels (compiled by the host compiler; the kernels are in boostlu_cuda.cu).
#include <torch/extension.h>

#include <tuple>

namespace bgtrain {
std::tuple<at::Tensor, at::Tensor> pool_forward_cuda(const at::Tensor& cam, double alpha, bool save_mask);
at::Tensor pool_backward_cuda(const at::Tensor& grad, const at::Tensor& mask, double alpha, int64_t H, int64_t W,
                              bool channels_last);
at::Tensor boostlu_forward_cuda(const at::Tensor& x, double alpha);
at::Tensor boostlu_backward_cuda(const at::Tensor& grad, const at::Tensor& x, double alpha);
}  // namespace bgtrain

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bgtrain BoostLU CUDA kernels (see bgtrain/ops/csrc/boostlu_common.h)";
  m.def("pool_forward", &bgtrain::pool_forward_cuda, "BoostLU+GAP forward -> (logits, sign mask)");
  m.def("pool_backward", &bgtrain::pool_backward_cuda, "BoostLU+GAP backward from the sign mask");
  m.def("boostlu_forward", &bgtrain::boostlu_forward_cuda, "elementwise BoostLU");
  m.def("boostlu_backward", &bgtrain::boostlu_backward_cuda, "elementwise BoostLU backward");
}
