// CPU emulation of the cuda backend's layer loop, for tests/test_cuda_emulated.py:
// the host loop of csrc/cuda/loop.h with the element functions of cell.cuh run on
// the host over every (row, hidden unit), registered as rnnfast_cuda_emu::layer_fwd
// / layer_bwd / decode for CPU tensors. It checks the loop, the decode host code
// (weight cache included) and the cell math of every mode, option and dtype without
// a GPU; launch configuration, streams and the decode kernel's warp reduction need
// the GPU tests.
#include <torch/library.h>

#include "cell.cuh"
#include "loop.h"

namespace rnnfast::cuda {
namespace {

struct HostFwd {
  const StepFwdArgs& a;
  template <typename T, int MODE>
  void operator()() const {
    for (int64_t idx = 0; idx < a.n * a.H; ++idx) step_fwd_elem<T, MODE>(a, idx);
  }
};

struct HostBwd {
  const StepBwdArgs& a;
  template <typename T, int MODE>
  void operator()() const {
    for (int64_t idx = 0; idx < a.n * a.H; ++idx) step_bwd_elem<T, MODE>(a, idx);
  }
};

// What decode.cu's kernel computes, one (row, unit) at a time: the G gate rows' dot
// products, then the same cell update (decode_elem).
struct HostDecode {
  const DecodeArgs& a;
  template <typename T, int MODE>
  void operator()() const {
    constexpr int G = gate_count(MODE);
    using A = Acc<T>;
    const T* w_ih = static_cast<const T*>(a.w_ih);
    const T* w_hh = static_cast<const T*>(a.w_hh);
    const T* bias = static_cast<const T*>(a.bias);
    const T* x = static_cast<const T*>(a.x);
    const T* h_in = static_cast<const T*>(a.h_in);
    for (int64_t b = 0; b < a.B; ++b) {
      for (int64_t j = 0; j < a.H; ++j) {
        A gi[G], gh[G];
        for (int g = 0; g < G; ++g) {
          gi[g] = load(bias + g * a.H + j);
          gh[g] = load(bias + (G + g) * a.H + j);
          for (int64_t k = 0; k < a.I; ++k) gi[g] += load(w_ih + (g * a.H + j) * a.I + k) * load(x + b * a.I + k);
          for (int64_t k = 0; k < a.H; ++k) gh[g] += load(w_hh + (g * a.H + j) * a.H + k) * load(h_in + b * a.H + k);
        }
        decode_elem<T, MODE>(a, gi, gh, b, j);
      }
    }
  }
};

Steps host_steps() {
  return Steps{
      c10::DeviceType::CPU,
      [](int mode, DType dt, const StepFwdArgs& a) { dispatch(mode, dt, HostFwd{a}); },
      [](int mode, DType dt, const StepBwdArgs& a) { dispatch(mode, dt, HostBwd{a}); },
      [](int mode, DType dt, const DecodeArgs& a) { dispatch(mode, dt, HostDecode{a}); },
  };
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> emu_layer_fwd(int64_t mode, const Tensor& x,
                                                                 const OptTensor& batch_sizes, const Tensor& h0,
                                                                 const OptTensor& c0, const Tensor& w_ih,
                                                                 const Tensor& w_hh, const OptTensor& b_ih,
                                                                 const OptTensor& b_hh, const OptTensor& w_hr,
                                                                 bool reverse, bool save) {
  return layer_fwd(host_steps(), mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, save);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> emu_layer_bwd(
    int64_t mode, const Tensor& x, const OptTensor& batch_sizes, const Tensor& h0, const OptTensor& c0,
    const Tensor& w_ih, const Tensor& w_hh, const OptTensor& w_hr, bool has_bias, bool reverse, const Tensor& out,
    const Tensor& ws1, const Tensor& ws2, const Tensor& grad_out, const Tensor& grad_hn, const Tensor& grad_cn) {
  return layer_bwd(host_steps(), mode, x, batch_sizes, h0, c0, w_ih, w_hh, w_hr, has_bias, reverse, out, ws1, ws2,
                   grad_out, grad_hn, grad_cn);
}

// c_n is empty for modes without a cell state
std::tuple<Tensor, Tensor, Tensor> emu_decode(int64_t mode, const std::vector<Tensor>& weights, int64_t num_layers,
                                              bool has_bias, const Tensor& x, const Tensor& h0, const OptTensor& c0) {
  auto [out, h_n, c_n] = decode(host_steps(), mode, weights, num_layers, has_bias, x, h0, c0);
  return {out, h_n, c_n.has_value() ? *c_n : at::empty({0}, x.options())};
}

}  // namespace

// schemas inferred from the C++ signatures (those of rnnfast::layer_fwd / layer_bwd)
TORCH_LIBRARY(rnnfast_cuda_emu, m) {
  m.def("layer_fwd", &emu_layer_fwd);
  m.def("layer_bwd", &emu_layer_bwd);
  m.def("decode", &emu_decode);
}

}  // namespace rnnfast::cuda
