// The CUDA binding of the cuda backend, built as the extension rnnfast._cuda: the
// CUDA implementations of rnnfast::layer_fwd / layer_bwd (schemas in
// csrc/cpu/layer.cpp, Python autograd and fake kernels in rnnfast/cpu.py, shared by
// both backends) run the time loop of loop.h with the kernels of step.cu under a
// device guard on the current stream, and its decode (every layer of a stack in
// one call) with the kernel of decode.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "kernels.h"
#include "loop.h"

namespace rnnfast::cuda {
namespace {

Stream current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

// The step kernels on the current stream, each launch checked.
Steps cuda_steps() {
  const Stream stream = current_stream();
  return Steps{
      c10::DeviceType::CUDA,
      [stream](int mode, DType dt, const StepFwdArgs& a) {
        step_fwd(mode, dt, a, stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      },
      [stream](int mode, DType dt, const StepBwdArgs& a) {
        step_bwd(mode, dt, a, stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      },
      [stream](int mode, DType dt, const DecodeArgs& a) {
        decode_step(mode, dt, a, stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      },
  };
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cuda_layer_fwd(int64_t mode, const Tensor& x,
                                                                  const OptTensor& batch_sizes, const Tensor& h0,
                                                                  const OptTensor& c0, const Tensor& w_ih,
                                                                  const Tensor& w_hh, const OptTensor& b_ih,
                                                                  const OptTensor& b_hh, const OptTensor& w_hr,
                                                                  bool reverse, bool save) {
  TORCH_CHECK(x.is_cuda(), "rnnfast cuda backend: the input must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return layer_fwd(cuda_steps(), mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, save);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cuda_layer_bwd(
    int64_t mode, const Tensor& x, const OptTensor& batch_sizes, const Tensor& h0, const OptTensor& c0,
    const Tensor& w_ih, const Tensor& w_hh, const OptTensor& w_hr, bool has_bias, bool reverse, const Tensor& out,
    const Tensor& ws1, const Tensor& ws2, const Tensor& grad_out, const Tensor& grad_hn, const Tensor& grad_cn,
    bool /*need_dx*/, bool /*need_dh0*/, bool /*need_dw*/) {  // the CUDA loop forms every gradient
  TORCH_CHECK(x.is_cuda(), "rnnfast cuda backend: the input must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return layer_bwd(cuda_steps(), mode, x, batch_sizes, h0, c0, w_ih, w_hh, w_hr, has_bias, reverse, out, ws1, ws2,
                   grad_out, grad_hn, grad_cn);
}

std::tuple<Tensor, Tensor, OptTensor> cuda_decode(int64_t mode, const std::vector<Tensor>& weights,
                                                  int64_t num_layers, bool has_bias, const Tensor& x, const Tensor& h0,
                                                  const OptTensor& c0) {
  TORCH_CHECK(x.is_cuda(), "rnnfast cuda decode: the input must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return decode(cuda_steps(), mode, weights, num_layers, has_bias, x, h0, c0);
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnfast, CUDA, m) {
  m.impl("layer_fwd", &cuda_layer_fwd);
  m.impl("layer_bwd", &cuda_layer_bwd);
}

}  // namespace rnnfast::cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rnnfast CUDA kernels; the autograd-aware entry points are torch.ops.rnnfast.* (CUDA dispatch)";
  m.attr("DECODE_MAX_B") = rnnfast::cuda::kDecodeMaxB;
  m.def("decode", &rnnfast::cuda::cuda_decode,
        "Inference over all layers of a unidirectional stack in one call, B <= DECODE_MAX_B rows.");
}
